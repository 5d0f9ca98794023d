#!/usr/bin/env bash
# Install the toolkit and its offline data on a Debian/Ubuntu machine, into the project's
# virtual environment .venv/ (created on first run, reused after; `rm -rf .venv` to rebuild).
#   bash scripts/setup.sh          # package + models + data
#   bash scripts/setup.sh --test   # the same, plus the test tools (pytest, ruff), bitsandbytes (--load-4bit), mkdocs (the docs site) and submitit (--launcher)
# Then run everything through .venv/bin/python (or `source .venv/bin/activate` first).
# The venv is made from python3 on PATH, or from PYTHON=/path/to/python3.X when set; it is
# always .venv/ (an already-active virtualenv is not installed into; its python only seeds
# .venv). A system Python that refuses pip installs (PEP 668, "externally managed") is fine:
# nothing is installed into it.
# apt packages are installed only when missing and when we may (root, or passwordless sudo):
# the data packages (WordNet, Fashion-MNIST) — otherwise we say how to get them and carry on —
# and python3.X-venv when the interpreter lacks venv/ensurepip (stock Debian) — otherwise we
# say what to run and stop.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
extras="bench"
case "${1:-}" in
  "") ;;
  --test) extras="test,bench,quant,docs,cluster" ;;
  *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
esac

if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
apt_updated=""
apt_install() {  # apt_install PKG... — returns 1 when not permitted or apt fails
  [ "$SUDO" != none ] && command -v apt-get >/dev/null || return 1
  if [ -z "$apt_updated" ]; then $SUDO apt-get update -qq || return 1; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

need=()
[ -f /usr/share/wordnet/data.noun ] || need+=(wordnet-base)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
if [ ${#need[@]} -gt 0 ] && ! apt_install "${need[@]}"; then
  echo "setup: cannot install ${need[*]} (needs root and apt): run 'sudo apt-get install ${need[*]}' or use --data-root" >&2
fi

# The project venv: reuse it when its python and pip work, else (re)create it.
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  command -v "$PY" >/dev/null || { echo "setup: no '$PY' found: install Python >= 3.10 (apt-get install python3) or set PYTHON=/path/to/python3" >&2; exit 1; }
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    { echo "setup: $("$PY" -V 2>&1) is too old: Python >= 3.10 needed (set PYTHON=/path/to/python3.X)" >&2; exit 1; }
  if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then  # stock Debian/Ubuntu: no python3.X-venv
    venv_pkg=$("$PY" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')
    exe=$("$PY" -c 'import os, sys; print(os.path.realpath(sys.executable))')
    if ! dpkg -S "$exe" >/dev/null 2>&1; then  # not apt's python: apt cannot add venv to it
      echo "setup: $exe lacks the venv/ensurepip modules: use a Python that has them, e.g. PYTHON=/usr/bin/python3 after 'sudo apt-get install python3-venv'" >&2; exit 1
    fi
    { [ "$SUDO" != none ] && echo "setup: $exe lacks venv/ensurepip; installing $venv_pkg" >&2 &&
      apt_install "$venv_pkg" && "$PY" -c 'import venv, ensurepip' 2>/dev/null; } ||
      { echo "setup: $PY cannot create a virtual environment: run 'sudo apt-get install $venv_pkg', then rerun this script" >&2; exit 1; }
  fi
  "$PY" -m venv --clear "$VENV"
fi

# Install the project (editable) unless this venv already has it for this pyproject.toml and
# these extras (a stamp in the venv; a rerun then takes seconds).
stamp="$VENV/.setup-stamp"
key=$(sha256sum pyproject.toml | cut -d' ' -f1)
versions='import sys; from importlib.metadata import version as v; v("randlora-landscape"); print("python", sys.version.split()[0], "torch", v("torch"), "peft", v("peft"))'
if grep -qxF -e "$extras $key" -e "test,bench,quant,docs,cluster $key" "$stamp" 2>/dev/null && info=$("$VENV/bin/python" -c "$versions" 2>/dev/null); then
  echo "setup: $VENV is up to date"
else
  echo "setup: installing the project into $VENV (the first time takes a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[${extras}]"
  info=$("$VENV/bin/python" -c "$versions")
  echo "$extras $key" >> "$stamp"
fi
echo "setup: done in $VENV ($info)"
echo "setup: next, from $(pwd):"
if [ "$extras" = "test,bench,quant,docs,cluster" ]; then
  echo "  $VENV/bin/python -m pytest -n 2                  # tests (two workers, one per core)"
fi
echo "  $VENV/bin/python -m landscape.connectivity       # main job: wordnet + MiniLM -> runs/wordnet/"
echo "  (or 'source $VENV/bin/activate' once, then plain 'python -m ...')"
