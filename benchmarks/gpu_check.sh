#!/usr/bin/env bash
# One call's worth of GPU checks on a CUDA machine with PyTorch and Triton but no network (a lent device):
# the update-kernel variants, the optimizer roofline, the whole-model optimizer steps, the host time of a small
# model's step and the GPU kernel tests
# (pytest-xdist).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else ./gpu_check_out
#
# It writes about a dozen files; the lent device returns at most 8 from $OUT, so there run it as
#   bash benchmarks/gpu_check.sh /tmp/r; tar czf $OUT/gpu_check.tgz -C /tmp/r .
# (about 300 s on an H100, machine start excluded, of which the tests take about 130; the timeouts below
# bound it at 540 s).
#
# effllm is used from this checkout without installing it (effllm/ and kernels/ copied to a temporary site).
# bitsandbytes, for the side-by-side figures, is taken from .gpu/site when present: copy an installed
# bitsandbytes package there keeping only libbitsandbytes_cuda<NNN>.so for the machine's CUDA and the CPU
# library (about 4.5 MB; see docs/optim.md, "GPU kernel"). Writes logs, JSON and an updated benchmarks.md
# under OUT_DIR; copy the JSON files to benchmarks/results/, benchmarks.md and the PNG to docs/ to publish them.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT_DIR=${1:-${OUT:-$REPO/gpu_check_out}}
mkdir -p "$OUT_DIR"
SITE=$(mktemp -d)
cp -r "$REPO/effllm" "$SITE/" && cp -r "$REPO/kernels" "$SITE/effllm/kernels"
export PYTHONPATH="$SITE:$REPO/.gpu/site" PYTHONUNBUFFERED=1
cp "$REPO/docs/benchmarks.md" "$OUT_DIR/benchmarks.md"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
cd "$REPO"
# The variants first: the layouts and diagnostics waiting for a GPU (docs/optim.md) are what a session needs most.
# Then the roofline at the launcher's layout and, when a variant that only changes the layout was faster and
# exact, again at that layout (EFFLLM_TRITON_OPTIM_LAYOUT), so adopting it needs no second GPU session.
# Timeouts add up to under the device's 600 s per command.
echo "== update-kernel variants"
timeout 120 python3 benchmarks/optim_gpu_variants.py > "$OUT_DIR/variants.log" 2>&1; echo "rc=$?"; cat "$OUT_DIR/variants.log"
echo "== optimizer roofline"
timeout 80 python3 benchmarks/bench_optim_gpu.py --json "$OUT_DIR/optim_gpu.json" --markdown "$OUT_DIR/benchmarks.md" \
    > "$OUT_DIR/roofline.log" 2>&1; echo "rc=$?"; head -12 "$OUT_DIR/roofline.log"
FASTEST=$(sed -n 's/^fastest exact layout: \([^ ]*\) .*the launcher.s: \([^ ]*\)$/\1 \2/p' "$OUT_DIR/variants.log")
if [ -n "$FASTEST" ] && [ "${FASTEST% *}" != "${FASTEST#* }" ]; then
    echo "== optimizer roofline at the fastest exact layout, ${FASTEST% *}"
    cp "$OUT_DIR/benchmarks.md" "$OUT_DIR/benchmarks_fastest_layout.md"
    EFFLLM_TRITON_OPTIM_LAYOUT="${FASTEST% *}" timeout 70 python3 benchmarks/bench_optim_gpu.py --no-bnb \
        --json "$OUT_DIR/optim_gpu_fastest_layout.json" --markdown "$OUT_DIR/benchmarks_fastest_layout.md" \
        > "$OUT_DIR/roofline_fastest_layout.log" 2>&1; echo "rc=$?"; head -12 "$OUT_DIR/roofline_fastest_layout.log"
fi
echo "== whole-model optimizer steps"
timeout 60 python3 benchmarks/bench_optim.py --device cuda --repeats 20 --json "$OUT_DIR/optim_cuda.json" \
    --markdown "$OUT_DIR/benchmarks.md" --png "$OUT_DIR/optim_step_time_cuda.png" > "$OUT_DIR/steps.log" 2>&1; echo "rc=$?"; grep -E "^\| [0-9]|Targets" "$OUT_DIR/steps.log"
echo "== host time of a small model's step"
timeout 40 python3 benchmarks/optim_gpu_host.py > "$OUT_DIR/host.log" 2>&1; echo "rc=$?"; head -5 "$OUT_DIR/host.log"
echo "== GPU tests"
cd "$SITE" && timeout 170 python3 -m pytest "$REPO/tests/kernels" "$REPO/tests/optim" -k cuda -n 15 -q -p no:cacheprovider \
    --continue-on-collection-errors -o addopts="" -m "not slow" > "$OUT_DIR/tests.log" 2>&1; echo "rc=$?"; tail -4 "$OUT_DIR/tests.log"
