#!/usr/bin/env bash
# The open acceptance figures of a merged model, on a finished demo's data:
#
#   studies/optout_check.sh MODEL [WORKDIR (default runs/demo)]
#
# prints MODEL's held-out loss per domain and on average, each closed domain's gap to its dense
# expert (WORKDIR/models/dense-X), and, for each closed expert X, how much every other domain's
# loss changes when X is opted out (`--exclude X`; the acceptance asks for < 2%).
# env FLEXRUN: the binary (default target/release/flexrun, built if missing).
set -euo pipefail
M=${1:?usage: studies/optout_check.sh MODEL [WORKDIR]}
W=${2:-runs/demo}
source "$(dirname "$0")/demo_lib.sh"
need_demo "$W" data/public
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
domains=$(ls "$W/data")
closed=$(closed_domains "$W")
args=()
for d in $domains; do args+=("$d=$W/data/$d"); done
# Quiet on success (a router-tuned model notes that opt-out is no longer exact); the error if not.
ev() { "$B" eval "$@" --data "${args[@]}" --tasks 0 > /dev/null 2> "$OUT/err" || { cat "$OUT/err" >&2; exit 1; }; }
ev --model "$M" --json "$OUT/full.json"
for x in $closed; do
  ev --model "$M" --exclude "$x" --json "$OUT/no-$x.json"
  "$B" eval --model "$W/models/dense-$x" --data "$x=$W/data/$x" --tasks 0 --json "$OUT/dense-$x.json" > /dev/null
done
python3 - "$OUT" $closed <<'PY'
import json, sys
out, closed = sys.argv[1], sys.argv[2:]
def losses(name):
    return {s["domain"]: s["loss"] for s in json.load(open(f"{out}/{name}.json"))["scores"]}
full = losses("full")
print("loss: " + ", ".join(f"{d} {v:.4f}" for d, v in full.items()) + f"; average {sum(full.values()) / len(full):.4f}")
gaps = [f"{x} {100 * (full[x] / losses('dense-' + x)[x] - 1):+.1f}%" for x in closed]
print("gap to the dense expert: " + ", ".join(gaps))
for x in closed:
    w = losses("no-" + x)
    ch = {d: 100 * (w[d] / full[d] - 1) for d in full if d != x}
    worst = max(ch, key=lambda d: abs(ch[d]))
    print(f"without {x}: " + ", ".join(f"{d} {v:+.2f}%" for d, v in ch.items())
          + f"; largest {abs(ch[worst]):.2f}% ({worst})")
PY
