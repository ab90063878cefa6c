#!/usr/bin/env python3
"""PyTorch / transformers baseline for ``flexrun bench decode --device cuda`` (src/bench.rs
``decode``): greedy decoding with a KV cache of a randomly initialised FlexOlmo (or OLMo-2) model
built from the same Hugging Face config.json, in bf16 on one CUDA GPU.

Measured like flexrun's: one prefill forward of ``--batch`` random prompts of ``--prompt`` tokens
(filling transformers' DynamicCache), then ``--new-tokens`` steps of one token per sequence, each
the argmax of the last logits; one untimed warm-up generation of 4 tokens first. Times come from
``time.perf_counter`` around each step with ``torch.cuda.synchronize``; the step time is the median.

Meant for the GPU machine (system PyTorch, no venv), from the repository root:

    python3 benches/torch/bench_decode_torch.py --config benches/configs/moe_small.json --batch 1 \
        --prompt 128 --new-tokens 128

Prints one JSON object: {"framework": "pytorch", "torch", "transformers", "device", "batch",
"prompt", "new_tokens", "params", "prefill_ms", "prefill_tokens_per_s", "step_ms",
"decode_tokens_per_s"}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    cfg_path = Path(args.config)
    if not cfg_path.exists():
        cfg_path = ROOT / cfg_path
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type", "flex_olmo") == "flex_olmo":
        from transformers import FlexOlmoConfig as Cfg, FlexOlmoForCausalLM as Model
    else:
        from transformers import Olmo2Config as Cfg, Olmo2ForCausalLM as Model
    config = Cfg.from_dict(cfg)
    config._attn_implementation = args.attn
    torch.manual_seed(args.seed)
    model = Model(config).to(device="cuda", dtype=torch.bfloat16).eval()
    params = sum(x.numel() for x in model.parameters())
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.prompt), generator=gen).cuda()

    @torch.inference_mode()
    def run(steps: int):
        cache = transformers.DynamicCache()
        times = []
        inp = ids
        prefill = 0.0
        for s in range(steps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(input_ids=inp, past_key_values=cache, use_cache=True)
            inp = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            if s == 0:
                prefill = ms
            else:
                times.append(ms)
        return prefill, times

    run(min(4, args.new_tokens))
    prefill, times = run(args.new_tokens)
    step = statistics.median(times)
    print(json.dumps({
        "framework": "pytorch",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(),
        "batch": args.batch,
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "params": params,
        "prefill_ms": prefill,
        "prefill_tokens_per_s": args.batch * args.prompt / (prefill / 1e3),
        "step_ms": step,
        "decode_tokens_per_s": args.batch / (step / 1e3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
