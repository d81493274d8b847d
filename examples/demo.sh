#!/usr/bin/env bash
# `make demo`: train a small Improved-DDPM on builtin:digits (a few minutes on 2 CPU cores), then sample a grid
# with 50 DDIM steps and measure bits/dim on the held-out digits.
#   bash examples/demo.sh [path/to/ddpmctl] [run-dir]
set -euo pipefail

DDPMCTL=${1:-ddpmctl}
RUN_DIR=${2:-runs/demo}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# One thread per process: on a shared 2-core machine two OpenMP threads that spin-wait for each other train
# this small network 20-50x slower than one thread (measured: 12 vs 630 img/s under load); on an idle machine
# two threads gain little for a model this small. DEMO_THREADS overrides.
export OMP_NUM_THREADS=${DEMO_THREADS:-1}

echo "== training on builtin:digits into $RUN_DIR (settings: $HERE/configs/digits.toml)"
# --force: the demo folder is the demo's own; every `make demo` starts from scratch (same seed, same model).
# The progress bar goes to stderr; stdout carries one line naming the EMA checkpoint.
TRAIN_OUT=$("$DDPMCTL" train --config "$HERE/configs/digits.toml" --out "$RUN_DIR" --force)
CKPT=${TRAIN_OUT##*EMA checkpoint: }
echo "checkpoint: $CKPT"

echo "== sampling 64 digits with DDIM, 50 steps"
"$DDPMCTL" sample "$CKPT" -o "$RUN_DIR/samples" --sampler ddim --steps 50 -n 64 --seed 0 --force --quiet
echo "sample grid: $RUN_DIR/samples/grid.png"

echo "== bits/dim on the held-out digits (variational bound; KL terms importance-sampled, 64 per image)"
"$DDPMCTL" eval-nll "$CKPT" --estimator mc --quiet

echo "done: checkpoint $CKPT, grid $RUN_DIR/samples/grid.png"
