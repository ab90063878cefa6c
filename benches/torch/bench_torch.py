#!/usr/bin/env python3
"""PyTorch / transformers training-step baseline for flexrun benchmarks.

Builds transformers' ``FlexOlmoForCausalLM`` (or ``Olmo2ForCausalLM`` when the
config's ``model_type`` is ``"olmo2"``) from a Hugging Face ``config.json``
(e.g. ``benches/configs/moe_small.json``, the same file the Rust benches read),
in float32 with a fixed-seed random init, and times full training steps:

    forward on random token ids with labels = inputs (next-token cross-entropy
    computed by the model's own loss), backward, optional clipping (--clip),
    torch.optim.AdamW step (lr 1e-4, betas (0.9, 0.95), weight_decay 0.1),
    zero_grad. With --device cuda: on the GPU, bf16 autocast over float32
    weights, each step ending with torch.cuda.synchronize.

Usage (from the repository root; any cwd works):

    python3 benches/torch/bench_torch.py --config benches/configs/moe_small.json \
        --batch 8 --seq 256 --steps 10 --warmup 2 --threads 2 --json

With ``--json`` exactly one JSON object is printed on stdout:

    {"framework": "pytorch", "torch": ..., "transformers": ..., "threads": ..,
     "batch": .., "seq": .., "tokens_per_s": .., "step_ms": <median of the
     timed steps>, "step_ms_all": [...], "params": .., ...extra keys}

(tokens_per_s = batch * seq / median step time). Without ``--json`` a readable
line is printed. Everything else (pip output, warnings) goes to stderr.

Virtual environment: run it with any ``python3`` (3.10+). The script first
creates ``<repo>/.venv-torch`` if missing (``python3 -m venv``), installs
``benches/torch/requirements-torch.txt`` into it (again whenever that file changes; a
hash is kept in ``.venv-torch/.requirements.sha256``) and then re-executes
itself with the venv's interpreter (``os.execv``). The first run downloads
torch from PyPI (several GiB with its CUDA runtime wheels; only CPU is used).
Environment knobs: ``FLEXRUN_TORCH_VENV=/path`` picks another venv location;
``FLEXRUN_TORCH_NO_VENV=1`` runs in the current interpreter as is (it must
already have torch and transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
from torchenv import ensure_venv  # noqa: E402


# --------------------------------------------------------------------------
# benchmark
# --------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="HF config.json (flex_olmo or olmo2)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa (default) or eager")
    p.add_argument(
        "--experts",
        default=None,
        help="experts_implementation for MoE models (transformers default if omitted: "
        "grouped_mm where it can dispatch, else eager)",
    )
    p.add_argument("--clip", type=float, default=0.0, help="gradient-norm clipping (0: none)")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (float32) or cuda (float32 master weights, bf16 autocast: as flexrun's GPU "
        "trainer; run with FLEXRUN_TORCH_NO_VENV=1 on a machine whose python3 has torch)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Thread env vars must be set before torch loads its OpenMP runtime.
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))

    import statistics
    import time
    import warnings

    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)

    cfg_path = Path(args.config)
    if not cfg_path.is_absolute() and not cfg_path.exists():
        cfg_path = ROOT / cfg_path
    cfg_dict = json.loads(cfg_path.read_text())
    model_type = cfg_dict.get("model_type", "flex_olmo")
    if model_type == "flex_olmo":
        from transformers import FlexOlmoConfig as Cfg, FlexOlmoForCausalLM as Model
    elif model_type == "olmo2":
        from transformers import Olmo2Config as Cfg, Olmo2ForCausalLM as Model
    else:
        raise SystemExit(f"unsupported model_type {model_type!r} (want flex_olmo or olmo2)")

    config = Cfg.from_dict(cfg_dict)
    config.use_cache = False
    config.dtype = torch.float32
    config._attn_implementation = args.attn
    if args.experts is not None:
        config._experts_implementation = args.experts

    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.float32)
    cuda = args.device == "cuda"
    model = Model(config).to(torch.float32)
    if cuda:
        model = model.cuda()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    gen = torch.Generator().manual_seed(args.seed + 1)
    total = args.warmup + args.steps
    batches = [
        torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen) for _ in range(total)
    ]
    if cuda:
        batches = [b.cuda() for b in batches]
    import contextlib

    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    step_ms = []
    losses = []
    for i, ids in enumerate(batches):
        t0 = time.perf_counter()
        with autocast():
            out = model(input_ids=ids, labels=ids, use_cache=False)
        loss = out.loss
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        losses.append(float(loss.detach()))
        if i >= args.warmup:
            step_ms.append((t1 - t0) * 1e3)

    med = statistics.median(step_ms) if step_ms else float("nan")
    tokens = args.batch * args.seq
    result = {
        "framework": "pytorch",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_s": tokens / (med / 1e3) if step_ms else None,
        "step_ms": med,
        "step_ms_all": [round(x, 3) for x in step_ms],
        "params": n_params,
        "model_type": model_type,
        "config": str(args.config),
        "steps": args.steps,
        "warmup": args.warmup,
        "dtype": "bf16 autocast" if cuda else "float32",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": getattr(model.config, "_experts_implementation", None)
        if model_type == "flex_olmo"
        else None,
        "optimizer": {"name": "AdamW", "lr": args.lr, "betas": [0.9, 0.95], "weight_decay": 0.1},
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"pytorch {torch.__version__} / transformers {transformers.__version__}: "
            f"{model_type} {n_params / 1e6:.2f}M params, batch {args.batch} x seq {args.seq}, "
            f"{args.threads} threads: {result['tokens_per_s']:.1f} tokens/s, "
            f"median step {med:.1f} ms over {len(step_ms)} steps "
            f"(min {min(step_ms):.1f}, max {max(step_ms):.1f}); "
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        )
    return 0


if __name__ == "__main__":
    ensure_venv(__file__)
    sys.exit(main())
