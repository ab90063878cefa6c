#!/usr/bin/env bash
# How close can any FlexOlmo expert get to a dense expert? A FlexOlmo expert trains FFN weights
# only (and its router row); embeddings, attention, norms and the output layer stay the public
# model's. So fine-tuning just the public model's FFNs on a domain, with no MoE, no public rows and
# no anchor, bounds what an expert can reach. This script gives both sides their best learning
# rate: for each closed domain of a finished demo, it fine-tunes the public model at each rate
# in LRS twice (every weight: a dense expert; `--only mlp`: the FFN-only bound), with the demo's
# dense-expert steps, warmup and seeds, and prints each loss and the gap of the best FFN-only
# run to the best dense run and to the demo's own dense expert.
#
# usage: studies/ffn_bound.sh [WORKDIR (default runs/demo)] [STEPS (400)] [LRS (1e-3,2e-3,3e-3,5e-3,1e-2)]
# env FLEXRUN: the binary (default target/release/flexrun, built if missing).
set -euo pipefail
W=${1:-runs/demo}
STEPS=${2:-400}
LRS=${3:-1e-3,2e-3,3e-3,5e-3,1e-2}
source "$(dirname "$0")/demo_lib.sh"
need_demo "$W" models/public
OUT="$W/bound"
mkdir -p "$OUT"
domains=$(closed_domains "$W")
i=0
for d in $domains; do
  [ -f "$OUT/demo-dense-$d.json" ] || eval_on "$W" "$d" "$W/models/dense-$d" "$OUT/demo-dense-$d.json"
  for lr in ${LRS//,/ }; do
    for only in all mlp; do
      run="$OUT/$only-$lr-$d"
      if [ ! -f "$run.json" ]; then
        flags=()
        [ $only = all ] || flags=(--only "$only")
        finetune_as_dense "$W" "$d" $i "$run" "$STEPS" "$lr" "${flags[@]}"
        eval_on "$W" "$d" "$run" "$run.json"
        rm -rf "$run"
      fi
    done
  done
  i=$((i + 1))
done
python3 - "$OUT" "$LRS" $domains <<'EOF'
import json, sys
out, lrs, doms = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
loss = lambda f: json.load(open(f"{out}/{f}.json"))["scores"][0]["loss"]
print("| domain | learning rate | dense expert (every weight) | FFNs only | FFNs only vs dense |")
print("|---|---:|---:|---:|---:|")
for d in doms:
    for lr in lrs:
        a, m = loss(f"all-{lr}-{d}"), loss(f"mlp-{lr}-{d}")
        print(f"| {d} | {lr} | {a:.4f} | {m:.4f} | {100 * (m / a - 1):+.1f}% |")
print()
print("| domain | best dense (lr) | best FFNs only (lr) | best vs best | vs the demo's dense expert |")
print("|---|---:|---:|---:|---:|")
for d in doms:
    a = min((loss(f"all-{lr}-{d}"), lr) for lr in lrs)
    m = min((loss(f"mlp-{lr}-{d}"), lr) for lr in lrs)
    demo = loss(f"demo-dense-{d}")
    print(f"| {d} | {a[0]:.4f} ({a[1]}) | {m[0]:.4f} ({m[1]}) | {100 * (m[0] / a[0] - 1):+.1f}% "
          f"| {100 * (m[0] / demo - 1):+.1f}% (demo {demo:.4f}) |")
EOF
