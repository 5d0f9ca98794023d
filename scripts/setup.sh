#!/usr/bin/env bash
# Install the toolkit and its offline data on a Debian/Ubuntu machine.
#   bash scripts/setup.sh          # package + models + data
#   bash scripts/setup.sh --test   # the same, plus the test tools (pytest, ruff)
# The apt data packages (WordNet, Fashion-MNIST) are installed only when missing and when
# we may (root, or passwordless sudo); otherwise we say how to get them and carry on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="bench"
[ "${1:-}" = "--test" ] && extras="test,bench"

need=()
[ -f /usr/share/wordnet/data.noun ] || need+=(wordnet-base)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
  if [ "$SUDO" = none ]; then
    echo "setup: cannot install ${need[*]} (needs root): run 'sudo apt-get install ${need[*]}' or use --data-root" >&2
  else
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

"$PY" -m pip install -q --disable-pip-version-check -e ".[${extras}]"
echo "setup: done ($("$PY" -c 'import torch, peft; print("torch", torch.__version__, "peft", peft.__version__)'))"
