#!/usr/bin/env python3
"""Generate tiny deterministic Hugging Face checkpoints + reference logits for flexrun tests.

Writes (into ``tests/fixtures/`` of the repository, replacing what is there):

  flexolmo_tiny/            FlexOlmoForCausalLM, f32, per-expert tensor names, 2 safetensors
                            shards + model.safetensors.index.json, expected.json
  flexolmo_tiny_optout2/    the same model with expert 2 removed (3 experts), one file
  flexolmo_fused/           the same model as flexolmo_tiny, fused expert tensors
                            (mlp.experts.gate_up_proj [E,2I,H], mlp.experts.down_proj [E,H,I])
  olmo2_tiny_bf16/          Olmo2ForCausalLM saved in bfloat16, expected.json (f32 compute)
  README.md                 what each fixture is, tensor names and shapes, versions

All weights come from fixed seeds; the script then reloads every checkpoint with
``from_pretrained`` and checks that its logits equal the recorded ones, and also
checks the transformers logits against an independent float64 re-implementation
of the math in shared/FLEXOLMO.md that reads the saved safetensors directly.

Usage (from any cwd):

    python3 tools/make_hf_fixtures.py            # generate + verify
    python3 tools/make_hf_fixtures.py --verify   # only verify the existing fixtures

Virtual environment: run it with any ``python3`` (3.10+). The script first
creates ``<repo>/.venv-torch`` if missing (``python3 -m venv``), installs
``benches/torch/requirements-torch.txt`` into it (again whenever that file changes; a
hash is kept in ``.venv-torch/.requirements.sha256``) and then re-executes
itself with the venv's interpreter (``os.execv``). ``FLEXRUN_TORCH_VENV=/path``
picks another venv location; ``FLEXRUN_TORCH_NO_VENV=1`` runs in the current
interpreter as is.

Reproducibility: the weights depend only on the seeds and torch's CPU RNG
(torch.Generator + randn), so they are identical on any machine with the pinned
torch; the recorded logits are computed with 1 thread and eager attention/experts,
and may differ in the last ulp on another CPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches" / "torch"))
from torchenv import ensure_venv  # noqa: E402
OUT = ROOT / "tests" / "fixtures"


# --------------------------------------------------------------------------
# fixture definitions
# --------------------------------------------------------------------------
# One fixed sequence of 12 token ids (vocab 96): includes eos (0), pad (1) and the last id.
IDS = [3, 17, 42, 0, 95, 61, 29, 1, 88, 12, 50, 73]

FLEX_TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA, head_dim = 64 / 4 = 16
    num_experts=4,
    num_experts_per_tok=2,
    norm_topk_prob=False,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
    hidden_act="silu",
    attention_bias=False,
    attention_dropout=0.0,
    tie_word_embeddings=False,
    initializer_range=0.02,
    output_router_logits=False,
    router_aux_loss_coef=0.0,
    pad_token_id=1,
    bos_token_id=None,
    eos_token_id=0,
    use_cache=True,
)

OLMO2_TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    rope_theta=500000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
    hidden_act="silu",
    attention_bias=False,
    attention_dropout=0.0,
    tie_word_embeddings=False,
    initializer_range=0.02,
    pad_token_id=1,
    bos_token_id=None,
    eos_token_id=0,
    use_cache=True,
)

FLEX_SEED = 20250711  # first seed tried; bumped until every top-k choice has a clear margin
OLMO2_SEED = 424242
EXCLUDED = 2  # expert removed for the opt-out fixture
STD = 0.08  # embeddings, attention projections, gate/up projections, lm_head
NORM_STD = 0.3  # every RMSNorm weight is 1 + NORM_STD * randn
ROUTER_STD = 0.3  # router rows; router logits have std ~ 8 * ROUTER_STD here
# Expert down_proj std: deliberately tiny, so that mean(moe_out^2) is comparable to
# rms_norm_eps (1e-6). The post-FFN RMSNorm would otherwise cancel any per-token scale of
# the MoE output, and norm_topk_prob=true would give the SAME logits as false (up to eps).
EXPERT_DOWN_STD = 0.001
MIN_TOPK_MARGIN = 0.05  # min over tokens/layers of z[k-1] - z[k] (sorted router logits)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="generate/verify flexrun HF fixtures")
    ap.add_argument("--verify", action="store_true", help="only verify the existing fixtures")
    ap.add_argument("--out", default=str(OUT), help="output folder (default tests/fixtures)")
    args = ap.parse_args(argv)

    import copy
    import json
    import shutil
    import warnings

    import numpy as np
    import torch
    import transformers
    from safetensors import safe_open
    from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, Olmo2Config, Olmo2ForCausalLM

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)

    versions = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "safetensors": __import__("safetensors").__version__,
        "numpy": np.__version__,
    }
    load_kw = dict(attn_implementation="eager", experts_implementation="eager")

    # ------------------------------------------------------------------ helpers
    def f32list(t):
        """Tensor -> nested lists of floats that round-trip exactly to the f32 values."""
        a = t.detach().to(torch.float32).cpu().numpy()
        if a.ndim == 0:
            return float(str(a))
        return [f32list_np(r) for r in a] if a.ndim > 1 else [float(str(x)) for x in a]

    def f32list_np(a):
        if a.ndim == 1:
            return [float(str(x)) for x in a]
        return [f32list_np(r) for r in a]

    def init_weights(model, seed, router_std=ROUTER_STD, down_std=EXPERT_DOWN_STD):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                r = torch.randn(p.shape, generator=g, dtype=torch.float32)
                if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                    v = 1.0 + NORM_STD * r
                elif name.endswith("mlp.gate.weight"):  # FlexOlmo router [E, H]
                    v = router_std * r
                elif name.endswith("mlp.experts.down_proj"):  # fused [E, H, I]
                    v = down_std * r
                else:
                    v = STD * r
                p.copy_(v.to(p.dtype))

    def flex_config(**over):
        d = dict(FLEX_TINY)
        d.update(over)
        c = FlexOlmoConfig(**d)
        c.architectures = ["FlexOlmoForCausalLM"]
        c.dtype = torch.float32
        return c

    def build(cls, config, state_dict=None, seed=None):
        model = cls._from_config(config, **load_kw) if hasattr(cls, "_from_config") else cls(config)
        model = model.to(torch.float32).eval()
        if seed is not None:
            init_weights(model, seed)
        if state_dict is not None:
            model.load_state_dict(state_dict, strict=True)
        return model

    ids = torch.tensor([IDS], dtype=torch.long)

    @torch.no_grad()
    def run(model, routing=False):
        o = model(input_ids=ids, output_router_logits=routing, use_cache=False)
        logits = o.logits[0].to(torch.float32)
        if not routing:
            return logits, None
        info = {"router_probs": [], "top_k_index": [], "top_k_prob": []}
        k = model.config.num_experts_per_tok
        margins = []
        for rl in o.router_logits:
            p = torch.softmax(rl.to(torch.float32), dim=-1)  # [T, E]
            sp, si = torch.sort(p, dim=-1, descending=True)
            sl = torch.sort(rl.to(torch.float32), dim=-1, descending=True).values
            margins.append((sl[:, k - 1] - sl[:, k]).min().item())
            info["router_probs"].append(f32list(p))
            info["top_k_index"].append(si[:, :k].tolist())
            info["top_k_prob"].append(f32list(sp[:, :k]))
        info["min_topk_logit_margin"] = min(margins)
        info["experts_used_per_layer"] = [sorted(set(sum(x, []))) for x in info["top_k_index"]]
        return logits, info

    def write_json(path, obj):
        path.write_text(json.dumps(obj, separators=(",", ":")) + "\n")

    def tensor_table(folder):
        rows = []
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    rows.append((f.name, k, list(sl.get_shape()), sl.get_dtype()))
        return rows

    # ---------------------------------------- independent float64 reference (FLEXOLMO.md)
    def load_st(folder):
        sd = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    sd[k] = h.get_tensor(k).to(torch.float64)
        return sd

    def ref_forward(folder, ids_list):
        cfg = json.loads((folder / "config.json").read_text())
        sd = load_st(folder)
        H = cfg["hidden_size"]
        nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        hd = cfg.get("head_dim") or H // nh
        eps = cfg["rms_norm_eps"]
        rp = cfg.get("rope_parameters") or {}
        theta = rp.get("rope_theta", cfg.get("rope_theta", 500000.0))
        moe = cfg["model_type"] == "flex_olmo"
        T = len(ids_list)

        def rms(x, w):
            return w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps))

        inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
        cos = torch.cat([ang.cos(), ang.cos()], -1)
        sin = torch.cat([ang.sin(), ang.sin()], -1)

        def rope(x):  # [nh, T, hd]
            x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
            return x * cos + torch.cat([-x2, x1], -1) * sin

        h = sd["model.embed_tokens.weight"][torch.tensor(ids_list)]
        mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
        for L in range(cfg["num_hidden_layers"]):
            pre = f"model.layers.{L}."
            W = lambda n: sd[pre + n]  # noqa: E731
            q = rms(h @ W("self_attn.q_proj.weight").T, W("self_attn.q_norm.weight"))  # full width
            k = rms(h @ W("self_attn.k_proj.weight").T, W("self_attn.k_norm.weight"))
            v = h @ W("self_attn.v_proj.weight").T
            q = rope(q.view(T, nh, hd).transpose(0, 1))
            k = rope(k.view(T, nkv, hd).transpose(0, 1)).repeat_interleave(nh // nkv, 0)
            v = v.view(T, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, 0)
            a = torch.softmax(q @ k.transpose(1, 2) / hd**0.5 + mask, -1) @ v
            a = a.transpose(0, 1).reshape(T, nh * hd) @ W("self_attn.o_proj.weight").T
            h = h + rms(a, W("post_attention_layernorm.weight"))
            if moe:
                E, K = cfg["num_experts"], cfg["num_experts_per_tok"]
                p = torch.softmax(h @ W("mlp.gate.weight").T, -1)  # over ALL experts
                tp, ti = torch.topk(p, K, -1)
                if cfg.get("norm_topk_prob"):
                    tp = tp / tp.sum(-1, keepdim=True)
                y = torch.zeros_like(h)
                for t in range(T):
                    for j in range(K):
                        e = int(ti[t, j])
                        ffn = W(f"mlp.experts.{e}.down_proj.weight") @ (
                            torch.nn.functional.silu(W(f"mlp.experts.{e}.gate_proj.weight") @ h[t])
                            * (W(f"mlp.experts.{e}.up_proj.weight") @ h[t])
                        )
                        y[t] += tp[t, j] * ffn
            else:
                y = (
                    torch.nn.functional.silu(h @ W("mlp.gate_proj.weight").T) * (h @ W("mlp.up_proj.weight").T)
                ) @ W("mlp.down_proj.weight").T
            h = h + rms(y, W("post_feedforward_layernorm.weight"))
        h = rms(h, sd["model.norm.weight"])
        return h @ sd["lm_head.weight"].T

    def maxdiff(a, b):
        """max |a - b|; the JSON lists are parsed to f32 first (their decimals are f32 values)."""
        a = torch.as_tensor(a, dtype=torch.float32) if isinstance(a, list) else a
        b = torch.as_tensor(b, dtype=torch.float32) if isinstance(b, list) else b
        return (a.to(torch.float64) - b.to(torch.float64)).abs().max().item()

    # ================================================================== generate
    if not args.verify:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("flexolmo_tiny", "flexolmo_tiny_optout2", "flexolmo_fused", "olmo2_tiny_bf16"):
            shutil.rmtree(out / name, ignore_errors=True)

        base_cfg = flex_config()
        ntk_cfg = flex_config(norm_topk_prob=True)
        opt_cfg = flex_config(num_experts=FLEX_TINY["num_experts"] - 1)
        keep = [e for e in range(FLEX_TINY["num_experts"]) if e != EXCLUDED]

        def optout_state(sd):
            new = {}
            for k, v in sd.items():
                if k.endswith("mlp.gate.weight") or k.endswith("mlp.experts.gate_up_proj") or k.endswith(
                    "mlp.experts.down_proj"
                ):
                    new[k] = v[keep].clone()  # drop expert EXCLUDED / router row EXCLUDED
                else:
                    new[k] = v.clone()
            return new

        # pick the first seed whose top-k choices all have a clear margin in every variant
        for seed in range(FLEX_SEED, FLEX_SEED + 200):
            base = build(FlexOlmoForCausalLM, base_cfg, seed=seed)
            sd = base.state_dict()
            ntk = build(FlexOlmoForCausalLM, ntk_cfg, state_dict=sd)
            opt = build(FlexOlmoForCausalLM, opt_cfg, state_dict=optout_state(sd))
            lb, rb = run(base, True)
            ln, rn = run(ntk, True)
            lo, ro = run(opt, True)
            m = min(rb["min_topk_logit_margin"], rn["min_topk_logit_margin"], ro["min_topk_logit_margin"])
            all_used = all(len(u) == FLEX_TINY["num_experts"] for u in rb["experts_used_per_layer"])
            if m >= MIN_TOPK_MARGIN and all_used:
                break
            print(f"seed {seed}: min top-k margin {m:.4f}, all experts used {all_used}; trying next")
        else:
            raise SystemExit("no seed with clear top-k margins found")
        print(f"flexolmo seed {seed}: min top-k router-logit margin {m:.4f}")
        with torch.no_grad():
            moe_rms = []

            def hook(mod, inp, outp):
                moe_rms.append(outp.pow(2).mean(-1).sqrt().median().item())

            hooks = [layer.mlp.register_forward_hook(hook) for layer in base.model.layers]
            run(base)
            for hk in hooks:
                hk.remove()
        print(f"median RMS of the MoE block output per layer: {[f'{x:.2e}' for x in moe_rms]} (eps 1e-6)")

        # ---- flexolmo_tiny: per-expert names, 2 shards
        d = out / "flexolmo_tiny"
        nbytes = sum(t.numel() * t.element_size() for t in sd.values())
        shard = int(nbytes * 0.6)
        base.save_pretrained(d, max_shard_size=shard)  # save_original_format=True (default)
        shards = sorted(d.glob("model-*.safetensors"))
        assert len(shards) == 2 and (d / "model.safetensors.index.json").exists(), shards
        # ---- flexolmo_tiny_optout2: 3 experts, one file
        d2 = out / "flexolmo_tiny_optout2"
        opt.save_pretrained(d2)
        # ---- flexolmo_fused: transformers' in-memory layout (save_original_format=False)
        d3 = out / "flexolmo_fused"
        base.save_pretrained(d3, save_original_format=False)

        ntk_diff = maxdiff(ln, lb)
        opt_diff = maxdiff(lo, lb)
        print(f"max |logits(norm_topk) - logits(base)| = {ntk_diff:.4f}; optout vs base {opt_diff:.4f}")
        common = {
            "generator": "tools/make_hf_fixtures.py",
            **versions,
            "attn_implementation": "eager",
            "experts_implementation": "eager",
            "threads": 1,
        }
        exp = {
            "model": "flexolmo_tiny",
            "class": "FlexOlmoForCausalLM",
            "seed": seed,
            **common,
            "weights_dtype": "float32",
            "compute_dtype": "float32",
            "ids": IDS,
            "logits": f32list(lb),
            "routing": rb,
            "optout": {
                "excluded": EXCLUDED,
                "checkpoint": "flexolmo_tiny_optout2",
                "kept_experts": keep,
                "logits": f32list(lo),
                "routing": ro,
                "max_abs_diff_vs_base": opt_diff,
            },
            "norm_topk": {
                "norm_topk_prob": True,
                "note": "same weights as flexolmo_tiny, config norm_topk_prob=true only",
                "logits": f32list(ln),
                "routing": rn,
                "max_abs_diff_vs_base": ntk_diff,
            },
            "fused_checkpoint": "flexolmo_fused",
        }
        write_json(d / "expected.json", exp)

        # ---- olmo2_tiny_bf16
        oc = Olmo2Config(**OLMO2_TINY)
        oc.architectures = ["Olmo2ForCausalLM"]
        om = build(Olmo2ForCausalLM, oc, seed=OLMO2_SEED)
        om = om.to(torch.bfloat16)
        om.config.dtype = torch.bfloat16
        d4 = out / "olmo2_tiny_bf16"
        om.save_pretrained(d4)
        # Reference = transformers on the saved bf16 checkpoint, upcast to f32 at load time.
        # (Not om.to(float32): Module.to(bfloat16) also rounds the rotary inv_freq buffer to
        # bf16, and casting back does not restore it; from_pretrained recomputes it in f32.)
        om32 = Olmo2ForCausalLM.from_pretrained(d4, dtype=torch.float32, **load_kw).eval()
        lo2, _ = run(om32)
        write_json(
            d4 / "expected.json",
            {
                "model": "olmo2_tiny_bf16",
                "class": "Olmo2ForCausalLM",
                "seed": OLMO2_SEED,
                **common,
                "weights_dtype": "bfloat16",
                "compute_dtype": "float32",
                "note": "logits of the bf16 checkpoint upcast to float32, computed in float32",
                "ids": IDS,
                "logits": f32list(lo2),
            },
        )

    # ================================================================== verify
    ok = True
    fx = json.loads((out / "flexolmo_tiny" / "expected.json").read_text())
    ob = json.loads((out / "olmo2_tiny_bf16" / "expected.json").read_text())
    checks = [
        ("flexolmo_tiny", FlexOlmoForCausalLM, {}, fx["logits"]),
        ("flexolmo_tiny (norm_topk_prob=True)", FlexOlmoForCausalLM, {"norm_topk_prob": True}, fx["norm_topk"]["logits"]),
        ("flexolmo_tiny_optout2", FlexOlmoForCausalLM, {}, fx["optout"]["logits"]),
        ("flexolmo_fused", FlexOlmoForCausalLM, {}, fx["logits"]),
        ("olmo2_tiny_bf16", Olmo2ForCausalLM, {}, ob["logits"]),
    ]
    print("verification: reload with from_pretrained (f32) and compare to expected.json")
    for label, cls, over, want in checks:
        folder = out / label.split(" ")[0]
        m = cls.from_pretrained(folder, dtype=torch.float32, **load_kw, **over).eval()
        got, _ = run(m)
        d = maxdiff(got, want)
        ok &= d <= 1e-6
        print(f"  {label:40s} max|diff| = {d:.3e}")
    print("independent float64 re-implementation of FLEXOLMO.md (from the safetensors) vs expected.json")
    for label, folder, want, tol in [
        ("flexolmo_tiny", out / "flexolmo_tiny", fx["logits"], 1e-4),
        ("flexolmo_tiny_optout2", out / "flexolmo_tiny_optout2", fx["optout"]["logits"], 1e-4),
        ("olmo2_tiny_bf16", out / "olmo2_tiny_bf16", ob["logits"], 1e-4),
    ]:
        ref = ref_forward(folder, IDS)
        d = maxdiff(ref, want)
        ok &= d <= tol
        print(f"  {label:40s} max|diff| = {d:.3e}")
    # norm_topk via the reference: patch the config in memory
    import tempfile

    with tempfile.TemporaryDirectory() as td:
        tdp = Path(td)
        for f in (out / "flexolmo_tiny").glob("*.safetensors"):
            shutil.copy(f, tdp / f.name)
        c = json.loads((out / "flexolmo_tiny" / "config.json").read_text())
        c["norm_topk_prob"] = True
        (tdp / "config.json").write_text(json.dumps(c))
        d = maxdiff(ref_forward(tdp, IDS), fx["norm_topk"]["logits"])
        ok &= d <= 1e-4
        print(f"  {'flexolmo_tiny (norm_topk_prob=True)':40s} max|diff| = {d:.3e}")

    # fused layout == per-expert layout: gate_up_proj[e] = cat(gate_proj, up_proj), down_proj[e] = down_proj
    per, fused = load_st(out / "flexolmo_tiny"), load_st(out / "flexolmo_fused")
    I = FLEX_TINY["intermediate_size"]
    same = True
    for L in range(FLEX_TINY["num_hidden_layers"]):
        gu, dn = fused[f"model.layers.{L}.mlp.experts.gate_up_proj"], fused[f"model.layers.{L}.mlp.experts.down_proj"]
        for e in range(FLEX_TINY["num_experts"]):
            pe = f"model.layers.{L}.mlp.experts.{e}."
            same &= torch.equal(gu[e, :I], per[pe + "gate_proj.weight"])
            same &= torch.equal(gu[e, I:], per[pe + "up_proj.weight"])
            same &= torch.equal(dn[e], per[pe + "down_proj.weight"])
    others = [k for k in per if ".mlp.experts." not in k]
    same &= all(torch.equal(per[k], fused[k]) for k in others) and len(fused) == len(others) + 2 * FLEX_TINY["num_hidden_layers"]
    # opt-out checkpoint == flexolmo_tiny minus expert EXCLUDED (renumbered) and router row EXCLUDED
    oo = load_st(out / "flexolmo_tiny_optout2")
    kept = [e for e in range(FLEX_TINY["num_experts"]) if e != EXCLUDED]
    same_o = len(oo) == len(per) - 3 * FLEX_TINY["num_hidden_layers"]
    for k, v in oo.items():
        if ".mlp.experts." in k:
            pre, rest = k.split(".mlp.experts.")
            e, tail = rest.split(".", 1)
            same_o &= torch.equal(v, per[f"{pre}.mlp.experts.{kept[int(e)]}.{tail}"])
        elif k.endswith("mlp.gate.weight"):
            same_o &= torch.equal(v, per[k][kept])
        else:
            same_o &= torch.equal(v, per[k])
    ok &= same and same_o
    print(f"  flexolmo_tiny_optout2 tensors == flexolmo_tiny without expert {EXCLUDED}: {same_o}")
    print(f"  flexolmo_fused tensors == flexolmo_tiny tensors (gate rows first, then up): {same}")

    if not args.verify:
        write_readme(out, versions, tensor_table, fx, ob)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"fixtures total size: {total} bytes")
    for f in sorted(out.rglob("*")):
        if f.is_file():
            print(f"  {f.relative_to(out)}  {f.stat().st_size}")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def write_readme(out, versions, tensor_table, fx, ob):
    lines = []
    w = lines.append
    w("# Test fixtures (generated)")
    w("")
    w("Generated by `python3 tools/make_hf_fixtures.py` (it bootstraps `.venv-torch` from")
    w("`benches/torch/requirements-torch.txt`); `python3 tools/make_hf_fixtures.py --verify` re-checks them.")
    w(
        f"Versions: transformers {versions['transformers']}, torch {versions['torch']}, "
        f"safetensors {versions['safetensors']}, numpy {versions['numpy']} (CPU, 1 thread, eager attention/experts)."
    )
    w("Do not edit by hand; rerun the script.")
    w("")
    w("All models take the same 12 token ids `" + str(IDS) + "` (one sequence, positions 0..11, no padding")
    w("mask; ids 0 and 1 are just tokens here). `expected.json` holds `logits` as a T x V (12 x 96)")
    w("list of f32 values (printed with the shortest decimal that round-trips to the f32).")
    w("Reloading with transformers reproduces them bit for bit; an independent float64 implementation of")
    w("shared/FLEXOLMO.md (in the script) is within ~2e-6 of them, so an f32 runtime should match to ~1e-5")
    w("(a tolerance of 1e-4 absolute is comfortable; logits are O(1)).")
    w("")
    w("## flexolmo_tiny/")
    w("")
    w("`FlexOlmoForCausalLM`, float32: vocab 96, hidden 64, 2 layers, 4 heads, 2 kv heads (GQA, head_dim 16),")
    w("intermediate 48, 4 experts, top-2, `norm_topk_prob: false`, rope_theta 10000 (stored as")
    w("`rope_parameters: {rope_theta, rope_type: default}`, the transformers-5 form), rms_norm_eps 1e-6,")
    w("untied lm_head, pad 1, eos 0, no bos. Sharded: `model-00001-of-00002.safetensors`,")
    w("`model-00002-of-00002.safetensors`, `model.safetensors.index.json` (`weight_map`: name -> file).")
    w("")
    w(f"Weights (seed {fx['seed']}, torch.Generator, randn in sorted parameter-name order): every RMSNorm weight")
    w(f"1 + {NORM_STD}*randn; router `mlp.gate.weight` {ROUTER_STD}*randn; expert down_proj {EXPERT_DOWN_STD}*randn;")
    w(f"everything else {STD}*randn. The expert down_proj is tiny on purpose: the MoE output then has")
    w("mean square comparable to rms_norm_eps, so the post-FFN RMSNorm does NOT cancel a per-token scale of")
    w("the MoE output. Without that, `norm_topk_prob: true` (a per-token rescale of the top-k weights) gives")
    w("the same logits as `false` up to eps, and a test could not tell them apart.")
    w(f"The seed was chosen so every top-k choice (base, norm_topk and opt-out variants) has a margin of at")
    w(f"least {MIN_TOPK_MARGIN} in router LOGIT between the k-th and (k+1)-th expert (recorded as")
    w("`routing.min_topk_logit_margin`), so f32 rounding cannot flip a choice, and every expert is used in")
    w("every layer.")
    w("")
    w("`expected.json` keys: `ids`, `logits` [12][96], `routing` {`router_probs` [L][T][E] (softmax over all")
    w("experts, f32), `top_k_index` [L][T][k] and `top_k_prob` [L][T][k] (descending), `min_topk_logit_margin`,")
    w("`experts_used_per_layer`}, `optout` {`excluded`: 2, `checkpoint`, `kept_experts` [0,1,3], `logits`,")
    w("`routing`}, `norm_topk` {`norm_topk_prob`: true, `logits`, `routing`, `max_abs_diff_vs_base`}, plus")
    w("`transformers`, `torch`, `seed`, `compute_dtype`.")
    w(f"`norm_topk.max_abs_diff_vs_base` = {fx['norm_topk']['max_abs_diff_vs_base']:.4f}; "
      f"`optout.max_abs_diff_vs_base` = {fx['optout']['max_abs_diff_vs_base']:.4f}.")
    w("")
    w("## flexolmo_tiny_optout2/")
    w("")
    w("Opt-out of expert 2 (FLEXOLMO.md \"Opt-out\"): a 3-expert model (`num_experts: 3`) with every weight")
    w("of flexolmo_tiny except expert 2's FFN and router row 2; old experts 0,1,3 are renumbered 0,1,2")
    w("(router rows likewise). One file `model.safetensors`. Its logits are `optout.logits` in")
    w("`flexolmo_tiny/expected.json`: a runtime that drops expert 2 from flexolmo_tiny at load time must")
    w("produce them, and so must loading this checkpoint directly.")
    w("")
    w("## flexolmo_fused/")
    w("")
    w("The same weights as flexolmo_tiny (same logits: `flexolmo_tiny/expected.json` `logits`), saved with")
    w("`save_pretrained(save_original_format=False)`, i.e. transformers 5's in-memory fused expert layout:")
    w("`model.layers.N.mlp.experts.gate_up_proj` [E, 2I, H] = [4, 96, 64], where rows 0..I-1 of expert e are")
    w("`experts.e.gate_proj.weight` and rows I..2I-1 are `experts.e.up_proj.weight` (concatenated, not")
    w("interleaved; forward does `gate, up = (x @ gate_up_proj[e].T).chunk(2)`), and")
    w("`model.layers.N.mlp.experts.down_proj` [E, H, I] = [4, 64, 48] = stacked `experts.e.down_proj.weight`.")
    w("Everything else is named as in flexolmo_tiny. One file `model.safetensors`.")
    w("transformers 5 loads both layouts (the per-expert one through its `qwen2_moe` conversion mapping) and")
    w("by default saves the per-expert one (`save_original_format=True`).")
    w("")
    w("## olmo2_tiny_bf16/")
    w("")
    w("`Olmo2ForCausalLM` saved in bfloat16 (`dtype: bfloat16` in config.json): vocab 96, hidden 64, 2 layers,")
    w("4 heads, 4 kv heads, intermediate 48, rope_theta 500000, rms_norm_eps 1e-6, untied lm_head.")
    w(f"Weights: seed {ob['seed']}, same recipe (norms 1 + {NORM_STD}*randn, the rest {STD}*randn, drawn in f32")
    w("then rounded to bf16). `expected.json` has `compute_dtype: float32`: the logits of the bf16 weights")
    w("upcast exactly to float32 and run in float32 (`from_pretrained(..., dtype=torch.float32)`).")
    w("")
    w("## Tensor names, shapes, dtypes")
    w("")
    for name in ("flexolmo_tiny", "flexolmo_tiny_optout2", "flexolmo_fused", "olmo2_tiny_bf16"):
        rows = tensor_table(out / name)
        w(f"### {name}")
        w("")
        w("| file | tensor | shape | dtype |")
        w("| --- | --- | --- | --- |")
        for f, k, s, dt in sorted(rows, key=lambda r: r[1]):
            w(f"| {f} | `{k}` | {s} | {dt} |")
        w("")
    w("## Files")
    w("")
    for f in sorted(out.rglob("*")):
        if f.is_file() and f.name != "README.md":
            w(f"- `{f.relative_to(out)}` ({f.stat().st_size} bytes)")
    w("")
    (out / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    ensure_venv(__file__)
    sys.exit(main())
