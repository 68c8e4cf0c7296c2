#!/usr/bin/env bash
# The resolution-extrapolation showcase (docs/guides/extrapolation.md, "A trained model at resolutions it never saw"):
# train the shapes model at 16x16, fine-tune three adaptations at 32x32 with the same small
# budget, then sample, score and measure every policy at 16x16, 32x32 (2x) and 64x64 (4x) into
# docs/extrapolation/. Run from the repository root; THREADS (default 2) CPU threads; each
# stage's wall time is printed. 40 minutes on an idle 2-core machine at 2 threads; on a machine
# where another job holds a core use THREADS=1 (a 2-thread PyTorch team stalls whenever one of
# its threads is descheduled), which takes longer.
set -euo pipefail
THREADS=${THREADS:-2}
OUT=${OUT:-docs/extrapolation}
stage() { local t0=$SECONDS; "$@"; echo "== $((SECONDS - t0)) s: ${*:1:3}" >&2; }

stage ditkit train examples/experiments/shapes-extrapolate.yaml --out runs/shapes \
    --threads "$THREADS" --no-progress
for ft in core-patch add-levels all; do
    stage ditkit train "examples/experiments/shapes-finetune-$ft.yaml" --out "runs/ft-$ft" \
        --threads "$THREADS" --no-progress
done
stage ditkit extrapolate runs/shapes --metrics shapes \
    --resolutions 16,32,64 \
    --policies as_is,as_is:rope=extrapolate,local_core:kernel_size=3,add_levels,add_levels:share_weights=true,core_patch \
    --finetuned runs/ft-core-patch,runs/ft-add-levels,runs/ft-all \
    --count 500 --count-at 64=100 --sampler dpmpp_2m --steps 20 --grid-count 10 \
    --latency-batch 32 --attention-backend tiled --threads "$THREADS" --no-progress \
    --out "$OUT"
echo "== total $SECONDS s" >&2
