#!/usr/bin/env bash
# The GPU measurements still owed by issues 13 and 17, as one script per device call (each part fits
# the device tool's 600 s limit). Run on the GPU host from the repo root, after `.mlxcuda-a/stash.sh`
# in the call before (see RESULTS.md "How to run"), with `.mlxcuda-b` and `.whl` carried: mlx-lm 0.32.2 and
# gguf 0.19.0 wheels, and the server's (the GPU host lacks starlette and friends):
#
#     pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#         --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#         starlette uvicorn pydantic httpx prometheus-client llguidance pillow pyyaml
#
#     source .mlxcuda-b/install.sh && bash benchmarks/gpu_session.sh serving    # call 2
#     source .mlxcuda-b/install.sh && bash benchmarks/gpu_session.sh decode     # call 3, right after
#
# Outputs (JSON and logs) go to $OUT.
set -u
part=${1:?long, tiled, headline, headline_short, q4_kernel, diagnose, donation, compiled, compiled_graphs, compiled_q4, profile, serving_ab, attn, next, next_short, dense, dense_short, dense_first, dense_e2e, first_use, first_gguf, thread_default, thread, thread_270m, thread_min, thread_serve, thread_q4, serving, decode, prefill, chunk, split, rows, fused, fused2, products, graphs, quantized, quantized_e2e or gguf}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu_$part.txt"
step() {  # step SECONDS NAME COMMAND...: one measurement, its log in $OUT/NAME.log (ONE_LOG=1: all in $OUT/steps.log)
  local limit=$1 name=$2 rc
  shift 2
  date -u
  timeout "$limit" "$@" > "/tmp/$name.log" 2>&1
  rc=$?
  echo "$name rc $rc"
  tail -6 "/tmp/$name.log"
  if [ -n "${ONE_LOG:-}" ]; then
    { echo "==> $name (rc $rc) <=="; cat "/tmp/$name.log"; } >> "$OUT/steps.log"
  else
    cp "/tmp/$name.log" "$OUT/$name.log"
  fi
}
headline() {  # headline BENCH_SECONDS PYSPY_SECONDS: the 8B in 4 bits through lmx bench, then py-spy on the 270M
  step "$1" against_8b_q4 python3 -m lmx.cli.main bench --against mlx-lm --config qwen3-8b --quantize 4 --device gpu \
    --rounds 5 --json
  step "$2" pyspy_270m /tmp/site/bin/py-spy record --native --threads --rate 200 --format raw \
    -o /tmp/pyspy_270m_bf16.txt -- python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m \
    --variants lmx --rounds 1 --gen-tokens 512
  step 30 pyspy_summary python3 benchmarks/pyspy_summary.py /tmp/pyspy_270m_bf16.txt --top 60 \
    --json "$OUT/pyspy_270m_bf16_summary.json"
  gzip -c /tmp/pyspy_270m_bf16.txt > "$OUT/pyspy_270m_bf16.txt.gz"
}
first_use() {  # first_use COLD_SECONDS WARM_SECONDS: gpu_first_use.py in a fresh PTX cache, then again with it warm
  rm -rf /tmp/ptx_first_use
  step "$1" first_cold env MLX_PTX_CACHE_DIR=/tmp/ptx_first_use python3 benchmarks/gpu_first_use.py --label cold \
    --json "$OUT/gpu_first_use_cold.json"
  step "$2" first_warm env MLX_PTX_CACHE_DIR=/tmp/ptx_first_use python3 benchmarks/gpu_first_use.py --label warm \
    --json "$OUT/gpu_first_use_warm.json"
}
case $part in
compiled)  # the whole step as one compiled graph with lmx's attention over its span, against the segmented step:
  # the span kernel's values, then 270M and 1B bf16 (tokens, profile, decode), then the 8B in bf16 (roofline)
  export ONE_LOG=1
  step 100 span_check python3 benchmarks/cuda_attention_check.py --json "$OUT/cuda_attention_check.json"
  step 260 compiled_small python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b \
    --variants lmx,lmx-compiled,mlx-lm --rounds 3 --profile-steps 48 --check-steps 32 \
    --json "$OUT/gpu_compiled_small.json"
  step 200 compiled_8b python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b \
    --variants lmx,lmx-compiled,mlx-lm --rounds 3 --bandwidth --check-steps 16 --json "$OUT/gpu_compiled_8b.json"
  ;;
compiled_graphs)  # where the compiled step's device time goes: whether its cache writes copy the whole storage (Qwen 3
  # 0.6B, every layer global, at 512 and 8,192 prompt tokens), then the 1B, segmented and compiled, with MLX's CUDA graphs
  # as by default, off, and one graph a step (each setting its own process)
  export ONE_LOG=1
  for n in 512 8192; do
    step 100 "compiled_06b_$n" python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-0.6b --prompt-tokens $n \
      --variants lmx,lmx-compiled --rounds 2 --json "$OUT/gpu_compiled_06b_$n.json"
  done
  for env in MLX_USE_CUDA_GRAPHS=1 MLX_USE_CUDA_GRAPHS=0 MLX_MAX_OPS_PER_BUFFER=1000; do
    name=$(echo "${env#MLX_}" | tr '=A-Z' '_a-z')
    step 110 "compiled_$name" env "$env" python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-1b \
      --variants lmx,lmx-compiled --rounds 2 --profile-steps 32 --json "$OUT/gpu_compiled_graphs_$name.json"
  done
  ;;
long)  # long context: the attention kernel's values with its keys split over blocks (and tiled, strided), each
  # way's time a call, Gemma 3 270M/1B decode after 8,192 tokens (default: tiled from 2,048 keys; strided; split)
  # against mlx-lm; then the 8B bf16 against the roofline (not measured since 19:05)
  export ONE_LOG=1
  step 170 attn_check python3 benchmarks/cuda_attention_check.py --json "$OUT/cuda_attention_check_split.json"
  step 90 attn_time python3 benchmarks/attention_kernel_time.py --json "$OUT/attention_kernel_time_split.json"
  step 200 long_gemma python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b --prompt-tokens 8192 \
    --variants lmx,lmx-strided,lmx-split,mlx-lm --rounds 2 --check-steps 16 --json "$OUT/gpu_long_gemma.json"
  step 130 roofline_8b python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b --variants lmx,mlx-lm --rounds 3 \
    --bandwidth --json "$OUT/gpu_roofline_8b.json"
  ;;
tiled)  # the attention kernel's tiled loop (KT keys a warp at once): its values (then the strided loop's), its time
  # per call against the strided loop and MLX's, end to end on the 270M and 1B bf16 against the strided loop and
  # mlx-lm; then the 8B in 4 bits through the one command (lmx's quantized product now on by default)
  export ONE_LOG=1
  step 150 attn_check python3 benchmarks/cuda_attention_check.py --json "$OUT/cuda_attention_check_tiled.json"
  step 60 attn_time python3 benchmarks/attention_kernel_time.py --json "$OUT/attention_kernel_time.json"
  step 160 tiled_small python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b \
    --variants lmx,lmx-strided,mlx-lm --rounds 3 --check-steps 16 --profile-steps 32 --json "$OUT/gpu_tiled_small.json"
  step 150 against_8b_q4 python3 -m lmx.cli.main bench --against mlx-lm --config qwen3-8b --quantize 4 --device gpu \
    --rounds 3 --json
  ;;
headline)  # with lmx's quantized product on by default: the 8B in 4 bits through the one command, 5 rounds; where the
  # step thread's encoding goes (py-spy's native frames at 200 Hz, summarized here: the raw profile is too big to
  # return); the bf16 rows against mlx-lm and the roofline
  export ONE_LOG=1
  headline 200 120
  step 200 bf16 python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b,qwen3-8b \
    --variants lmx,mlx-lm --rounds 3 --bandwidth --json "$OUT/gpu_bf16.json"
  ;;
headline_short)  # part headline without its bf16 rows (about 300 s)
  export ONE_LOG=1
  headline 170 100
  ;;
q4_kernel)  # lmx's quantized product with the step thread, again: the 8B in 4 bits with it on matrices of 32 MiB+
  # (lmx-q, LMX_CUDA_QUANTIZED=1) and 16 MiB+ (lmx-q16), the 270M and 1B in 4 bits (their heads take it); then where
  # the step thread's encoding time goes, sampled with native frames (py-spy, from .whl) on the 270M in bf16
  export ONE_LOG=1
  step 200 q4_8b python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b --quantize 4 \
    --variants lmx,lmx-q,lmx-q16,mlx-lm --rounds 3 --profile-steps 32 --json "$OUT/gpu_q4_8b.json"
  step 150 q4_small python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b --quantize 4 \
    --variants lmx,lmx-q,mlx-lm --rounds 3 --json "$OUT/gpu_q4_small.json"
  step 120 pyspy_270m /tmp/site/bin/py-spy record --native --threads --rate 400 --format raw \
    -o "$OUT/pyspy_270m_bf16.txt" -- python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m \
    --variants lmx --rounds 2 --gen-tokens 512
  ;;
diagnose)  # part donation, then whether lmx's quantized product pays now that a thread queues the steps: the 8B in 4
  # bits with MLX's products (lmx), lmx's for matrices of 32 MiB+ (lmx-q) and for all (lmx-qall), against mlx-lm
  export ONE_LOG=1
  step 90 donation python3 benchmarks/cache_write_donation.py --lmx-kernel --json "$OUT/cache_write_donation.json"
  step 230 q4_kernel_8b python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b --quantize 4 \
    --variants lmx,lmx-q,lmx-qall,mlx-lm --rounds 2 --profile-steps 48 --check-steps 16 --json "$OUT/gpu_q4_kernel_8b.json"
  step 150 attn_all_06b_8192 python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-0.6b --prompt-tokens 8192 \
    --variants lmx,lmx-attn-all,lmx-compiled --rounds 2 --profile-steps 32 --json "$OUT/gpu_attn_all_06b_8192.json"
  ;;
donation)  # whether a pipelined cache write copies the whole storage (eager, dynamic, compiled), lmx's kernel reading
  # the span; then the 0.6B at 8,192 tokens again with the lmx kernel for every head dim on the segmented step
  export ONE_LOG=1
  step 90 donation python3 benchmarks/cache_write_donation.py --lmx-kernel --json "$OUT/cache_write_donation.json"
  step 120 attn_all_06b_8192 python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-0.6b --prompt-tokens 8192 \
    --variants lmx,lmx-attn-all,lmx-compiled --rounds 2 --json "$OUT/gpu_attn_all_06b_8192.json"
  ;;
compiled_q4)  # part compiled's 4-bit rows: the 8B (and the 270M) in 4 bits
  export ONE_LOG=1
  step 220 compiled_8b_q4 python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b --quantize 4 \
    --variants lmx,lmx-compiled,mlx-lm --rounds 3 --profile-steps 48 --check-steps 16 --json "$OUT/gpu_compiled_8b_q4.json"
  step 150 compiled_small_q4 python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b --quantize 4 \
    --variants lmx,lmx-compiled,mlx-lm --rounds 3 --json "$OUT/gpu_compiled_small_q4.json"
  ;;
profile)  # where a decode step's host time goes: the plan's segmented step (thread, one thread) and the whole
  # step compiled (CompiledDecode), 270M and 1B bf16, then the 8B in 4 bits
  export ONE_LOG=1
  step 170 profile_small python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b \
    --variants lmx,lmx-onethread,lmx-compiled,mlx-lm --rounds 2 --profile-steps 48 --check-steps 16 \
    --json "$OUT/gpu_profile_small.json"
  step 200 profile_8b_q4 python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b --quantize 4 \
    --variants lmx,lmx-onethread,mlx-lm --rounds 2 --profile-steps 48 --json "$OUT/gpu_profile_8b_q4.json"
  ;;
next)  # lmx's float product kernel end to end (270M, 1B), what each op costs the host (attention of head_dim 128
  # included), lmx's attention kernel for Qwen 3's head_dim 128 on the 8B in 4 bits and bf16, the float kernel's values
  export ONE_LOG=1
  step 130 dense_small python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b \
    --variants lmx,lmx-dense,mlx-lm --rounds 3 --check-steps 32 --json "$OUT/gpu_dense_small.json"
  step 60 op_costs python3 benchmarks/gpu_op_costs.py --json "$OUT/gpu_op_costs.json"
  step 150 attn_8b_q4 python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b --quantize 4 \
    --variants lmx,lmx-attn-all,mlx-lm --rounds 3 --check-steps 16 --json "$OUT/gpu_attn_8b_q4.json"
  step 120 attn_8b python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b \
    --variants lmx,lmx-dense-attn,mlx-lm --rounds 3 --bandwidth --json "$OUT/gpu_attn_8b.json"
  step 110 dense_check python3 benchmarks/cuda_dense_check.py --chain 50 --rounds 3 --json "$OUT/gpu_dense_check.json"
  ;;
next_short)  # part next in about 390 s (when device time runs short): the two end-to-end questions, then the values
  export ONE_LOG=1
  step 130 dense_small python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b \
    --variants lmx,lmx-dense,mlx-lm --rounds 3 --check-steps 32 --json "$OUT/gpu_dense_small.json"
  step 150 attn_8b_q4 python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b --quantize 4 \
    --variants lmx,lmx-attn-all,mlx-lm --rounds 3 --check-steps 16 --json "$OUT/gpu_attn_8b_q4.json"
  step 100 dense_check python3 benchmarks/cuda_dense_check.py --chain 50 --rounds 2 --json "$OUT/gpu_dense_check.json"
  ;;
serving_ab)  # issue 13's row: 32 clients with mixed options on the engine (random 270M GGUF), this tree against the
  # tree at $BASE_SRC (a copy of another commit's src/), alternating, two rounds each
  export ONE_LOG=1
  step 60 r270 python3 benchmarks/gguf_random.py /tmp/r270.gguf --size 270m
  for r in 1 2; do
    for tree in base this; do
      src=$PWD/src
      [ "$tree" = base ] && src=${BASE_SRC:?BASE_SRC: a copy of the other commit src directory}
      PYTHONPATH=$src:${PYTHONPATH#"$PWD/src:"} step 60 "engine32_${tree}_$r" python3 benchmarks/engine_load.py \
        --model /tmp/r270.gguf --device gpu --clients 32 --duration 15 --mixed --json "$OUT/engine32_${tree}_$r.json"
    done
  done
  ;;
attn)  # part next without the float product kernel (measured 12-07: it loses): lmx's attention kernel for Qwen 3's
  # head_dim 128 on the 8B in 4 bits and bf16, then what each op costs the host (head_dim 128 included)
  export ONE_LOG=1
  step 150 attn_8b_q4 python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b --quantize 4 \
    --variants lmx,lmx-attn-all,mlx-lm --rounds 3 --check-steps 16 --json "$OUT/gpu_attn_8b_q4.json"
  step 130 attn_8b python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b \
    --variants lmx,lmx-attn-all,mlx-lm --rounds 3 --bandwidth --json "$OUT/gpu_attn_8b.json"
  step 60 op_costs python3 benchmarks/gpu_op_costs.py --json "$OUT/gpu_op_costs.json"
  ;;
dense)  # lmx's CUDA kernel for a decode step's float products (LMX_CUDA_DENSE): its values, speed and host cost
  # alone, the segmented step's profile (bf16 with and without it; the 8B in 4 bits), the headline against lmx and mlx-lm
  export ONE_LOG=1
  step 130 dense_check python3 benchmarks/cuda_dense_check.py --chain 50 --rounds 5 --json "$OUT/gpu_dense_check.json"
  step 90 profile_bf16 python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b \
    --variants lmx,lmx-dense --rounds 1 --profile-steps 48 --json "$OUT/gpu_profile_dense.json"
  step 100 profile_8b_q4 python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b --quantize 4 \
    --variants lmx --rounds 1 --profile-steps 32 --json "$OUT/gpu_profile_8b_q4.json"
  step 240 dense_bf16 python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b,qwen3-8b \
    --variants lmx,lmx-dense,mlx-lm --rounds 4 --check-steps 64 --bandwidth --json "$OUT/gpu_dense_bf16.json"
  ;;
dense_short)  # part dense in about 400 s (what a call can take when device time runs short): no 8B 4-bit profile, 3 rounds
  export ONE_LOG=1
  step 110 dense_check python3 benchmarks/cuda_dense_check.py --chain 50 --rounds 3 --json "$OUT/gpu_dense_check.json"
  step 80 profile_bf16 python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b \
    --variants lmx,lmx-dense --rounds 1 --profile-steps 48 --json "$OUT/gpu_profile_dense.json"
  step 200 dense_bf16 python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b,qwen3-8b \
    --variants lmx,lmx-dense,mlx-lm --rounds 3 --check-steps 32 --bandwidth --json "$OUT/gpu_dense_bf16.json"
  ;;
dense_first)  # part dense_short, most wanted first (a call cut short by the device's time left still returns steps.log)
  export ONE_LOG=1
  step 130 dense_small python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b \
    --variants lmx,lmx-dense,mlx-lm --rounds 3 --check-steps 32 --json "$OUT/gpu_dense_small.json"
  step 110 dense_check python3 benchmarks/cuda_dense_check.py --chain 50 --rounds 3 --json "$OUT/gpu_dense_check.json"
  step 80 profile_bf16 python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b \
    --variants lmx,lmx-dense --rounds 1 --profile-steps 48 --json "$OUT/gpu_profile_dense.json"
  step 120 dense_8b python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b \
    --variants lmx,lmx-dense,mlx-lm --rounds 3 --bandwidth --json "$OUT/gpu_dense_8b.json"
  ;;
first_use)  # what a fresh process's first use of each JIT-compiled kernel costs, then again with MLX's PTX cache warm
  export ONE_LOG=1
  first_use 240 120
  ;;
first_gguf)  # part first_use, then the 1B Q4_K_M held quantized (its Q6_K re-quantized to q8) against float, each
  # mode in a fresh process sharing that PTX cache: does the quantized load still cost minutes once the cache is warm?
  export ONE_LOG=1
  first_use 200 90
  step 250 gguf_1b env MLX_PTX_CACHE_DIR=/tmp/ptx_first_use python3 benchmarks/gguf_gpu.py --device gpu --random 1b \
    --rounds 2 --timeout 120 --json "$OUT/gguf_gpu_1b.json"
  ;;
dense_e2e)  # the same, end to end only, more rounds
  export ONE_LOG=1
  step 420 dense_bf16 python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b,qwen3-8b \
    --variants lmx,lmx-dense,mlx-lm --rounds 7 --bandwidth --json "$OUT/gpu_dense_bf16_7.json"
  ;;
thread_default)  # after auto became on for CUDA: the engine's outputs with the thread off and on, what bounds
  # a step now, the headline through the one command (lmx bench --against mlx-lm), 5 rounds against the old default
  export ONE_LOG=1  # the device returns ~8 files a call
  step 60 r270 python3 benchmarks/gguf_random.py /tmp/r270.gguf --size 270m
  step 30 gil python3 benchmarks/async_eval_gil.py --device gpu --ops 5000
  step 120 thread_check python3 benchmarks/gpu_thread_check.py --model /tmp/r270.gguf --device gpu \
    --json "$OUT/gpu_thread_check.json"
  # what bounds a step now: each op kind's host cost, and the threaded step's split
  step 60 op_costs python3 benchmarks/gpu_op_costs.py --json "$OUT/gpu_op_costs.json"
  step 90 profile_bf16 python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b \
    --variants lmx-thread,lmx-onethread --rounds 1 --profile-steps 48 --json "$OUT/gpu_profile_bf16.json"
  step 150 profile_8b_q4 python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b --quantize 4 \
    --variants lmx-thread,lmx-onethread --rounds 1 --profile-steps 48 --json "$OUT/gpu_profile_8b_q4.json"
  step 240 default_bf16 python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b,qwen3-8b \
    --variants lmx,lmx-onethread,mlx-lm --rounds 5 --bandwidth --json "$OUT/gpu_default_bf16.json"
  step 90 against_270m python3 -m lmx.cli.main bench --against mlx-lm --config gemma3-270m --device gpu --roofline --json
  step 120 against_8b_q4 python3 -m lmx.cli.main bench --against mlx-lm --config qwen3-8b --quantize 4 --device gpu --json
  ;;
thread)  # issue 17 part 2: each decode step queued by a thread of its own (lmx-thread) against lmx and mlx-lm, bf16
  step 420 thread_bf16 python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b,qwen3-8b \
    --variants lmx,lmx-thread,mlx-lm --rounds 3 --check-steps 64 --bandwidth --json "$OUT/gpu_thread_bf16.json"
  step 120 thread_exit python3 -c "import sys; sys.path.insert(0, 'src'); import mlx.core as mx; from lmx.generate.encoder import StepEncoder; e = StepEncoder(); a = mx.add(mx.ones(4, stream=e.stream), 1, stream=e.stream); e.submit(a).wait(); print(a.sum().item(), 'exit ok')"
  ;;
thread_270m)  # the smallest: the 270M shape in bf16 only
  step 150 thread_270m python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m \
    --variants lmx,lmx-thread,mlx-lm --rounds 3 --check-steps 32 --json "$OUT/gpu_thread_270m.json"
  ;;
thread_min)  # the least that says whether the thread pays: 270M and 1B bf16, the 8B in 4 bits
  step 220 thread_small python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b \
    --variants lmx,lmx-thread,mlx-lm --rounds 3 --check-steps 32 --json "$OUT/gpu_thread_small.json"
  step 170 thread_8b_q4 python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b --quantize 4 \
    --variants lmx,lmx-thread,mlx-lm --rounds 3 --json "$OUT/gpu_thread_8b_q4.json"
  ;;
thread_serve)  # the engine's path (the scheduler) with LMX_ENCODE_THREAD off and on: one stream, 32 clients
  step 60 r270 python3 benchmarks/gguf_random.py /tmp/r270.gguf --size 270m
  for r in 1 2; do
    for v in off on; do
      LMX_ENCODE_THREAD=$v step 60 "single_${v}_$r" python3 benchmarks/single_stream.py --model /tmp/r270.gguf \
        --device gpu --prompt-tokens 128 --gen-tokens 256 --rounds 3 --label "$v"
    done
  done
  for v in off on; do
    LMX_ENCODE_THREAD=$v step 60 "engine32_$v" python3 benchmarks/engine_load.py --model /tmp/r270.gguf --device gpu \
      --clients 32 --duration 15 --json "$OUT/engine_load_270m_thread_$v.json"
  done
  LMX_ENCODE_THREAD=on step 120 against_270m python3 -c "import sys; from lmx.cli.main import main; sys.exit(main())" \
    bench --against mlx-lm --config gemma3-270m --device gpu --roofline --json
  ;;
thread_q4)  # the same in 4 bits, and at an 8k-token prompt
  step 300 thread_q4 python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b,qwen3-8b \
    --variants lmx,lmx-thread,mlx-lm --rounds 3 --quantize 4 --json "$OUT/gpu_thread_q4.json"
  step 200 thread_8k python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b \
    --variants lmx,lmx-thread,mlx-lm --rounds 3 --prompt-tokens 8192 --json "$OUT/gpu_thread_8k.json"
  ;;
serving)  # issue 13: the padded-row CUDA kernel, then 32 mixed clients with it off and on
  step 100 cuda_check python3 benchmarks/cuda_attention_check.py --json "$OUT/cuda_attention_check.json"
  step 60 r270 python3 benchmarks/gguf_random.py /tmp/r270.gguf --size 270m
  for padded in 0 1; do
    LMX_CUDA_PADDED_ATTENTION=$padded step 120 "server_padded$padded" python3 benchmarks/server_load.py \
      --model /tmp/r270.gguf --device gpu --clients 32 --duration 30 --max-tokens 128 --drain 45 \
      --max-concurrency 32 --mixed --json "$OUT/server_load_270m_mc32_padded$padded.json"
  done
  LMX_CUDA_PADDED_ATTENTION=1 step 75 engine_profile python3 benchmarks/engine_load.py --model /tmp/r270.gguf \
    --device gpu --clients 32 --duration 15 --mixed --profile 40 --json "$OUT/engine_load_270m.json"
  ;;
decode)  # issue 17 parts 2, 3 and 6: decode against mlx-lm and the roofline, 4-bit, 8k context, GGUF on the GPU
  step 200 bf16 python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b,qwen3-8b --variants lmx,mlx-lm \
    --rounds 3 --bandwidth --json "$OUT/gpu_bf16.json"
  step 150 q4 python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b,qwen3-8b --variants lmx,mlx-lm \
    --rounds 3 --quantize 4 --bandwidth --json "$OUT/gpu_q4.json"
  step 100 long8k python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b --variants lmx,mlx-lm \
    --rounds 3 --prompt-tokens 8192 --json "$OUT/gpu_8k.json"
  step 150 gguf_check python3 benchmarks/gguf_gpu_check.py
  step 200 gguf_1b python3 benchmarks/gguf_gpu.py --device gpu --random 1b --rounds 2 --json "$OUT/gguf_gpu_1b.json"
  ;;
prefill)  # issue 17 parts 3 and 6: why the 8k prefill trails mlx-lm (chunk sizes), GGUF quantized on the GPU
  step 150 prefill_chunks python3 benchmarks/gpu_prefill_chunks.py --configs gemma3-270m,gemma3-1b \
    --prompt-tokens 8192 --rounds 3 --json "$OUT/gpu_prefill_chunks.json"
  step 150 gguf_check python3 benchmarks/gguf_gpu_check.py
  step 200 gguf_1b python3 benchmarks/gguf_gpu.py --device gpu --random 1b --rounds 2 --json "$OUT/gguf_gpu_1b.json"
  step 80 cuda_check python3 benchmarks/cuda_attention_check.py --json "$OUT/cuda_attention_check.json"
  ;;
chunk)  # the GPU's 2048-token prefill chunk: 8k prompts against mlx-lm, and 32 clients against the
  # code before it (its src carried as .gpu/prev/src: `git archive HEAD~N src | tar -x -C .gpu/prev`)
  step 120 long8k python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b --variants lmx,mlx-lm \
    --rounds 3 --prompt-tokens 8192 --json "$OUT/gpu_8k.json"
  step 60 r270 python3 benchmarks/gguf_random.py /tmp/r270.gguf --size 270m
  for tree in .gpu/prev $PWD; do
    name=$(basename "$tree")
    PYTHONPATH=$tree/src:$PYTHONPATH step 110 "server_$name" python3 benchmarks/server_load.py \
      --model /tmp/r270.gguf --device gpu --clients 32 --duration 30 --max-tokens 128 --drain 45 \
      --max-concurrency 32 --mixed --json "$OUT/server_load_270m_mc32_$name.json"
  done
  step 60 engine_split python3 benchmarks/engine_load.py --model /tmp/r270.gguf --device gpu --clients 32 \
    --duration 15 --mixed --split --json "$OUT/engine_load_270m_split.json"
  ;;
split)  # where a 32-row decode step's host time goes: all greedy, mixed, mixed with the padded-row kernel
  step 60 r270 python3 benchmarks/gguf_random.py /tmp/r270.gguf --size 270m
  step 60 split_greedy python3 benchmarks/engine_load.py --model /tmp/r270.gguf --device gpu --clients 32 \
    --duration 15 --split --json "$OUT/engine_load_270m_split_greedy.json"
  LMX_CUDA_PADDED_ATTENTION=1 step 60 split_padded python3 benchmarks/engine_load.py --model /tmp/r270.gguf \
    --device gpu --clients 32 --duration 15 --mixed --split --json "$OUT/engine_load_270m_split_padded.json"
  step 60 split_mixed python3 benchmarks/engine_load.py --model /tmp/r270.gguf --device gpu --clients 32 \
    --duration 15 --mixed --split --json "$OUT/engine_load_270m_split_mixed.json"
  ;;
rows)  # batched sampling of mixed rows: the check on the device, then 32 mixed clients against the
  # code before it (carried as .gpu/prev/src), alternating
  step 60 rows_check python3 benchmarks/sampling_rows_check.py
  step 60 r270 python3 benchmarks/gguf_random.py /tmp/r270.gguf --size 270m
  for round in 1 2; do
    for tree in .gpu/prev $PWD; do
      name=$(basename "$tree")_r$round
      PYTHONPATH=$tree/src:$PYTHONPATH step 40 "split_$name" python3 benchmarks/engine_load.py \
        --model /tmp/r270.gguf --device gpu --clients 32 --duration 10 --mixed --split \
        --json "$OUT/engine_load_270m_mixed_$name.json"
    done
  done
  ;;
fused)  # issue 17 part 2: q/k/v and gate/up as one product each (lmx) against each alone (lmx-unfused), and mlx-lm
  step 300 fused_bf16 python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b,qwen3-8b \
    --variants lmx,lmx-unfused,mlx-lm --rounds 3 --check-steps 32 --bandwidth --json "$OUT/gpu_fused_bf16.json"
  step 250 fused_q4 python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b,qwen3-8b \
    --variants lmx,lmx-unfused,mlx-lm --rounds 3 --quantize 4 --json "$OUT/gpu_fused_q4.json"
  ;;
products)  # why the fused projections prefilled the 8B slower: the products alone by row count, then
  # 2048-token prompts fused against unfused
  step 120 products python3 benchmarks/fused_products_check.py --json "$OUT/fused_products_check.json"
  step 200 prefill_2k python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b,gemma3-1b --variants lmx,lmx-unfused \
    --rounds 5 --prompt-tokens 2048 --gen-tokens 16 --json "$OUT/gpu_fused_prefill_2k.json"
  ;;
fused2)  # the fused projections again, 5 rounds: the 8B's 512-token prefill (slower in the first run) and decode
  step 200 fused2_8b python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b --variants lmx,lmx-unfused,mlx-lm \
    --rounds 5 --bandwidth --json "$OUT/gpu_fused2_8b.json"
  step 150 fused2_small python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b \
    --variants lmx,lmx-unfused,mlx-lm --rounds 5 --json "$OUT/gpu_fused2_small.json"
  ;;
graphs)  # MLX's CUDA graph settings (read once per process): the default, no graphs, 250 ops a graph;
  # then the batched sampling rows (as `rows`, the fused projections off so that only sampling differs)
  for env in MLX_USE_CUDA_GRAPHS=1 MLX_USE_CUDA_GRAPHS=0 MLX_MAX_OPS_PER_BUFFER=250; do
    name=$(echo "${env#MLX_}" | tr '=A-Z' '_a-z')
    (export "$env"; step 80 "graphs_$name" python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b \
      --variants lmx,mlx-lm --rounds 3 --json "$OUT/gpu_graphs_$name.json")
  done
  step 50 rows_check python3 benchmarks/sampling_rows_check.py
  step 50 r270 python3 benchmarks/gguf_random.py /tmp/r270.gguf --size 270m
  for tree in .gpu/prev $PWD; do
    name=$(basename "$tree")
    LMX_FUSED_PROJECTIONS=0 PYTHONPATH=$tree/src:$PYTHONPATH step 40 "rows_$name" python3 benchmarks/engine_load.py \
      --model /tmp/r270.gguf --device gpu --clients 32 --duration 10 --mixed --split \
      --json "$OUT/engine_load_270m_mixed_$name.json"
  done
  step 40 rows_fused python3 benchmarks/engine_load.py --model /tmp/r270.gguf --device gpu --clients 32 \
    --duration 10 --mixed --split --json "$OUT/engine_load_270m_mixed_fused.json"
  ;;
gguf)  # issue 17 part 3: a Q4_K_M file held quantized against dequantized, 1B shape (MLX's CUDA JIT
  # compiles each quantized kernel on first use: about a minute in a fresh process)
  step 560 gguf_1b python3 benchmarks/gguf_gpu.py --device gpu --random 1b --rounds 2 --timeout 260 --json "$OUT/gguf_gpu_1b.json"
  ;;
quantized)  # issue 17 part 2: lmx's CUDA product for 4- and 8-bit weights, its values and speed alone,
  # and the per-head norm + RoPE kernel's values; then Qwen 3 8B's 4-bit decode step profiled
  step 280 qcheck python3 benchmarks/cuda_quantized_check.py --rounds 3 --json "$OUT/cuda_quantized_check.json"
  step 200 q4_profile python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b --variants lmx-seg,lmx-mlxq \
    --rounds 2 --quantize 4 --profile-steps 32 --json "$OUT/gpu_q4_profile.json"
  ;;
quantized_e2e)  # the product kernel end to end in 4 bits: lmx, lmx-mlxq (MLX's products), mlx-lm
  step 330 q4 python3 benchmarks/gpu_vs_mlx_lm.py --configs qwen3-8b,gemma3-1b,gemma3-270m \
    --variants lmx,lmx-mlxq,mlx-lm --rounds 3 --quantize 4 --check-steps 16 --json "$OUT/gpu_q4.json"
  ;;
*) echo "part: serving, decode, prefill, chunk, split, rows, fused, fused2, products, graphs, quantized, quantized_e2e or gguf" >&2; exit 2 ;;
esac
