#!/usr/bin/env bash
# The resolution-extrapolation showcase (docs/guides/extrapolation.md, "The showcase"): two bases
# of the shapes model at 16x16 -- shapes-extrapolate.yaml, and shapes-trainopts.yaml with the
# training-time options under the same budget -- then every method at 32x32 (2x) and 64x64 (4x):
# zero-shot policies (RoPE scaling, entropy scaling, structural), multi-stage sampling, and four
# fine-tunes with the same small budget. Three reports and a summary go to docs/extrapolation/
# (OUT). Run from the repository root. It runs two lanes of one CPU thread each, side by side
# (on 2 cores two 1-thread processes do 1.3-1.4x the work of one 2-thread process for this small
# model); LANES=1 runs them one after the other. Each stage's wall time is printed.
# SMOKE=1: a few steps and samples per stage, to check the pipeline in minutes (not the report).
set -euo pipefail
OUT=${OUT:-docs/extrapolation}
RUNS=${RUNS:-runs}
LANES=${LANES:-2}
if [[ -z "${DITKIT:-}" ]]; then  # the set-up's venv, else ditkit on the PATH
    if [[ -x .venv/bin/ditkit ]]; then DITKIT=.venv/bin/ditkit; else DITKIT=ditkit; fi
fi
if [[ "${SMOKE:-0}" == 1 ]]; then
    TRAIN=(--steps 20 --set checkpoint.every=20)
    FT=(--steps 4 --set checkpoint.every=4)
    COUNT=(--count 20 --count-at 64=10 --bootstrap 50)
    STEPS=4
else
    TRAIN=()
    FT=()
    COUNT=(--count 500 --count-at 64=200)
    STEPS=20
fi
LAST=$(python3 -c "import re,sys; print(int(re.search(r'steps: (\d+)', open(sys.argv[1]).read()).group(1)))" \
    examples/experiments/shapes-extrapolate.yaml)
[[ "${SMOKE:-0}" == 1 ]] && LAST=20
BASE_CKPT="$RUNS/shapes/checkpoints/step-$(printf %06d "$LAST")/ema.safetensors"
COMMON=(--metrics shapes --sampler dpmpp_2m --steps "$STEPS" --grid-count 10 --threads 1
    --no-progress "${COUNT[@]}")
stage() { local t0=$SECONDS; "$@"; echo "== $((SECONDS - t0)) s: ${*:1:3}" >&2; }
PIDS=()
lane() {  # run a lane in the background (LANES=2) or now (LANES=1)
    if [[ "$LANES" -ge 2 ]]; then
        "$@" &
        PIDS+=($!)
    else
        "$@"
    fi
}
join() {  # wait for the lanes; stop if one failed
    local pid failed=0
    for pid in "${PIDS[@]}"; do wait "$pid" || failed=1; done
    PIDS=()
    if [[ $failed == 1 ]]; then echo "a lane failed: see its messages above" >&2; exit 1; fi
}
finetune() {  # a fine-tune of the base A checkpoint (the yaml names runs/shapes/.../step-N)
    local name=$1 out=${2:-ft-$1}
    shift $(($# < 2 ? $# : 2))
    stage "$DITKIT" train "examples/experiments/shapes-finetune-$name.yaml" --out "$RUNS/$out" \
        --set "finetune.checkpoint=$(realpath -m "$BASE_CKPT")" --threads 1 --no-progress \
        "${FT[@]}" "$@"
}

# 1. The two bases, side by side.
lane stage "$DITKIT" train examples/experiments/shapes-extrapolate.yaml --out "$RUNS/shapes" \
    --threads 1 --no-progress "${TRAIN[@]}"
lane stage "$DITKIT" train examples/experiments/shapes-trainopts.yaml --out "$RUNS/shapes-trainopts" \
    --threads 1 --no-progress "${TRAIN[@]}"
join

# 2. Lane 1: base A, every zero-shot policy at 2x and 4x, single-pass and multi-stage (draft at
#    16x16, enlarge, re-noise to sigma 0.5 and finish; and 16 -> 32 -> 64 for 4x).
lane stage "$DITKIT" extrapolate "$RUNS/shapes" --resolutions 16,32,64 \
    --policies "as_is,as_is:rope_scaling=ntk,as_is:rope_scaling=yarn,\
as_is:rope_scaling=ntk(time_exponent=1.0),as_is:attention_scaling=entropy,add_levels,core_patch,\
core_patch:rope_scaling=ntk,attention_scaling=entropy" \
    --stages 16,32:0.5 16,64:0.5 16,32:0.5,64:0.5 --stage-policies as_is,add_levels,core_patch \
    --latency-batch 32 --attention-backend tiled "${COMMON[@]}" --out "$OUT/shapes-zero-shot"

# 3. Lane 2: the three fine-tunes at 32x32 (300 steps of batch 32 each) and core_patch's at
#    64x64 (the same budget), their report beside zero-shot core_patch; then base B (the
#    training-time options) under the same methods.
lane_two() {
    finetune core-patch
    finetune add-levels
    finetune all
    finetune core-patch ft4-core-patch --set "finetune.resolution=[64,64]"
    stage "$DITKIT" extrapolate "$RUNS/shapes" --resolutions 16,32,64 --policies core_patch \
        --finetuned "$RUNS/ft-core-patch,$RUNS/ft-add-levels,$RUNS/ft-all,$RUNS/ft4-core-patch" \
        --no-measure "${COMMON[@]}" --out "$OUT/shapes-finetuned"
    stage "$DITKIT" extrapolate "$RUNS/shapes-trainopts" --resolutions 16,32,64 \
        --policies as_is,as_is:rope_scaling=ntk,as_is:attention_scaling=entropy,add_levels,core_patch \
        --stages 16,32:0.5 16,64:0.5 --stage-policies as_is,core_patch \
        --no-measure "${COMMON[@]}" --out "$OUT/shapes-trainopts"
}
lane lane_two
join

# 4. The summary: the best method per base and scale, single-pass / multi-stage / fine-tuned,
#    against the targets.
stage "$(dirname "$(command -v "$DITKIT")")/python" examples/experiments/showcase_summary.py "$OUT"
echo "== total $SECONDS s" >&2
