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
#                                          questions in every mode (~9.5 min on an H200)
#   bash eval/gpu_suite.sh scienceqa_recipes OUTDIR  then frozen and independent A in the best
#                                          view and the teacher-forced comparison (~5 min);
#                                          scienceqa_agents runs both stages
#   bash eval/gpu_suite.sh scienceqa_runs OUTDIR     the best view again with RUNS=8 sampled
#                                          runs per question (standard errors near 1 point)
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
      --batch 80 --min-bucket 128 --dtype bfloat16 --no-plots --overwrite \
      --out "$OUT/eval_scienceqa"
    ;;
  scienceqa_views|scienceqa_recipes|scienceqa_agents|scienceqa_runs)
    # ScienceQA agents end to end, in stages that fit one device call each (scienceqa_agents
    # runs views and recipes). Resumable: a set whose adapters or results are already in OUTDIR
    # is skipped, so a stage cut by a call's limit goes on where it stopped when run again.
    #   scienceqa_views    adapters in the agent, shared and mixed views (shared A, joint), each
    #                      answering the 360 published questions in every mode, non-shared and
    #                      base+LR shared first (+ the no-adapter baseline once)
    #   scienceqa_recipes  frozen and independent A in the best view (VIEW= overrides; the best is
    #                      the base+LR shared accuracy closest to non-shared's, then the highest),
    #                      the agents on them, and the teacher-forced comparison of the best
    #                      view's joint set
    #   scienceqa_runs     the best view's joint set again with RUNS (default 8) sampled runs per
    #                      question in SQA_MODES (default non_shared,base_lowrank_shared): the
    #                      standard error of one run is 2.4-2.6 points, of the paired difference
    #                      3.2-3.4; 12 runs: 1.0-1.4 and 1.5, 6.4 min for the two modes (H200)
    # Measured on one H200 (2026-12-01, 1 run per question): training 34-48 s a set (117 steps,
    # compilation included); the agents 73-81 s a mode in the first set (compiling), 22-36 s a
    # mode after it (the compilation cache below). So views ~9.5 min (agent 48 + 5 x 75 s, the
    # others 45 + 4 x 30 s), recipes ~5 min, runs ~RUNS x 25 s a mode.
    # SHIPPED=1: the mixed joint set is the shipped lragent_jax/assets/adapters/smollm2-135m-scienceqa
    # (made by this recipe), not retrained (bf16 training on a GPU is not bit-exact).
    # Knobs: EPOCHS (1), RUNS per question (1), QUESTIONS (360), SQA_MODES, TRAIN_EXTRA (more train
    # flags, e.g. a smoke run's "--batch-size 2 --max-steps 2 --valid-samples 4") and LIMIT_SCALE
    # (gpu_common.sh; a CPU smoke run with QUESTIONS=3 needs about 10).
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
    EPOCHS=${EPOCHS:-1}; QUESTIONS=${QUESTIONS:-360}
    RUNS=${RUNS:-$([ "$1" = scienceqa_runs ] && echo 8 || echo 1)}
    ALL_MODES=non_shared,base_lowrank_shared,fully_shared,base_shared  # the key pair first
    TRAIN_EXTRA=${TRAIN_EXTRA:-}
    sqa_train() {  # NAME VIEW VARIANT LIMIT
      [ -f "$OUT/train_$1/adapters/lragent_adapters.json" ] && {
        echo "=== $1: adapters already trained"; return; }
      if [ "$1" = mixed ] && [ "${SHIPPED:-0}" = 1 ]; then  # the shipped set is this recipe's
        mkdir -p "$OUT/train_mixed" && cp -r lragent_jax/assets/adapters/smollm2-135m-scienceqa \
          "$OUT/train_mixed/adapters" && echo "=== mixed: the shipped adapters" && return
      fi
      step "$4" python3 -m train --data "$DATA/scienceqa" --view "$2" --variant "$3" \
        --epochs "$EPOCHS" --max-len 2048 --bucket-multiple 512 --bucket-ratio 2 --batch-size 16 \
        --eval-batch-size 64 --lr 1e-3 --remat full --save-every 100000 --keep 1 \
        --export-dtype bfloat16 --seed 0 --no-progress --no-plot --resume --out "$OUT/train_$1" \
        $TRAIN_EXTRA
    }
    sqa_set() {  # NAME VIEW VARIANT TRAIN_LIMIT EVAL_LIMIT [eval flags]
      local name=$1 eval_limit=$5 src=${ADAPTERS_OF:-$1}  # src: the set whose adapters it uses
      sqa_train "$src" "$2" "$3" "$4"; shift 5
      [ -d "$OUT/train_$src/adapters" ] || { echo "=== no adapters for $src"; return; }
      grep -qs traces_file "$OUT/eval_$name/scienceqa_agents.json" && {
        echo "=== $name: agents already evaluated"; return; }
      step "$eval_limit" python3 -m eval --parts scienceqa_agents \
        --scienceqa-dir "$DATA/scienceqa" --scienceqa-eval-dir "$DATA/scienceqa-eval" \
        --scienceqa-adapters "$OUT/train_$src/adapters" \
        --sqa-questions "$QUESTIONS" --sqa-runs "$RUNS" --sqa-temperature 0.7 \
        --sqa-max-steps 6 --sqa-batch 240 --sqa-capacity 4096 --min-bucket 128 \
        --dtype bfloat16 --no-plots --overwrite --out "$OUT/eval_$name" --modes "$ALL_MODES" "$@"
    }
    best_view() {  # the view whose base+LR shared accuracy is closest to non-shared's
      python3 - "$OUT" <<'PY'
import json, sys
best = ("mixed", -1.0, -1.0)  # mixed when no view has results
for view in ("agent", "shared", "mixed"):
    try:
        modes = json.load(open(f"{sys.argv[1]}/eval_{view}/scienceqa_agents.json"))["modes"]
        lr = modes["base_lowrank_shared"]
        key = (-abs(lr["vs_non_shared"]["difference"]), lr["accuracy"])
    except (OSError, KeyError, ValueError, TypeError):
        continue
    if key > best[1:]:
        best = (view, *key)
print(best[0])
PY
    }
    if [ "$1" = scienceqa_views ] || [ "$1" = scienceqa_agents ]; then
      sqa_set agent agent joint 170 420
      sqa_set shared shared joint 190 180 --no-sqa-baseline
      sqa_set mixed mixed joint 120 180 --no-sqa-baseline
    fi
    if [ "$1" = scienceqa_recipes ] || [ "$1" = scienceqa_agents ]; then
      best=${VIEW:-$(best_view)}
      echo "=== best view for base+LR sharing: $best"
      ALL_MODES=non_shared,base_lowrank_shared sqa_set "frozen_$best" "$best" frozen 130 120 \
        --no-sqa-baseline
      # one A per agent has no low-rank cache to share: base_shared is its shared mode
      ALL_MODES=non_shared,base_shared sqa_set "independent_$best" "$best" independent 170 150 \
        --no-sqa-baseline
      sqa_train "$best" "$best" joint 190
      grep -qs '"scienceqa": {' "$OUT/tf_$best/results.json" || step 150 python3 -m eval --parts scienceqa --scienceqa-dir "$DATA/scienceqa" \
          --scienceqa-adapters "$OUT/train_$best/adapters" --scienceqa-samples 26 \
          --batch 80 --min-bucket 128 --dtype bfloat16 --no-plots --overwrite --out "$OUT/tf_$best"
    fi
    if [ "$1" = scienceqa_runs ]; then
      best=${VIEW:-$(best_view)}
      echo "=== $RUNS runs per question, the $best view's joint adapters"
      ALL_MODES=${SQA_MODES:-non_shared,base_lowrank_shared} ADAPTERS_OF=$best \
        sqa_set "runs${RUNS}_$best" "$best" joint 190 570 --no-sqa-baseline
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
"scienceqa_runs|scienceqa_agents OUTDIR" >&2; exit 2 ;;
esac
