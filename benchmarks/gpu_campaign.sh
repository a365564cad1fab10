#!/usr/bin/env bash
# One unattended GPU validation run, sized for one 10-minute command on a lent H100/H200
# (docs/performance.md "GPU validation"). Everything it writes goes to $OUT (at most 8 files):
#   env.txt          GPU, driver, torch/triton/transformers versions
#   build.log        the CUDA extension built on the device (pip install -e, no build isolation)
#   pytest-gpu.log   `pytest -m gpu` (Triton, compiled CUDA, CUDA graphs)
#   bench-bf16.json  mlan-bench --device cuda, every op, paper shapes, eager/compile/LoRA/copy baselines
#   bench-fp32.json  the same in fp32
#   e2e.json         the end-to-end step at the paper preset (LLaMA-7B layer shape)
#   campaign.log     what ran, for how long, with which exit status
# Each stage has its own time limit (540 s in all), so one that hangs cannot eat the others' time; a stage that
# fails is logged and the next one runs. Usage on the device machine, from the repository root:
#   OUT=/some/dir bash benchmarks/gpu_campaign.sh
# On a CPU-only machine `GPU_CAMPAIGN_DRY_RUN=1` runs every stage's command on tiny CPU settings
# (checks the script and the flags, not the GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that comes back}
PYTHON=${PYTHON:-python3}
DRY=${GPU_CAMPAIGN_DRY_RUN:-0}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

stage() {   # stage NAME SECONDS LOGFILE COMMAND...
    local name=$1 limit=$2 logfile=$3; shift 3
    local start=$SECONDS status=0
    timeout "$limit" "$@" >>"$logfile" 2>&1 || status=$?
    echo "$(date -u +%FT%TZ) $name: exit $status after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/campaign.log"
}

if [ "$DRY" = 1 ]; then
    DEVICE=cpu; SHAPES=small; ITERS=2; E2E=tiny; TESTS=(tests/test_dispatch.py -m "not gpu")
else
    DEVICE=cuda; SHAPES=paper; ITERS=20; E2E=paper; TESTS=(tests -m gpu)
fi

{
    date -u +%FT%TZ
    nvidia-smi 2>&1 | head -15
    "$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda,
"device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none", "transformers", transformers.__version__)'
    "$PYTHON" -c 'import triton; print("triton", triton.__version__)' 2>&1
    git log -1 --format='commit %H %cs' 2>/dev/null
} >"$OUT/env.txt" 2>&1

if [ "$DRY" = 1 ]; then
    echo "dry run: extension build skipped" >"$OUT/build.log"
else
    stage build 200 "$OUT/build.log" env MAX_JOBS=16 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
fi
stage pytest-gpu 140 "$OUT/pytest-gpu.log" "$PYTHON" -m pytest "${TESTS[@]}" -q -p no:cacheprovider
common=(--device "$DEVICE" --shapes "$SHAPES" --iters "$ITERS" --no-plot --out-dir "$OUT")
ops=mm_adapter_fwd,mm_adapter_bwd,mm_adapter_fwdbwd,kl_div,fused_linear_kl,scale_grads
stage bench-bf16 80 "$OUT/campaign.log" "$PYTHON" -m mlan_bench.cli "${common[@]}" --dtype bf16 --ops "$ops" \
    --json "$OUT/bench-bf16.json" --csv /dev/null
stage bench-fp32 60 "$OUT/campaign.log" "$PYTHON" -m mlan_bench.cli "${common[@]}" --dtype fp32 --ops "$ops" \
    --json "$OUT/bench-fp32.json" --csv /dev/null
stage e2e 60 "$OUT/campaign.log" "$PYTHON" -m mlan_bench.cli "${common[@]}" --ops e2e_step --e2e-preset "$E2E" \
    --json "$OUT/e2e.json" --csv /dev/null
ls -la "$OUT" >>"$OUT/campaign.log"
