#!/usr/bin/env python3
"""PyTorch baselines for flexrun's grouped expert GEMMs (kernels/grouped_gemm.cu,
``flexrun bench moe --device cuda``, src/bench/moe.rs ``bench_grouped``).

Runs on the GPU machine with the system PyTorch (no venv, no network). The problem is the one
``bench_grouped`` times: E experts, T tokens per expert (a uniform routing: m = E*T rows in the
expert-permuted layout), hidden H, intermediate I, bf16 weights in the HF layout
(gate/up [E, I, H], down [E, H, I]) and the SwiGLU expert FFN

    y[seg_e] = (silu(x[seg_e] Wg_e^T) * (x[seg_e] Wu_e^T)) Wd_e^T.

Measured (CUDA events, mean over --iters after --warmup; TFLOP/s with forward = 6 m H I,
forward + backward = 18 m H I flops, the backward being input and weight gradients):

  loop_fwd, loop_fwd_bwd       a Python loop over experts of F.linear on each segment (autograd)
  grouped_mm_fwd, _fwd_bwd     torch._grouped_mm (gate and up as one [E, H, 2I] operand), where
                               this PyTorch and GPU support it (else an "error" entry)
  dense_gemm                   ONE cuBLAS GEMM of the same total size as the gate/up projection:
                               [m, H] x [H, 2I] (the ceiling a grouped GEMM can approach)
  dense_fwd, dense_fwd_bwd     the whole FFN as dense GEMMs over all m rows (every row through
                               one expert): the same flops with no grouping
  hf_block_fwd_bwd             transformers' FlexOlmo sparse MoE block (router + top-k + experts)
                               forward + backward on n = m / k tokens, if transformers is
                               installed; its TFLOP/s counts only the expert FFN flops of the
                               rows actually routed (18 * n * k * H * I)

Usage (from the repository root):

    python3 benches/torch/bench_moe_torch.py --experts 8 --tokens-per-expert 4096 \
        --hidden 4096 --intermediate 11008 --top-k 4 --iters 20 --warmup 3 --json

With --json exactly one JSON object goes to stdout:
    {"framework": "pytorch", "torch": .., "transformers": .. or null, "device": ..,
     "experts": .., "tokens_per_expert": .., "hidden": .., "intermediate": .., "rows": ..,
     "top_k": .., "iters": .., "results": {NAME: {"ms": .., "flops": .., "tflops": ..}
                                                 or {"error": "..."}}}
Without --json one readable line per result. Diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--tokens-per-expert", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--top-k", type=int, default=4, help="top-k of the transformers block (tokens = rows / k)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma-separated result names to skip (loop, grouped_mm, dense, hf)")
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def main() -> int:
    a = parse_args()
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("bench_moe_torch: no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    torch.manual_seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    E, T, H, I = a.experts, a.tokens_per_expert, a.hidden, a.intermediate
    m = E * T
    dt = torch.bfloat16
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    mhi = float(m) * H * I
    results: dict[str, dict] = {}

    def timed(fn) -> float:
        for _ in range(a.warmup):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(a.iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / a.iters

    def record(name: str, flops: float, fn) -> None:
        try:
            ms = timed(fn)
            results[name] = {"ms": ms, "flops": flops, "tflops": flops / (ms * 1e-3) / 1e12}
        except Exception as e:  # noqa: BLE001 -- report any failure as a result entry
            print(f"bench_moe_torch: {name}: {e}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        torch.cuda.empty_cache()

    def param(*shape, fan_in):
        return (torch.randn(*shape, device=dev, dtype=torch.float32) / fan_in**0.5).to(dt).requires_grad_(True)

    x = torch.randn(m, H, device=dev, dtype=dt).requires_grad_(True)
    dy = torch.randn(m, H, device=dev, dtype=dt)
    wg = param(E, I, H, fan_in=H)
    wu = param(E, I, H, fan_in=H)
    wd = param(E, H, I, fan_in=I)
    offs_host = [T * (e + 1) for e in range(E)]
    offs = torch.tensor(offs_host, device=dev, dtype=torch.int32)  # cumulative segment ends

    # --- per-expert loop --------------------------------------------------------------------
    def loop_ffn():
        outs = []
        for e in range(E):
            xs = x[e * T:(e + 1) * T]
            outs.append(F.linear(F.silu(F.linear(xs, wg[e])) * F.linear(xs, wu[e]), wd[e]))
        return torch.cat(outs)

    def zero_grads():
        for t in (x, wg, wu, wd):
            t.grad = None

    if "loop" not in skip:
        with torch.no_grad():
            record("loop_fwd", 6 * mhi, loop_ffn)

        def loop_fb():
            zero_grads()
            loop_ffn().backward(dy)

        record("loop_fwd_bwd", 18 * mhi, loop_fb)

    # --- torch._grouped_mm ------------------------------------------------------------------
    if "grouped_mm" not in skip:
        gmm = getattr(torch, "_grouped_mm", None)
        if gmm is None:
            results["grouped_mm_fwd"] = {"error": "torch._grouped_mm is not available in this PyTorch"}
        else:
            # [E, 2I, H] -> transposed view [E, H, 2I] (column-major per expert, as _grouped_mm wants).
            wgu = torch.cat([wg.detach(), wu.detach()], dim=1).requires_grad_(True)
            wd_t_src = wd.detach().clone().requires_grad_(True)

            def gmm_ffn():
                gu = gmm(x, wgu.transpose(-2, -1), offs=offs)
                g, u = gu[:, :I], gu[:, I:]
                return gmm(F.silu(g) * u, wd_t_src.transpose(-2, -1), offs=offs)

            with torch.no_grad():
                record("grouped_mm_fwd", 6 * mhi, gmm_ffn)

            def gmm_fb():
                for t in (x, wgu, wd_t_src):
                    t.grad = None
                gmm_ffn().backward(dy)

            record("grouped_mm_fwd_bwd", 18 * mhi, gmm_fb)
            del wgu, wd_t_src

    # --- dense cuBLAS of the same total size ------------------------------------------------
    if "dense" not in skip:
        with torch.no_grad():
            w_gu0 = torch.cat([wg[0], wu[0]], dim=0).detach()  # [2I, H]
            xd = x.detach()
            record("dense_gemm", 4 * mhi, lambda: torch.matmul(xd, w_gu0.t()))
        w_gu0 = w_gu0.clone().requires_grad_(True)
        wd0 = wd[0].detach().clone().requires_grad_(True)

        def dense_ffn():
            gu = F.linear(x, w_gu0)
            return F.linear(F.silu(gu[:, :I]) * gu[:, I:], wd0)

        with torch.no_grad():
            record("dense_fwd", 6 * mhi, dense_ffn)

        def dense_fb():
            for t in (x, w_gu0, wd0):
                t.grad = None
            dense_ffn().backward(dy)

        record("dense_fwd_bwd", 18 * mhi, dense_fb)
        del w_gu0, wd0

    # --- transformers' FlexOlmo sparse MoE block --------------------------------------------
    tf_version = None
    if "hf" not in skip:
        try:
            import transformers

            tf_version = transformers.__version__
            from transformers import FlexOlmoConfig
            from transformers.models.flex_olmo import modeling_flex_olmo as mfo

            block_cls = getattr(mfo, "FlexOlmoSparseMoeBlock", None) or getattr(mfo, "FlexOlmoMoE", None)
            if block_cls is None:
                raise RuntimeError("no FlexOlmoSparseMoeBlock in transformers.models.flex_olmo")
            k = max(1, min(a.top_k, E))
            n = max(1, m // k)
            cfg = FlexOlmoConfig(
                hidden_size=H,
                intermediate_size=I,
                num_experts=E,
                num_experts_per_tok=k,
                norm_topk_prob=False,
                num_hidden_layers=1,
                num_attention_heads=max(1, H // 128),
                num_key_value_heads=max(1, H // 128),
                vocab_size=128,
            )
            block = block_cls(cfg).to(device=dev, dtype=dt)
            hx = torch.randn(1, n, H, device=dev, dtype=dt).requires_grad_(True)
            hdy = torch.randn(1, n, H, device=dev, dtype=dt)

            def hf_fb():
                block.zero_grad(set_to_none=True)
                hx.grad = None
                out = block(hx)
                if isinstance(out, (tuple, list)):
                    out = out[0]
                out.backward(hdy.view_as(out))

            record("hf_block_fwd_bwd", 18.0 * n * k * H * I, hf_fb)
            results["hf_block_fwd_bwd"]["tokens"] = n
            results["hf_block_fwd_bwd"]["top_k"] = k
            del block, hx, hdy
        except Exception as e:  # noqa: BLE001 -- missing or changed transformers: report, go on
            print(f"bench_moe_torch: transformers block: {e}", file=sys.stderr)
            results["hf_block_fwd_bwd"] = {"error": f"{type(e).__name__}: {e}"}

    out = {
        "framework": "pytorch",
        "torch": torch.__version__,
        "transformers": tf_version,
        "device": torch.cuda.get_device_name(dev),
        "experts": E,
        "tokens_per_expert": T,
        "hidden": H,
        "intermediate": I,
        "rows": m,
        "top_k": a.top_k,
        "iters": a.iters,
        "results": results,
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(f"{out['device']}: E={E} tokens/expert={T} H={H} I={I} (torch {out['torch']})")
        for name, r in results.items():
            if "error" in r:
                print(f"  {name:<20} error: {r['error']}")
            else:
                print(f"  {name:<20} {r['ms']:9.3f} ms  {r['tflops']:7.1f} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
