#!/usr/bin/env bash
# The one prepared GPU check (<= 8 minutes on one H100/H200-class GPU): the serving-regime benchmark on a
# LLaVA-1.5-7B-shaped model (random weights, bfloat16, CUDA), untouched vs skip plans, side by side:
#
#   benchmarks/device_check.sh            # from the repository root, or from anywhere
#
# Writes serving_gpu7b.md (the markdown table for docs/benchmarks.md, with its command and machine),
# serving_gpu7b.json (every run), serving_gpu7b.log and nvidia-smi.txt under $OUT if set, else runs/device_check/.
# The table is rewritten after each (vision tokens, batch) cell, so a run cut short keeps what it measured.
#
# Python: $SKIPIT_PYTHON if set, else .venv/bin/python, else a python3 that already imports torch, transformers and
# skipit's dependencies (skipit from src/); failing all three it runs the Makefile's install target (the only step
# that needs the network). It stops with one "error:" line, exit code 2, where there is no CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-runs/device_check}"
LIMIT_S="${DEVICE_CHECK_LIMIT_S:-450}"  # the benchmark itself; model build and CUDA start-up are inside it
mkdir -p "$OUT_DIR"

if [[ -n "${SKIPIT_PYTHON:-}" ]]; then
    PY="$SKIPIT_PYTHON"
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
elif python3 -c 'import sys; sys.path.insert(0, "src"); import torch, transformers, skipit.evaluation.speed' 2>/dev/null
then  # a machine with torch and transformers installed already: skipit from this checkout's src/
    PY=python3
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    echo "device_check: no .venv here; using $(command -v python3) with src/ on PYTHONPATH"
else
    echo "device_check: no .venv here; installing it with the repository's Makefile (make .venv/.installed)"
    make .venv/.installed || { echo "error: make .venv/.installed failed (it needs the network)" >&2; exit 2; }
    PY=.venv/bin/python
fi

if ! "$PY" - <<'EOF'
import sys

import torch

if torch.version.cuda is None:
    sys.exit(f"error: device_check.sh needs CUDA, and this torch ({torch.__version__}) is a CPU-only build: "
             "install a CUDA build of torch, or run benchmarks/serving.py --preset cpu instead")
if not torch.cuda.is_available():
    sys.exit(f"error: device_check.sh needs a CUDA GPU, and torch {torch.__version__} (CUDA {torch.version.cuda}) "
             "sees none on this machine: run benchmarks/serving.py --preset cpu instead")
print(f"device_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
then
    exit 2
fi
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true

# The preset's grid: 576 and 2,880 vision tokens x batch 1, 8, 32; 32 new tokens; 1 warm-up + 3 measured rounds;
# the largest batch computed for an 80 GiB budget (an H100). Estimated at 3-4 minutes on an H100.
set +e
timeout "$LIMIT_S" "$PY" benchmarks/serving.py --preset gpu7b \
    --table "$OUT_DIR/serving_gpu7b.md" --out "$OUT_DIR/serving_gpu7b.json" "$@" 2>&1 | tee "$OUT_DIR/serving_gpu7b.log"
rc=${PIPESTATUS[0]}
set -e
if [[ $rc -eq 124 ]]; then
    echo "error: benchmarks/serving.py ran past ${LIMIT_S} s; the cells measured so far are in $OUT_DIR/serving_gpu7b.md" >&2
elif [[ $rc -ne 0 ]]; then
    echo "error: benchmarks/serving.py failed (exit $rc); see $OUT_DIR/serving_gpu7b.log" >&2
else
    echo "device_check: table in $OUT_DIR/serving_gpu7b.md"
fi
exit "$rc"
