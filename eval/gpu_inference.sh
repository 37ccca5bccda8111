#!/usr/bin/env bash
# GPU runs behind the inference-speed results (per-layer decode layout, attention dispatch), in
# sections that each fit one device call (10 minutes).
#   bash eval/gpu_inference.sh check OUTDIR      correctness on the GPU: kernel grid compiled for
#                                                real, dispatched sessions vs reference, cuDNN paths
#   bash eval/gpu_inference.sh explore OUTDIR    decode variants: stop-check block, XLA command
#                                                buffers; 8B decode with and without adapters
#   bash eval/gpu_inference.sh decode OUTDIR     the decode table (8B batch 1/16/64, 2k-32k, with and
#                                                without adapters; SmolLM2), launches per layer
#   bash eval/gpu_inference.sh kernels OUTDIR    attention dispatch thresholds, prefill vs cuDNN
#   bash eval/gpu_inference.sh replay OUTDIR     3-agent episode replay, 8B shape, 16k
#   bash eval/gpu_inference.sh throughput OUTDIR many episodes through the rollout engine, 8B, 16k
#   bash eval/gpu_inference.sh call2 OUTDIR      kernels + replay + throughput (one device call)
#   bash eval/gpu_inference.sh serve OUTDIR      the HTTP layer's cost: 3-role 16k episodes from 8
#                                                HTTP clients vs the in-process engine, 8B shape,
#                                                one process per mode (a mode cut by its limit
#                                                leaves the other's figures)
#   bash eval/gpu_inference.sh modes OUTDIR      throughput at the largest row count, base+LR vs
#                                                fully and base shared, 8B, 16k
#   bash eval/gpu_inference.sh lengths OUTDIR    throughput at 8k and 32k (one step each), merged
#                                                with the 16k run of eval/results/h200-2026-12-01:
#                                                the episodes/s-against-length plot
#   bash eval/gpu_inference.sh lane OUTDIR       the packed long-prefill lane: caches with and
#                                                without it in every mode (GPU check), one call's
#                                                seconds with and without it, 8B shape, base+LR
#   bash eval/gpu_inference.sh kb OUTDIR         the built-in task's 256 episodes on the embedded
#                                                SmolLM2 with the shipped adapters (needs the
#                                                model file: LRAGENT_DEFAULT_MODEL)
# Each step has its own time limit so one slow step cannot take the others down.
MEM_FRACTION=0.92
TAIL=30
source "$(dirname "$0")/gpu_common.sh"
GEN="python3 -m eval.bench_generate"
case "${1:-}" in
  check)
    step 150 python3 -m eval.check_gpu_paths
    XLA_FLAGS=--xla_gpu_autotune_level=0 step 330 python3 -m pytest -q -x -p no:cacheprovider \
      tests/test_flash_lora_attention.py
    ;;
  explore)
    step 150 $GEN --model smollm2_135m --batch 1 --context 512 --new 64 --decode-block 1,4,8,16 \
      --out "$OUT/explore_smollm2_blocks.json"
    XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL \
      step 120 $GEN --model smollm2_135m --batch 1 --context 512 --new 64 --decode-block 1,8 \
      --no-floors --out "$OUT/explore_smollm2_cmdbuf.json"
    step 240 $GEN --model llama3_1_8b --batch 1 --context 2048 --new 32 --adapters none,lora \
      --repeats 3 --out "$OUT/explore_llama8b.json"
    ;;
  decode)
    step 100 python3 -m eval.decode_profile --model smollm2_135m --layers 2,4 --time-layers 10,30 \
      --out "$OUT/decode_profile_smollm2.json"
    step 330 $GEN --model llama3_1_8b --new 32 --repeats 3 --cases \
      1:2048:none,1:2048:lora,1:16384:none,1:16384:lora,1:32768:none,1:32768:lora,16:2048:none,16:2048:lora,64:2048:none,64:2048:lora \
      --out "$OUT/decode_llama8b.json"
    step 90 $GEN --model smollm2_135m --batch 1,16 --context 512 --new 64 --adapters none,lora \
      --out "$OUT/decode_smollm2.json"
    ;;
  kernels)
    step 150 python3 -m pallas_kernels.flash_lora_attention.benchmark --sections ceilings,dispatch \
      --dispatch-shapes 64:16384,256:16384,1024:16384,4096:16384 --json "$OUT/kernels_dispatch.json"
    ;;
  replay)
    step 240 python3 -m eval.efficiency --model llama3_1_8b --lengths 16384 --repeats 1 \
      --targets q,v,o,gate,up,down --out "$OUT/efficiency_llama8b_16k.json"
    ;;
  throughput)
    step 300 python3 -m eval.throughput --workloads traces --trace-model llama3_1_8b \
      --lengths 16384 --episodes 12 --warmup 2 --rows same:6,max --budget-gib 60 \
      --modes base_lowrank_shared,non_shared --no-progress --out "$OUT/throughput_8b_16k.json"
    ;;
  serve)
    # SERVE_MODES (default both), CLIENT_PROCESSES (default 1: the 8 clients in one event loop;
    # 8: one process each, as separate agents), EPISODES (default 8: one per client, a single
    # wave; 24: three per client, so that episodes start out of step on both sides), BLOCK_TOKENS
    # (default 0: a turn's rest in one call; else both sides generate in blocks). Measured on
    # an H200 with 8 episodes: 99-173 s base+LR, 169 s non-shared, before both sides compiled
    # every call program ahead (bench_serve's program warm-up, up to about 2 minutes a side cold);
    # with it and BLOCK_TOKENS=16, non-shared took 334 s with 24 episodes and 205 s with 8
    episodes=${EPISODES:-8}
    for mode in ${SERVE_MODES:-base_lowrank_shared non_shared}; do
      limit=$(( 320 + 6 * episodes )); [ $mode = non_shared ] && limit=$(( 360 + 9 * episodes ))
      step $limit python3 -m eval.bench_serve --random-weights llama3_1_8b --length 16384 \
        --episodes $episodes --clients 8 --client-processes ${CLIENT_PROCESSES:-1} --modes $mode \
        --block-tokens ${BLOCK_TOKENS:-0} \
        --out "$OUT/serve_8b_16k_${mode}_p${CLIENT_PROCESSES:-1}_e${episodes}_b${BLOCK_TOKENS:-0}.json"
    done
    ;;
  modes)
    step 300 python3 -m eval.throughput --workloads traces --trace-model llama3_1_8b \
      --lengths 16384 --episodes 12 --warmup 2 --rows max --budget-gib 60 \
      --modes base_lowrank_shared,fully_shared,base_shared --no-progress \
      --out "$OUT/throughput_8b_16k_modes.json"
    ;;
  lengths)
    # LENGTHS (default "8192 32768") for one length a call, MODES to run some modes. Measured on an H200: 8k ran past 200 s
    # (base+LR and non-shared done, fully shared cut), 32k took 314 s (non-shared fits 4 rows)
    for length in ${LENGTHS:-8192 32768}; do
      limit=270; [ $length -gt 16384 ] && limit=340
      step $limit python3 -m eval.throughput --workloads traces --trace-model llama3_1_8b \
        --lengths $length --episodes 12 --warmup 2 --rows max --budget-gib 60 \
        --modes ${MODES:-base_lowrank_shared,non_shared,fully_shared} --no-progress \
        --out "$OUT/throughput_8b_$length.json"
    done
    step 60 python3 -m eval.throughput --merge "$OUT"/throughput_8b_*.json \
      eval/results/h200-2026-12-01/throughput_8b_16k.json --out "$OUT/throughput_8b_lengths.json"
    ;;
  kb)
    # KB_ROWS (default same:64): the row rules (same:64,max adds each mode's largest count).
    # Measured on an H200: non-shared and fully shared took 245 s with their warm-up (MODES= one
    # or two modes a call, e.g. MODES=base_shared,base_lowrank_shared). KB_WARMUP (default 64,
    # one full batch): 4 warm-up episodes left 12.9 of non-shared's 30.9 timed seconds compiling
    step 420 python3 -m eval.throughput --workloads kb --kb-episodes 256 --rows ${KB_ROWS:-same:64} \
      --warmup ${KB_WARMUP:-64} \
      --modes ${MODES:-non_shared,fully_shared,base_shared,base_lowrank_shared} \
      --no-progress --out "$OUT/throughput_kb_smollm2.json"
    ;;
  lane)
    step 170 python3 -c "import sys; from eval.check_gpu_paths import check_long_lane; sys.exit(check_long_lane())"
    # LANE_LONG (default 1,2,4,7): long rows per case; with --staircase their chunks fall from
    # 8192 tokens to 8192 / n (different lengths: where packing pays over a gathered-rows lane)
    step 260 python3 -m eval.bench_long_lane --random-weights llama3_1_8b --rows 8 --capacity 16384 \
      --modes base_lowrank_shared --long ${LANE_LONG:-1,2,4,7} --lengths 8192 --staircase \
      --out "$OUT/bench_long_lane_8b_staircase.json"
    ;;
  call2)
    bash "$0" kernels "$OUT"; bash "$0" replay "$OUT"; bash "$0" throughput "$OUT"
    ;;
  *) echo "usage: bash eval/gpu_inference.sh check|explore|decode|kernels|replay|throughput|call2|serve|modes|lengths|lane|kb OUTDIR" >&2
     exit 2 ;;
esac
