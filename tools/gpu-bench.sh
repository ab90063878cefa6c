#!/usr/bin/env bash
# Every GPU benchmark, flexrun and PyTorch side by side on the same GPU in one run (the ratios in
# BENCHMARKS.md come from such a run). Meant for the GPU machine, from the repository root, with
# the flexrun binary packed by tools/gpu-test.sh:
#
#   tools/gpu-bench.sh [FLEXRUN] [OUTDIR]     # defaults: target/gpu-test/flexrun, bench-out
#
# Each benchmark writes OUTDIR/NAME.json (stdout) and OUTDIR/NAME.err; BENCH_TIMEOUT (seconds,
# default 300) bounds each one; ONLY=REGEX runs only the benchmarks whose names match. Prints one
# status line per benchmark; exits non-zero if any failed.
set -uo pipefail
FR="${1:-target/gpu-test/flexrun}"
OUTD="${2:-bench-out}"
mkdir -p "$OUTD"
fail=0
run() {
  local name="$1" start rc
  shift
  [[ -n "${ONLY:-}" && ! "$name" =~ ${ONLY} ]] && return
  start=$(date +%s)
  timeout "${BENCH_TIMEOUT:-300}" "$@" >"$OUTD/$name.json" 2>"$OUTD/$name.err"
  rc=$?
  printf '%-22s rc=%-3s %4ss\n' "$name" "$rc" "$(( $(date +%s) - start ))"
  [[ $rc == 0 ]] || fail=1
}
# Causal attention, hd 128, T = 1k..16k, 16k tokens per call (issue goal: >= SDPA's flash backend).
run attention        "$FR" bench attention --json
run attention_sdpa   python3 benches/torch/bench_sdpa.py
# GQA (32 query heads on 8 kv heads), as in the larger OLMo-2 / FlexOlmo configurations.
run attention_gqa      "$FR" bench attention --heads 32 --kv-heads 8 --seq 2048,8192 --json
run attention_gqa_sdpa python3 benches/torch/bench_sdpa.py --heads 32 --kv-heads 8 --seq 2048,8192
# The Hopper forward (wgmma, TMA, warp specialisation; sm_90 only, the backward stays on the sm_80
# kernels), hd 128 and hd 64.
run attention_sm90       env FLEXRUN_SM90=1 "$FR" bench attention --json
run attention_sm90_hd64  env FLEXRUN_SM90=1 "$FR" bench attention --hd 64 --heads 32 --kv-heads 32 --json
run attention_hd64_sdpa  python3 benches/torch/bench_sdpa.py --hd 64 --heads 32 --kv-heads 32
# Decode attention (split-KV, one new token per sequence) against the copy bandwidth measured in
# the same call (issue goal: >= 70%): 32 heads of 128 (MHA, OLMo-2 7B), and GQA 32 q / 8 kv.
run attention_decode     "$FR" bench attention-decode --json
run attention_decode_gqa "$FR" bench attention-decode --kv-heads 8 --json
run attention_decode_sm90 env FLEXRUN_SM90=1 "$FR" bench attention-decode --json
# Grouped expert GEMMs: 8 experts x 4096 tokens, H 4096, I 11008.
run moe              "$FR" bench moe --json
run moe_torch        python3 benches/torch/bench_moe_torch.py --json
# The same with the Hopper (wgmma, TMA) kernels, forward and backward (sm_90 only).
run moe_sm90         env FLEXRUN_SM90=1 "$FR" bench moe --json
# Greedy decoding with a KV cache, batch 1 and 16, against transformers (bf16, sdpa, DynamicCache):
# moe_small (11.8 M parameters) and moe_medium (hd 128, 8 layers, 4 experts top-2, ~380 M).
for cfg in moe_small moe_medium; do
  for b in 1 16; do
    run "decode_${cfg}_b$b"       "$FR" bench decode --config "benches/configs/$cfg.json" --batch "$b" --device cuda --json
    run "decode_${cfg}_b${b}_torch" python3 benches/torch/bench_decode_torch.py --config "benches/configs/$cfg.json" --batch "$b"
  done
done
# Training steps (forward, backward, clipping, AdamW) against transformers with bf16 autocast.
for cfg in moe_small moe_medium; do
  run "train_${cfg}"       "$FR" bench train --config "benches/configs/$cfg.json" --batch 8 --seq 1024 --device cuda --json
  run "train_${cfg}_torch" env FLEXRUN_TORCH_NO_VENV=1 python3 benches/torch/bench_torch.py --config "benches/configs/$cfg.json" \
    --batch 8 --seq 1024 --device cuda --clip 1.0 --json
done
# A data owner's expert-training step (frozen public model upcycled to [public FFN, trained copy],
# the public anchor and router own-text loss), next to a full step of the same dense model.
for cfg in dense_medium; do
  run "train_${cfg}"        "$FR" bench train --config "benches/configs/$cfg.json" --batch 8 --seq 1024 --device cuda --json
  run "train_${cfg}_expert" "$FR" bench train --config "benches/configs/$cfg.json" --expert --batch 8 --seq 1024 --device cuda --json
done
# Full size (issue goals: the 7B expert step within memory at >= 8 x 4096 tokens per optimizer
# step and >= 40% MFU; the 1B pretraining step at >= 45% MFU). Each reports its peak device memory.
run train_olmo2_7b_expert_recompute "$FR" bench train --config benches/configs/olmo2_7b.json --expert \
  --batch 2 --seq 4096 --grad-accum 4 --recompute --steps 3 --warmup 1 --device cuda --json
run train_olmo2_7b_expert           "$FR" bench train --config benches/configs/olmo2_7b.json --expert \
  --batch 1 --seq 4096 --grad-accum 8 --steps 3 --warmup 1 --device cuda --json
run train_olmo2_1b                  "$FR" bench train --config benches/configs/olmo2_1b.json \
  --batch 4 --seq 4096 --steps 5 --warmup 2 --device cuda --json
run train_olmo2_1b_torch env FLEXRUN_TORCH_NO_VENV=1 python3 benches/torch/bench_torch.py --config benches/configs/olmo2_1b.json \
  --batch 4 --seq 4096 --device cuda --clip 1.0 --json
# The released FlexOlmo-7x7B (33 B parameters, bf16) decoding on one GPU.
run decode_flexolmo_7x7b_b1 "$FR" bench decode --config benches/configs/flexolmo_7x7b.json --batch 1 --device cuda --json
exit $fail
