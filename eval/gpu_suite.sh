#!/usr/bin/env bash
# GPU measurements of the closing notes and the README, in sections that fit one device call each.
#   bash eval/gpu_suite.sh bench OUTDIR    speed: generation, training MFU, trace replay (random weights)
#   bash eval/gpu_suite.sh quality OUTDIR  needs the embedded model: train mixed-view adapters,
#                                          accuracy and teacher-forced comparison per mode
#                                          (EVALS="mixed" skips the shipped adapters' evaluation)
#   bash eval/gpu_suite.sh scienceqa OUTDIR  adapters on the published ScienceQA role files and the
#                                          teacher-forced comparison on them
#   bash eval/gpu_suite.sh scienceqa_views OUTDIR    ScienceQA agents: adapters in the agent,
#                                          shared and mixed views, each answering the 360 published
#                                          questions in every mode (~8 min)
#   bash eval/gpu_suite.sh scienceqa_recipes OUTDIR  then frozen and independent A in the best
#                                          view and the teacher-forced comparison (~6 min);
#                                          scienceqa_agents runs both stages
# Each step has its own time limit so one slow step cannot take the others down.
MEM_FRACTION=0.9
TAIL=40
source "$(dirname "$0")/gpu_common.sh"
case "${1:-}" in
  bench)
    step 60 python3 -m eval.check_gpu_paths
    step 90 python3 -m eval.bench_generate --model smollm2_135m --batch 1,16 --context 512 \
      --new 128 --out "$OUT/generate_smollm2.json"
    step 120 python3 -m eval.bench_generate --model llama3_1_8b --batch 1 --context 2048 --new 64 \
      --no-floors --out "$OUT/generate_llama8b.json"
    step 110 python3 -m train.benchmark --case llama-3.1-8b:8:4096:1:full \
      --case llama-3.1-8b:8:4096:1:dots --steps 4 --json "$OUT/train_benchmark.json"
    step 170 python3 -m eval.efficiency --model llama3_1_8b --lengths 16384 --repeats 2 \
      --out "$OUT/efficiency_llama8b_16k.json"
    ;;
  quality)
    # resumable: run it again with the same OUTDIR to finish a training cut by the time limit
    step 420 python3 -m train --view mixed --remat full --epochs 1 --kb-train 1600 \
      --batch-size 32 --eval-batch-size 64 --lr 1e-3 --max-len 1024 --bucket-multiple 64 \
      --bucket-ratio 1.5 --save-every 100 --resume --export-dtype bfloat16 --seed 0 \
      --variant joint --no-progress --out "$OUT/train_mixed"
    for name in ${EVALS:-shipped mixed}; do
      adapters=lragent_jax/assets/adapters/smollm2-135m-kb
      [ "$name" = mixed ] && adapters="$OUT/train_mixed/adapters"
      [ -d "$adapters" ] || { echo "=== no adapters at $adapters (training unfinished)"; continue; }
      step 240 python3 -m eval --parts accuracy,teacher_forced --questions 32 --batch 32 \
        --tf-episodes 12 --dtype bfloat16 --adapters "$adapters" --no-plots \
        --overwrite --out "$OUT/eval_$name"
    done
    ;;
  scienceqa)
    # the published role files, unpacked outside the repository (never committed)
    mkdir -p /tmp/lragent-data && tar xzf .carry/sqa/scienceqa.tgz -C /tmp/lragent-data
    step 200 python3 -m train --data /tmp/lragent-data/scienceqa --max-len 2048 --epochs 1 \
      --batch-size 16 --lr 1e-3 --remat full --no-progress --out "$OUT/train_scienceqa"
    step 280 python3 -m eval --parts scienceqa --scienceqa-dir /tmp/lragent-data/scienceqa \
      --scienceqa-adapters "$OUT/train_scienceqa/adapters" --scienceqa-samples 26 \
      --dtype bfloat16 --no-plots --overwrite --out "$OUT/eval_scienceqa"
    ;;
  scienceqa_views|scienceqa_recipes|scienceqa_agents)
    # ScienceQA agents end to end, in two stages that fit one device call each (scienceqa_agents
    # runs both). Resumable: a set whose adapters or results are already in OUTDIR is skipped.
    #   scienceqa_views    adapters in the agent, shared and mixed views (shared A, joint), each
    #                      answering the 360 published questions in every mode (+ the no-adapter
    #                      baseline once)                                  (~8 min on one H200)
    #   scienceqa_recipes  frozen and independent A in the best view (VIEW= overrides; the best is
    #                      the highest base+LR shared accuracy), the agents on them, and the
    #                      teacher-forced comparison of the best view's joint set     (~6 min)
    # Estimated from the H100 ScienceQA run (~10 s per compiled training shape, 7 s of compute per
    # agent-view epoch, 2.6x that in the shared view) and ~4-5 s per lockstep batch of 240 episodes
    # at 6 steps: training 85 + 95 + 50 s, agents 140 + 50 + 50 s; then training 60 + 90 s, agents
    # 35 + 75 s, teacher-forced 60 s. Knobs: EPOCHS (1), RUNS per question (1; each more adds
    # ~40 s per set), QUESTIONS (360).
    # Needs scienceqa/ and scienceqa-eval/ of the published trajectories under $DATA, or tarballs
    # of them in .carry/sqa/ (unpacked there; never committed).
    DATA=${DATA:-/tmp/lragent-data}
    mkdir -p "$DATA"
    for t in .carry/sqa/*.tgz; do [ -f "$t" ] && tar xzf "$t" -C "$DATA"; done
    if [ ! -f "$DATA/scienceqa/plan.json" ] || [ ! -f "$DATA/scienceqa-eval/grade1-4.json" ]; then
      echo "=== no scienceqa/ and scienceqa-eval/ under $DATA" >&2; exit 2
    fi
    # the sets share shapes: compile once (kept on the machine, not in OUTDIR)
    export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/lragent-jax-cache}
    EPOCHS=${EPOCHS:-1}; RUNS=${RUNS:-1}; QUESTIONS=${QUESTIONS:-360}
    sqa_train() {  # NAME VIEW VARIANT LIMIT
      [ -f "$OUT/train_$1/adapters/lragent_adapters.json" ] && {
        echo "=== $1: adapters already trained"; return; }
      step "$4" python3 -m train --data "$DATA/scienceqa" --view "$2" --variant "$3" \
        --epochs "$EPOCHS" --max-len 2048 --bucket-multiple 512 --bucket-ratio 2 --batch-size 16 \
        --eval-batch-size 64 --lr 1e-3 --remat full --save-every 100000 --keep 1 \
        --export-dtype bfloat16 --seed 0 --no-progress --no-plot --resume --out "$OUT/train_$1"
    }
    sqa_set() {  # NAME VIEW VARIANT TRAIN_LIMIT EVAL_LIMIT [eval flags]
      local name=$1 eval_limit=$5
      sqa_train "$1" "$2" "$3" "$4"; shift 5
      [ -d "$OUT/train_$name/adapters" ] || { echo "=== no adapters for $name"; return; }
      grep -qs traces_file "$OUT/eval_$name/scienceqa_agents.json" && {
        echo "=== $name: agents already evaluated"; return; }
      step "$eval_limit" python3 -m eval --parts scienceqa_agents \
        --scienceqa-dir "$DATA/scienceqa" --scienceqa-eval-dir "$DATA/scienceqa-eval" \
        --scienceqa-adapters "$OUT/train_$name/adapters" --sqa-questions "$QUESTIONS" \
        --sqa-runs "$RUNS" --sqa-temperature 0.7 --sqa-max-steps 6 --sqa-batch 240 \
        --sqa-capacity 4096 --min-bucket 128 --dtype bfloat16 --no-plots \
        --out "$OUT/eval_$name" "$@"
    }
    if [ "$1" != scienceqa_recipes ]; then
      sqa_set agent agent joint 170 280
      sqa_set shared shared joint 190 150 --no-sqa-baseline
      sqa_set mixed mixed joint 120 150 --no-sqa-baseline
    fi
    if [ "$1" != scienceqa_views ]; then
      best=${VIEW:-$(python3 - "$OUT" <<'PY'
import json, sys
best = ("mixed", -1.0, 0.0)  # mixed when no view has results
for view in ("agent", "shared", "mixed"):
    try:
        modes = json.load(open(f"{sys.argv[1]}/eval_{view}/scienceqa_agents.json"))["modes"]
        lr = modes["base_lowrank_shared"]
        key = (lr["accuracy"], -abs(lr.get("vs_non_shared", {}).get("difference", 0.0)))
    except (OSError, KeyError, ValueError):
        continue
    if key > best[1:]:
        best = (view, *key)
print(best[0])
PY
)}
      echo "=== best view for base+LR sharing: $best"
      sqa_set "frozen_$best" "$best" frozen 130 100 --no-sqa-baseline \
        --modes non_shared,base_lowrank_shared
      sqa_set "independent_$best" "$best" independent 170 150 --no-sqa-baseline \
        --modes non_shared,base_shared
      sqa_train "$best" "$best" joint 190
      [ -f "$OUT/tf_$best/results.json" ] || step 150 python3 -m eval --parts scienceqa \
        --scienceqa-dir "$DATA/scienceqa" --scienceqa-adapters "$OUT/train_$best/adapters" \
        --scienceqa-samples 26 --dtype bfloat16 --no-plots --out "$OUT/tf_$best"
    fi
    python3 - "$OUT" <<'PY'
import glob, json, os, sys
rows = {}
for path in sorted(glob.glob(f"{sys.argv[1]}/eval_*/scienceqa_agents.json")):
    result = json.load(open(path))
    name = os.path.basename(os.path.dirname(path))[5:]
    print(f"{name}: {result['questions']} questions x {result['runs']} run(s), chance "
          f"{result['chance']:.3f}")
    for mode, v in result["modes"].items():
        d = v.get("vs_non_shared", {})
        gap, gap_se = (100 * d.get(k, float("nan")) for k in ("difference", "stderr"))
        print(f"  {mode:20s} {100 * v['accuracy']:5.1f} ± {100 * v['stderr']:.1f}  vs non-shared "
              f"{gap:+5.1f} ± {gap_se:.1f}  unfinished {v['unfinished_share']:.2f}  malformed "
              f"{v['malformed_share']:.2f}")
        rows.setdefault(name, {})[mode] = {k: v[k] for k in ("accuracy", "stderr",
                                                             "unfinished_share", "malformed_share")}
json.dump(rows, open(f"{sys.argv[1]}/scienceqa_agents_summary.json", "w"), indent=1)
PY
    ;;
  *) echo "usage: bash eval/gpu_suite.sh bench|quality|scienceqa|scienceqa_views|scienceqa_recipes|"\
"scienceqa_agents OUTDIR" >&2; exit 2 ;;
esac
