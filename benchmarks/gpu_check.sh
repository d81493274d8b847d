#!/usr/bin/env bash
# GPU smoke benchmark: train, sample, eval-nll and a short distill on CUDA, about a minute each, with
# the precision left to --precision's default (auto: bf16 where the GPU has it). Prints img/s and peak CUDA memory
# (torch.cuda.max_memory_allocated) per command. Nothing in CI depends on it.
#   bash benchmarks/gpu_check.sh [PYTHON]      (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: CUDA is not available here (torch.cuda.is_available() is False); nothing to measure" >&2
    exit 1
fi
OUT="${GPU_CHECK_DIR:-runs/gpu_check}"
rm -rf "$OUT" && mkdir -p "$OUT"
RUN="$PY benchmarks/gpu_run.py"
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
$RUN train -- train builtin:digits --out "$OUT/train" --max-time 60s --batch-size 128 --model-channels 64 \
    --channel-mult 1,2 --res-blocks 2 --attention-resolutions 4 --timesteps 1000 --device cuda --json -q
CKPT="$(ls "$OUT"/train/ema_*.safetensors | tail -n 1)"
$RUN 1024 -- sample "$CKPT" --out "$OUT/samples" --num 1024 --batch-size 256 --steps 100 --device cuda -q
$RUN 300 -- eval-nll "$CKPT" --device cuda -q
$RUN distill:128 -- distill "$CKPT" --data builtin:digits --out "$OUT/distill" --iters-per-stage 200 \
    --from-steps 16 --to-steps 4 --batch-size 128 --report-samples 0 --device cuda --json -q
# Several GPUs: one torchrun process per GPU (nccl; LOCAL_RANK picks the device), --batch-size is the
# global batch. `--quiet` must leave stderr empty on every rank.
NGPU="$("$PY" -c "import torch; print(torch.cuda.device_count())")"
if [ "$NGPU" -ge 2 ]; then
    echo "== torchrun on $NGPU GPUs (nccl)"
    "$(dirname "$PY")/torchrun" --standalone --nproc_per_node "$NGPU" -m ddpmctl train builtin:digits --device cuda \
        --batch-size 128 --max-steps 50 --out "$OUT/ddp" --quiet 2> "$OUT/ddp.err"
    if [ -s "$OUT/ddp.err" ]; then echo "gpu_check: torchrun --quiet wrote to stderr:" >&2; cat "$OUT/ddp.err" >&2; exit 1; fi
    echo "torchrun: $NGPU ranks, 50 steps, stderr empty"
fi
