#!/usr/bin/env bash
# GPU measurements of the closing notes and the README, in sections that fit one device call each.
#   bash eval/gpu_suite.sh bench OUTDIR    speed: generation, training MFU, trace replay (random weights)
#   bash eval/gpu_suite.sh quality OUTDIR  needs the embedded model: train mixed-view adapters,
#                                          accuracy and teacher-forced comparison per mode
#                                          (EVALS="mixed" skips the shipped adapters' evaluation)
#   bash eval/gpu_suite.sh scienceqa OUTDIR  adapters on the published ScienceQA role files and the
#                                          teacher-forced comparison on them
# Each step has its own time limit so one slow step cannot take the others down.
set -u
OUT=${2:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
step() { local limit=$1; shift; echo "=== $* (limit ${limit}s)"; local t0=$(date +%s)
         timeout "$limit" "$@" 2>&1 | tail -n 40; echo "=== done in $(( $(date +%s) - t0 ))s"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
case "${1:-}" in
  bench)
    step 60 python3 -m eval.check_gpu_paths
    step 90 python3 -m eval.bench_generate --model smollm2_135m --batch 1,16 --prompt 512 \
      --new 128 --out "$OUT/generate_smollm2.json"
    step 120 python3 -m eval.bench_generate --model llama3_1_8b --batch 1 --prompt 2048 --new 64 \
      --no-bandwidth --out "$OUT/generate_llama8b.json"
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
  *) echo "usage: bash eval/gpu_suite.sh bench|quality|scienceqa OUTDIR" >&2; exit 2 ;;
esac
