#!/usr/bin/env python3
"""Check that model directories written by flexrun load in Hugging Face transformers.

For each directory given, loads it with ``AutoModelForCausalLM.from_pretrained``
(float32, eager attention and experts, 1 thread), requires that every weight was
found with the right shape (no missing, unexpected or mismatched tensors), runs
one sequence of token ids, runs ``flexrun logits --model DIR --ids ... --json``
on the same ids, and prints the max |logit difference|. Exit status 1 when a
directory does not load cleanly or differs by more than ``--tol``.

Usage (from the repository root; any cwd works; build flexrun first with
``cargo build --release``):

    python3 benches/torch/check_hf_load.py target/tmp/hf_parity/saved_flexolmo_tiny \
        target/tmp/hf_parity/saved_olmo2_upcycled4

(``cargo test --release --test hf_parity`` leaves such flexrun-saved models in
``target/tmp/hf_parity/saved_*``.) Options: ``--ids 3,17,42`` (default: the 12
ids of tests/fixtures), ``--flexrun PATH`` (default target/release/flexrun),
``--tol`` (default 1e-4), ``--json`` (one JSON object per directory on stdout).

Virtual environment: as tests/fixtures/make_hf_fixtures.py, it creates/updates
``<repo>/.venv-torch`` from ``benches/torch/requirements-torch.txt`` and re-executes
itself inside it; ``FLEXRUN_TORCH_VENV`` and ``FLEXRUN_TORCH_NO_VENV=1`` work
the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
from torchenv import ensure_venv  # noqa: E402
# The ids every fixture in tests/fixtures runs (see tests/fixtures/README.md).
FIXTURE_IDS = [3, 17, 42, 0, 95, 61, 29, 1, 88, 12, 50, 73]


def transformers_logits(model_dir: Path, ids: list[int]) -> tuple[list[list[float]], dict]:
    """Logits [T, V] of `ids` from transformers, and the loading report."""
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
        output_loading_info=True,
    )
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.long)).logits[0]
    report = {
        "class": type(model).__name__,
        "missing_keys": sorted(info.get("missing_keys", [])),
        "unexpected_keys": sorted(info.get("unexpected_keys", [])),
        "mismatched_keys": sorted(str(k) for k in info.get("mismatched_keys", [])),
    }
    return out.tolist(), report


def flexrun_logits(flexrun: Path, model_dir: Path, ids: list[int]) -> list[list[float]]:
    cmd = [str(flexrun), "logits", "--model", str(model_dir), "--ids", ",".join(map(str, ids)), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["logits"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="flexrun-saved model directories")
    ap.add_argument("--ids", default=",".join(map(str, FIXTURE_IDS)), help="comma-separated token ids")
    ap.add_argument("--flexrun", type=Path, default=ROOT / "target" / "release" / "flexrun")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ensure_venv(__file__)

    import torch
    import transformers

    torch.set_num_threads(1)
    ids = [int(x) for x in args.ids.split(",")]
    ok = True
    for d in args.dirs:
        hf, report = transformers_logits(d, ids)
        fr = flexrun_logits(args.flexrun, d, ids)
        assert len(hf) == len(fr) and all(len(a) == len(b) for a, b in zip(hf, fr)), "logit shapes differ"
        diff = max(abs(a - b) for ra, rb in zip(hf, fr) for a, b in zip(ra, rb))
        clean = not (report["missing_keys"] or report["unexpected_keys"] or report["mismatched_keys"])
        good = clean and diff <= args.tol
        ok &= good
        if args.json:
            print(json.dumps({"dir": str(d), "max_abs_diff": diff, "ok": good, "transformers": transformers.__version__, **report}))
        else:
            print(f"{d}: {report['class']} (transformers {transformers.__version__}) loads "
                  f"{'cleanly' if clean else 'with problems: ' + json.dumps(report)}; "
                  f"max |logit diff| vs flexrun = {diff:.3e} -> {'OK' if good else 'FAIL'} (tol {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
