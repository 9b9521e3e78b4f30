#!/usr/bin/env bash
# The GPU path on one GPU in about 8 minutes (issue 20): the `gpu` preset's `full` model on the
# quality lake with NCCL, TorchRec row-wise sharding, bf16 autocast and FBGEMM's fused Adam;
# step time and MFU against a peak bf16 GEMM measured in the same run; test like AUC of the
# best-valid checkpoint. Writes OUT/gpu_check.json (pipelines/bench_gpu.py says what each key is).
#
#   infra/gpu_check.sh [MOVIELENS_DIR | LAKE_DIR] [OUT] [--section.key=value ...]
#
# MOVIELENS_DIR (default ../shared/data/movielens-latest-small) is ingested into OUT/lake first
# (CPU, ~2-3 min); a folder that is already a lake (it has `samples/`) is used as it is. Needs
# the CUDA builds of torch and fbgemm-gpu in .venv (or on PATH's python): see infra/Dockerfile.
# Further arguments override the preset (e.g. --train.max_epochs=1). GPU_CHECK_DEVICE=cpu runs the
# same steps on the CPU (a smoke run of the script, not figures).
set -euo pipefail
cd "$(dirname "$0")/.."

SOURCE=${1:-../shared/data/movielens-latest-small}
OUT=$(mkdir -p "${2:-gpu_check}" && cd "${2:-gpu_check}" && pwd)
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export WANDB_MODE=${WANDB_MODE:-disabled}
started=$(date +%s)

"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())"
if [ "$DEVICE" = cuda ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

if [ -d "$SOURCE/samples" ]; then
    LAKE=$(cd "$SOURCE" && pwd)
else
    LAKE=$OUT/lake
    # The quality preset's lake (same protocol and sizes as bench quality), built on the CPU.
    "$PYTHON" -m pipelines.run --config quality --stages features \
        --lake.root="$LAKE" --ingest.movielens_dir="$(cd "$SOURCE" && pwd)" --run.reports_dir="$OUT/reports"
fi
echo "lake ready after $(( $(date +%s) - started )) s: $LAKE"

# One GPU: one worker, 128 groups a step, the last 1024 events, 2 epochs (best-valid kept).
"$PYTHON" -m pipelines.bench gpu --device "$DEVICE" --json "$OUT/gpu_check.json" \
    --lake.root="$LAKE" --train.num_workers=1 --train.max_epochs=2 \
    --train.storage_path="$OUT/checkpoints" --run.wandb_dir="$OUT" "${@:3}"
echo "gpu_check: done in $(( $(date +%s) - started )) s; $OUT/gpu_check.json"
