#!/usr/bin/env bash
# The GPU checks of a session that is lent a device machine, as one prepared call (REFERENCE/README: 15 minutes
# of device time per task, starts included, at most 10 minutes a command). Two steps:
#
#   here, once per checkout:   bash scripts/gpu_session.sh fetch
#       downloads, as wheels into .whl/ (ignored through .git/info/exclude), the packages the device image
#       lacks or may hold too old: bitsandbytes (--load-4bit), plotly (render), open_clip_torch (+ ftfy, wcwidth;
#       the CLIP check) and peft at this venv's versions. With the working tree (~10 MB) they stay under the
#       64 MiB a call may carry.
#   on the device:             run(command="bash scripts/gpu_session.sh run", carry=[".whl"], timeout_s=540)
#       installs them into /tmp/site and runs, in order of what is missing most, each step under its own time
#       limit, so that a slow step leaves the others their time and everything finished comes back in $OUT
#       (about 8 minutes in all: with a machine's start, a part can still be rerun inside the 15):
#         calibrate  python -m experiments.gpu_check --calibrate   (the efficiencies llm_scale_plan assumes; 150 s)
#         rehearsal  python -m experiments.rehearsal --device cuda --model llama3-8b --layers $LAYERS --variants
#                    4bit fp32 bf16   (the seed's pipeline on the Llama-3-8B shape, 240 s; LAYERS defaults to 4,
#                    since all 32 cannot build, save and run three variants inside one call: the table says so)
#         clip       python -m experiments.gpu_check   (CLIP ViT-B/32 training and grid; 60 s)
#       `run rehearsal` (any subset of the steps, in that order) reruns a part, e.g. LAYERS=8 on a warm machine.
#       Then copy $OUT/gpu_calibration.json to experiments/benchmarks/results/ (llm_scale_plan reads it there)
#       and fold the rest into docs/reference/performance.md, naming the GPU.
#   `bash scripts/gpu_session.sh dry` runs step 3's CPU smoke path with this venv: a check of the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
shift || true
case "$mode" in
fetch)
    VERSIONS=$(.venv/bin/python -m pip list --format=freeze 2>/dev/null || true)
    pinned() { echo "$VERSIONS" | grep -i "^$1==" || echo "$2"; }  # this venv's version, else the one tested
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.whl/ >> .git/info/exclude; }
    mkdir -p .whl
    # --no-deps: each dependency the image lacks is named here (ftfy, wcwidth); the rest are in its package list
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl \
        "$(pinned bitsandbytes bitsandbytes==0.50.2)" "$(pinned plotly plotly==7.1.0)" \
        "$(pinned open_clip_torch open_clip_torch==3.3.0)" "$(pinned peft peft==0.21.2)" ftfy wcwidth || exit 2
    du -cb .whl/*.whl | tail -1
    ;;
run)
    [ -n "${OUT:-}" ] || { echo "gpu_session.sh run: \$OUT is unset; this mode runs on the device machine" >&2; exit 2; }
    ls .whl/*.whl > /dev/null 2>&1 || { echo "gpu_session.sh run: no .whl/; run 'fetch' here and carry .whl" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    log="$OUT/log.txt"
    start=$SECONDS
    { nvidia-smi -L; python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"; } \
        2>&1 | tee "$log"
    step() {  # step NAME SECONDS COMMAND...: one check under its own limit, its exit status logged
        local name=$1 limit=$2; shift 2
        echo "== $name (limit ${limit} s, at $((SECONDS - start)) s)" | tee -a "$log"
        timeout "$limit" "$@" 2>&1 | tee -a "$log"
        echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"
    }
    steps=" ${*:-calibrate rehearsal clip} "
    [[ $steps == *" calibrate "* ]] && step calibrate 150 python3 -m experiments.gpu_check --calibrate \
        --json "$OUT/gpu_calibration.json"
    [[ $steps == *" rehearsal "* ]] && step rehearsal 240 python3 -m experiments.rehearsal --device cuda \
        --model llama3-8b --layers "${LAYERS:-4}" --variants 4bit fp32 bf16 --out /tmp/rehearsal \
        --json "$OUT/rehearsal_gpu.json"
    [[ $steps == *" clip "* ]] && step clip 60 python3 -m experiments.gpu_check --json "$OUT/gpu_check_clip.json"
    echo "== done after $((SECONDS - start)) s" | tee -a "$log"
    ;;
dry)
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 .venv/bin/python -m experiments.gpu_check --smoke \
        --steps 1 --points 1
    ;;
*)
    echo "usage: bash scripts/gpu_session.sh fetch|run|dry (see the comment at its top)" >&2
    exit 2
    ;;
esac
