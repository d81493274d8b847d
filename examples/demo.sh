#!/usr/bin/env bash
# `make demo`: train a small Improved-DDPM on builtin:digits (about 4 minutes in all on 2 CPU cores), then sample a
# grid with 50 DDIM steps and measure bits/dim on the held-out digits.
#   bash examples/demo.sh [path/to/ddpmctl] [run-dir]
set -euo pipefail

DDPMCTL=${1:-ddpmctl}
RUN_DIR=${2:-runs/demo}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STARTED=$SECONDS

# Threads: the cores this process may use (nproc reads the affinity mask, like os.sched_getaffinity) minus the
# 1-minute load average, rounded, at least 1. On a quiet 2-core machine that is 2; when other work keeps a core busy
# it is 1, because two OpenMP threads that spin-wait for a busy core train this small network 20-50x slower than one
# (measured: 12 vs 630 img/s under load). DEMO_THREADS overrides.
if [[ -z "${DEMO_THREADS:-}" ]]; then
  CORES=$(nproc)
  LOAD=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)
  DEMO_THREADS=$(awk -v c="$CORES" -v l="$LOAD" 'BEGIN { t = int(c - l + 0.5); if (t < 1) t = 1; if (t > c) t = c; print t }')
  echo "== $DEMO_THREADS thread(s): $CORES core(s) available, 1-minute load average $LOAD"
else
  echo "== $DEMO_THREADS thread(s) (DEMO_THREADS)"
fi
export OMP_NUM_THREADS=$DEMO_THREADS

echo "== training on builtin:digits into $RUN_DIR (settings: $HERE/configs/digits.toml)"
# --force: the demo folder is the demo's own; every `make demo` starts from scratch (same seed, same model).
# The progress bar goes to stderr; stdout carries the --json summary, read here for the checkpoint and the step.
SUMMARY=$("$DDPMCTL" train --config "$HERE/configs/digits.toml" --out "$RUN_DIR" --force --json)
# The interpreter ddpmctl runs on (its venv) reads the JSON.
PY="$(dirname "$(command -v "$DDPMCTL")")/python"
[[ -x "$PY" ]] || PY=python3
read -r CKPT STEP STOP PRECISION <<<"$(printf '%s' "$SUMMARY" | "$PY" -c 'import json, sys; s = json.load(sys.stdin)
print(s["ema_checkpoint"], s["step"], s["stop_reason"], s["precision"])')"
MAX_STEPS=$(sed -nE 's/^max_steps *= *([0-9]+).*/\1/p' "$HERE/configs/digits.toml")
echo "checkpoint: $CKPT ($PRECISION)"
if [[ "$STOP" == "max_time" ]]; then
  echo "NOTE: the demo's time cap (max_time in digits.toml) ended training at step $STEP of $MAX_STEPS: this" \
       "machine is slower (or busier) than the demo assumes, so expect a worse bits/dim than a full run."
fi

echo "== sampling 64 digits with DDIM, 50 steps"
"$DDPMCTL" sample "$CKPT" -o "$RUN_DIR/samples" --sampler ddim --steps 50 -n 64 --seed 0 --force --quiet
echo "sample grid: $RUN_DIR/samples/grid.png"

echo "== bits/dim on the held-out digits (variational bound; KL terms importance-sampled, 64 per image)"
"$DDPMCTL" eval-nll "$CKPT" --estimator mc --quiet

echo "done in $((SECONDS - STARTED)) s: checkpoint $CKPT (step $STEP), grid $RUN_DIR/samples/grid.png"
