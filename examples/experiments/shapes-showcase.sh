#!/usr/bin/env bash
# The resolution-extrapolation showcase (docs/guides/extrapolation.md, "The showcase"): two bases
# of the shapes model at 16x16 -- shapes-extrapolate.yaml, and shapes-trainopts.yaml with the
# training-time options under the same budget -- then every method at 32x32 (2x) and 64x64 (4x):
# zero-shot policies (RoPE scaling, entropy scaling, structural), multi-stage sampling, and each
# of the eight single-pass methods fine-tuned with the same small budget at 2x and at 4x. Three
# reports and a summary go to docs/extrapolation/ (OUT). Run from the repository root. It runs
# two lanes of one CPU thread each, side by side (on 2 cores two 1-thread processes do 1.3-1.4x
# the work of one 2-thread process for this small model); LANES=1 runs them one after the other.
# Each stage's wall time is printed.
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
    REFINE=2
else
    TRAIN=()
    FT=()
    COUNT=(--count 500 --count-at 64=200)
    STEPS=20
    REFINE=10  # steps of a multi-stage row's refinement from sigma 0.5
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
# The methods, each fine-tuned with the same small budget at 2x and at 4x: NAME|YAML|POLICY (the
# yaml's own policy when POLICY is empty; as_is tunes every tensor, add_levels and core_patch
# their new or replicated ones).
METHODS=(
    "as-is|all|"
    "as-is-ntk|all|{kind: as_is, rope_scaling: {kind: ntk}}"
    "as-is-yarn|all|{kind: as_is, rope_scaling: {kind: yarn}}"
    "as-is-ntk-time|all|{kind: as_is, rope_scaling: {kind: ntk, time_exponent: 1.0}}"
    "as-is-entropy|all|{kind: as_is, attention_scaling: entropy}"
    "add-levels|add-levels|"
    "core-patch|core-patch|"
    "core-patch-ntk-entropy|core-patch|{kind: core_patch, rope_scaling: {kind: ntk}, attention_scaling: entropy}"
)
CHEAP=() EVERY=()  # the methods that tune only new or replicated tensors / every parameter
for m in "${METHODS[@]}"; do
    IFS='|' read -r _ yaml _ <<<"$m"
    if [[ "$yaml" == all ]]; then EVERY+=("$m"); else CHEAP+=("$m"); fi
done
finetune() {  # SCALE METHOD...: fine-tune base A (200 steps of 32x32x32 pixels) into RUNS/ftSCALE-NAME
    local scale=$1 m name yaml policy
    shift
    for m in "$@"; do
        IFS='|' read -r name yaml policy <<<"$m"
        local args=(--set "finetune.checkpoint=$(realpath -m "$BASE_CKPT")")
        [[ -n "$policy" ]] && args+=(--set "finetune.policy=$policy")
        [[ "$scale" == 4 ]] && args+=(--set "finetune.resolution=[64,64]" --set training.batch_size=8)
        stage "$DITKIT" train "examples/experiments/shapes-finetune-$yaml.yaml" \
            --out "$RUNS/ft$scale-$name" --threads 1 --no-progress "${args[@]}" "${FT[@]}"
    done
}

# 1. The two bases, side by side.
lane stage "$DITKIT" train examples/experiments/shapes-extrapolate.yaml --out "$RUNS/shapes" \
    --threads 1 --no-progress "${TRAIN[@]}"
lane stage "$DITKIT" train examples/experiments/shapes-trainopts.yaml --out "$RUNS/shapes-trainopts" \
    --threads 1 --no-progress "${TRAIN[@]}"
join

# 2. Lane 1: the three cheap fine-tunes at 2x (only new or replicated tensors train); then base
#    A under every zero-shot policy at 2x and 4x, single-pass and multi-stage (every policy:
#    draft at 16x16 with 20 steps, enlarge, re-noise to sigma 0.5 and finish with 10 steps);
#    then base B (the training-time options) under as_is, core_patch and as_is's stages.
FLAG="$RUNS/.lane-1-finetunes-done"
rm -f "$FLAG"
lane_one() {
    finetune 2 "${CHEAP[@]}"
    touch "$FLAG"
    stage "$DITKIT" extrapolate "$RUNS/shapes" --resolutions 16,32,64 \
        --policies "as_is,as_is:rope_scaling=ntk,as_is:rope_scaling=yarn,\
as_is:rope_scaling=ntk(time_exponent=1.0),as_is:attention_scaling=entropy,add_levels,core_patch,\
core_patch:rope_scaling=ntk,attention_scaling=entropy" \
        --stages "16,32:0.5:$REFINE" "16,64:0.5:$REFINE" \
        --latency-batch 32 --attention-backend tiled "${COMMON[@]}" --out "$OUT/shapes-zero-shot"
    stage "$DITKIT" extrapolate "$RUNS/shapes-trainopts" --resolutions 16,32,64 \
        --policies as_is,core_patch --stages "16,32:0.5:$REFINE" "16,64:0.5:$REFINE" --stage-policies as_is \
        --no-measure --attention-backend tiled "${COMMON[@]}" --out "$OUT/shapes-trainopts"
}
lane lane_one
LANE_ONE=${PIDS[0]:-}

# 3. Lane 2: the other 13 fine-tunes (the five as_is variants at 2x, all eight at 4x); then,
#    once lane 1's three are done, the report of the 16 fine-tuned models at their resolution
#    (the zero-shot rows are in shapes-zero-shot, drawn with the same seeds and labels).
lane_two() {
    finetune 2 "${EVERY[@]}"
    finetune 4 "${METHODS[@]}"
    while [[ ! -e "$FLAG" ]]; do  # lane 1's fine-tunes; stop if lane 1 stopped without them
        if [[ -n "$LANE_ONE" ]] && ! kill -0 "$LANE_ONE" 2>/dev/null; then
            echo "lane 1 stopped before its fine-tunes were done" >&2
            return 1
        fi
        sleep 5
    done
    local runs=() m scale
    for scale in 2 4; do
        for m in "${METHODS[@]}"; do runs+=("$RUNS/ft$scale-${m%%|*}"); done
    done
    stage "$DITKIT" extrapolate "$RUNS/shapes" --resolutions 16 --policies as_is \
        --finetuned "$(IFS=,; echo "${runs[*]}")" --no-measure --attention-backend tiled \
        "${COMMON[@]}" --out "$OUT/shapes-finetuned"
}
lane lane_two
join

# 4. The summary: the best method per base and scale, single-pass / multi-stage / fine-tuned,
#    against the targets.
stage "$(dirname "$(command -v "$DITKIT")")/python" examples/experiments/showcase_summary.py "$OUT"
echo "== total $SECONDS s" >&2
