#!/usr/bin/env python3
"""How each expert of a FlexOlmo checkpoint contributes to each MoE layer's output, per domain.

For a model directory written by ``flexrun merge`` (or a 1-expert merge of a single expert
artifact, to see an expert as it was trained) and one or more prepared data directories, runs
the held-out windows of each domain through the model in Hugging Face transformers, computes
every expert's FFN output on every token of every MoE layer, and prints per layer and expert:

  p      mean router probability (softmax over all experts of the router logits plus
         min(bias, 0), as flexrun routes; the bias is read from the checkpoint's
         ``mlp.gate.expert_bias``, which transformers does not know)
  share  |p_e F_e(x)| / |sum_j p_j F_j(x)|, averaged over tokens: how much of the layer's
         (pre-norm) mix the expert makes up
  loud   |F_e(x)| / |F_0(x)|, averaged over tokens: how loud the expert's FFN is next to the
         public FFN's (expert 0) on the same input

and, per layer, each expert's weight distance from the public FFN (``dist``: the Frobenius norm of
the difference of its gate, up and down weights from expert 0's, over expert 0's norm; 0 for an
untrained copy).

Under OLMo-2's post-FFN norm the mix's scale is normalised away, so an expert can outweigh its
router probability by being loud (share > p); and an expert that its router sends a little of
another domain's text moves that text by about its share.

Usage (from the repository root; build nothing, only the checkpoint and data are read):

    python3 studies/expert_mix.py runs/demo/models/flexolmo \
        public=runs/demo/data/public code=runs/demo/data/code --windows 32 --seq 128

Options: ``--top-k`` is not needed (every expert is evaluated on every token; p is the full
softmax); ``--json`` prints one JSON object instead of the table.

Virtual environment: as benches/torch/check_hf_load.py (``.venv-torch``, ``FLEXRUN_TORCH_VENV``,
``FLEXRUN_TORCH_NO_VENV=1``).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches" / "torch"))
import torchenv  # noqa: E402

torchenv.ensure_venv(__file__)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def read_valid(data_dir: Path, n: int, seq: int) -> np.ndarray:
    """The first n windows of seq tokens of a flexrun token shard (valid.bin)."""
    raw = (data_dir / "valid.bin").read_bytes()
    if raw[:8] != b"FLEXTOK\0":
        sys.exit(f"error: {data_dir}/valid.bin is not a flexrun token shard")
    width, count = struct.unpack_from("<IQ", raw, 12)
    dtype = {2: np.uint16, 4: np.uint32}.get(width)
    if dtype is None:
        sys.exit(f"error: {data_dir}/valid.bin has token width {width}")
    toks = np.frombuffer(raw, dtype=dtype, count=count, offset=32).astype(np.int64)
    n = min(n, len(toks) // seq)
    if n == 0:
        sys.exit(f"error: {data_dir}/valid.bin holds fewer than {seq} tokens")
    return toks[: n * seq].reshape(n, seq)


def expert_ffn(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's SwiGLU FFN on x [N, H], for either transformers expert layout."""
    if hasattr(experts, "gate_up_proj"):
        gu = experts.gate_up_proj[e]
        gu = x @ (gu.T if gu.shape[-1] == x.shape[-1] else gu)
        g, u = gu.chunk(2, -1)
        d = experts.down_proj[e]
        h = torch.nn.functional.silu(g) * u
        return h @ (d.T if d.shape[0] == x.shape[-1] else d)
    m = experts[e]
    return m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))


def expert_weights(experts, e: int) -> list[torch.Tensor]:
    """Expert e's FFN weights, for either transformers expert layout."""
    if hasattr(experts, "gate_up_proj"):
        return [experts.gate_up_proj[e], experts.down_proj[e]]
    m = experts[e]
    return [m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight]


def weight_distance(experts, e: int) -> float:
    """|W_e - W_0| / |W_0| over all of an expert's FFN weights (Frobenius norms)."""
    pairs = zip(expert_weights(experts, e), expert_weights(experts, 0))
    num = den = 0.0
    for w, w0 in pairs:
        num += (w - w0).pow(2).sum().item()
        den += w0.pow(2).sum().item()
    return (num / den) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("domains", nargs="+", help="NAME=PREPARED_DIR")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, torch.get_num_threads()))
    manifest = a.model / "flexolmo.json"
    if not manifest.exists():
        sys.exit(f"error: {manifest} not found (a merged FlexOlmo checkpoint is needed)")
    names = [e["name"] for e in json.loads(manifest.read_text())["experts"]]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    n_layers = model.config.num_hidden_layers
    state = load_file(str(a.model / "model.safetensors"))
    bias = [state.get(f"model.layers.{l}.mlp.gate.expert_bias") for l in range(n_layers)]
    inputs: dict[int, torch.Tensor] = {}

    def hook(layer: int):
        def capture(_module, args, _out):
            inputs[layer] = args[0].detach()

        return capture

    for l, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(hook(l))

    report = {"model": str(a.model), "experts": names, "domains": {}}
    with torch.no_grad():
        report["weight_distance"] = [
            [weight_distance(layer.mlp.experts, e) for e in range(len(names))]
            for layer in model.model.layers
        ]
    for spec in a.domains:
        name, _, path = spec.partition("=")
        if not path:
            sys.exit(f"error: '{spec}' is not NAME=DIR")
        toks = torch.tensor(read_valid(Path(path), a.windows, a.seq))
        rows = []
        with torch.no_grad():
            model(toks)
            for l in range(n_layers):
                x = inputs[l].reshape(-1, inputs[l].shape[-1])
                mlp = model.model.layers[l].mlp
                z = x @ mlp.gate.weight.T
                if bias[l] is not None:
                    z = z + bias[l].clamp(max=0)
                p = torch.softmax(z, -1)
                f = [expert_ffn(mlp.experts, e, x) for e in range(len(names))]
                mix = sum(p[:, e : e + 1] * f[e] for e in range(len(names)))
                mix_norm = mix.norm(dim=-1)
                pub_norm = f[0].norm(dim=-1)
                rows.append(
                    [
                        {
                            "p": p[:, e].mean().item(),
                            "share": ((p[:, e : e + 1] * f[e]).norm(dim=-1) / mix_norm).mean().item(),
                            "loud": (f[e].norm(dim=-1) / pub_norm).mean().item(),
                        }
                        for e in range(len(names))
                    ]
                )
        report["domains"][name] = rows
    if a.json:
        print(json.dumps(report))
        return
    head = " | ".join(f"{n} p / share / loud" for n in names)
    print(f"| domain | layer | {head} |")
    print("|---|---:|" + "---:|" * len(names))
    for name, rows in report["domains"].items():
        for l, row in enumerate(rows):
            cells = " | ".join(f"{c['p']:.2f} / {c['share']:.2f} / {c['loud']:.2f}" for c in row)
            print(f"| {name} | {l} | {cells} |")
    print()
    print("| layer | " + " | ".join(f"{n} dist" for n in names) + " |")
    print("|---:|" + "---:|" * len(names))
    for l, row in enumerate(report["weight_distance"]):
        print(f"| {l} | " + " | ".join(f"{d:.2f}" for d in row) + " |")


if __name__ == "__main__":
    main()
