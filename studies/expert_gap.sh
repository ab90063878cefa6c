#!/usr/bin/env bash
# Where a FlexOlmo expert's gap to its dense expert comes from, on a finished demo's work
# directory: for each closed domain, the held-out loss of
#   - the dense expert (every weight fine-tuned; from the demo),
#   - the public model with only its FFNs fine-tuned (`finetune --only mlp`): the most a frozen
#     attention/embedding/output stack lets FFN weights learn,
#   - the same plus the output layer (`--only mlp,lm_head`),
#   - the FlexOlmo expert alone (the 2-expert model it was trained as),
#   - the merged FlexOlmo model (all experts, the demo's top-k),
# and how much of the FFN-only and merged gaps falls on tokens that are never a target in the
# public training data (`flexrun compare`): the frozen output layer never learned them.
# Partial fine-tunes use the demo's dense-expert settings (steps, seeds), at the experts' lr.
#
# usage: studies/expert_gap.sh [WORKDIR (default runs/demo)] [STEPS (400)] [LR (5e-3)]
# env FLEXRUN: the binary (default target/release/flexrun, built if missing).
set -euo pipefail
W=${1:-runs/demo}
STEPS=${2:-400}
LR=${3:-5e-3}
source "$(dirname "$0")/demo_lib.sh"
need_demo "$W" models/public
OUT="$W/gap"
mkdir -p "$OUT"
domains=$(closed_domains "$W")
i=0
for d in $domains; do
  ev() { eval_on "$W" "$d" "$1" "$OUT/$2-$d.json"; }
  ev "$W/models/dense-$d" dense
  for only in mlp mlp,lm_head; do
    tag=only-${only/,/+}
    if [ ! -f "$OUT/$tag-$d/model.safetensors" ]; then
      finetune_as_dense "$W" "$d" $i "$OUT/$tag-$d" "$STEPS" "$LR" --only "$only"
    fi
    ev "$OUT/$tag-$d" "$tag"
  done
  "$B" merge --public "$W/models/public" --experts "$W/experts/main/$d.safetensors" \
    --out "$OUT/alone-$d" > /dev/null
  ev "$OUT/alone-$d" alone
  ev "$W/models/flexolmo-main" merged
  for m in only-mlp merged; do
    [ $m = merged ] && dir="$W/models/flexolmo-main" || dir="$OUT/only-mlp-$d"
    "$B" compare --model "$dir" --reference "$W/models/dense-$d" --data "$W/data/$d" \
      --public "$W/data/public" --json "$OUT/cmp-$m-$d.json" > /dev/null
  done
  i=$((i + 1))
done
python3 - "$OUT" $domains <<'EOF'
import json, sys
out, doms = sys.argv[1], sys.argv[2:]
cols = [("dense", "dense expert (all weights)"), ("only-mlp", "FFNs only"),
        ("only-mlp+lm_head", "FFNs + lm_head"), ("alone", "FlexOlmo expert alone"),
        ("merged", "merged FlexOlmo")]
never = "share of the gap on tokens never a target in public training data: FFNs only / merged"
print("| domain | " + " | ".join(c[1] for c in cols) + f" | {never} |")
print("|---|" + "---:|" * (len(cols) + 1))
for d in doms:
    loss = {k: json.load(open(f"{out}/{k}-{d}.json"))["scores"][0]["loss"] for k, _ in cols}
    cells = [f"{loss['dense']:.4f}"] + [
        f"{loss[k]:.4f} ({100 * (loss[k] / loss['dense'] - 1):+.1f}%)" for k, _ in cols[1:]]
    shares = [json.load(open(f"{out}/cmp-{m}-{d}.json"))["by_public_count"][0]["share"]
              for m in ("only-mlp", "merged")]
    cells.append(" / ".join(f"{100 * s:.0f}%" for s in shares))
    print(f"| {d} | " + " | ".join(cells) + " |")
EOF
