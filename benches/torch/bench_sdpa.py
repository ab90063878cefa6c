#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention throughput: the baseline for flexrun's flash attention
benchmark (src/bench/attention.rs, ``bench_attention``; ``flexrun bench attention --device cuda``).

Causal self-attention in bf16 on one CUDA GPU, forced onto one SDPA backend (default: the flash
backend). Inputs are laid out like flexrun's, q/k/v ``[batch, seq, heads, hd]`` in memory, and
passed to SDPA as ``[batch, heads, seq, hd]`` views; ``batch = max(1, tokens // seq)``.

* forward: ``out = sdpa(q, k, v, is_causal=True)``
* backward: ``torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)`` (the SDPA backward
  only; the graph holds nothing else)

Each is timed with CUDA events over ``--iters`` calls after ``--warmup`` untimed ones; the mean
is reported. FLOPs are counted as flexrun's ``causal_attention_flops``: forward
``4 * batch * heads * hd * pairs`` with ``pairs = seq * (seq + 1) / 2`` visible (query, key)
pairs, backward 2.5x the forward (FlashAttention's convention).

Meant for the GPU machine, which has PyTorch (no venv needed), from the repository root:

    python3 benches/torch/bench_sdpa.py                       # hd 128, 16 heads, T = 1k..16k, 16k tokens
    python3 benches/torch/bench_sdpa.py --seq 1024,4096 --heads 32 --kv-heads 8 --backend cudnn

Exactly one JSON object is printed on stdout:

    {"framework": "pytorch-sdpa", "backend": "flash", "torch": ..., "device": ..., "rows": [
      {"seq": .., "batch": .., "heads": .., "kv_heads": .., "hd": .., "fwd_ms": .., "bwd_ms": ..,
       "fwd_tflops": .., "bwd_tflops": ..}, ...]}

A shape that the chosen backend rejects gets an ``"error"`` entry in its row instead of times.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", default="1024,2048,4096,8192,16384", help="comma-separated sequence lengths")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per call: batch = max(1, tokens // seq)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (GQA when fewer)")
    p.add_argument("--hd", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="flash", choices=["flash", "efficient", "cudnn", "math"])
    return p.parse_args()


def causal_pairs(seq: int) -> float:
    return seq * (seq + 1) / 2.0


def main() -> int:
    args = parse_args()
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[args.backend]
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        print(json.dumps({"error": f"kv heads {kv_heads} must divide heads {args.heads}"}))
        return 1
    dev = torch.device("cuda")
    torch.manual_seed(0)

    def time_ms(fn) -> float:
        for _ in range(args.warmup):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / args.iters

    rows = []
    for seq in [int(x) for x in args.seq.split(",") if x.strip()]:
        batch = max(1, args.tokens // seq)
        row = {"seq": seq, "batch": batch, "heads": args.heads, "kv_heads": kv_heads, "hd": args.hd}
        try:
            # [batch, seq, heads, hd] storage (flexrun's layout), SDPA sees [batch, heads, seq, hd].
            q = torch.randn(batch, seq, args.heads, args.hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(batch, seq, kv_heads, args.hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(batch, seq, kv_heads, args.hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
            dout = torch.randn(batch, args.heads, seq, args.hd, device=dev, dtype=torch.bfloat16)
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            extra = {"enable_gqa": True} if kv_heads != args.heads else {}
            with sdpa_kernel(backend):

                def fwd():
                    with torch.no_grad():
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, **extra)

                fwd_ms = time_ms(fwd)
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, **extra)
                bwd_ms = time_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
            flops = 4.0 * batch * args.heads * args.hd * causal_pairs(seq)
            row.update(
                fwd_ms=fwd_ms,
                bwd_ms=bwd_ms,
                fwd_tflops=flops / (fwd_ms * 1e-3) / 1e12,
                bwd_tflops=2.5 * flops / (bwd_ms * 1e-3) / 1e12,
            )
            del q, k, v, dout, qt, kt, vt, out
        except RuntimeError as e:  # the backend rejects the shape, or out of memory
            row["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        torch.cuda.empty_cache()
        rows.append(row)
        print(f"bench_sdpa: {row}", file=sys.stderr)

    print(
        json.dumps(
            {
                "framework": "pytorch-sdpa",
                "backend": args.backend,
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name(dev),
                "causal": True,
                "dtype": "bf16",
                "rows": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
