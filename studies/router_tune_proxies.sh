#!/usr/bin/env bash
# Optional router tuning of a finished demo's merged model (docs/METHOD.md: everything frozen but
# the router rows, on public data plus small per-domain proxy sets; strict opt-out is given up),
# then its acceptance figures (studies/optout_check.sh):
#
#   studies/router_tune_proxies.sh [WORKDIR (runs/demo)] [DOCS (20)] [STEPS (200)] [LR (2e-3)]
#
# The proxy of each closed domain is its first DOCS training documents (DOCS=0: public data
# only), tokenized with the demo's tokenizer; every set gets an equal share of the rows.
# env FLEXRUN: the binary (default target/release/flexrun, built if missing).
set -euo pipefail
W=${1:-runs/demo}
DOCS=${2:-20}
STEPS=${3:-200}
LR=${4:-2e-3}
source "$(dirname "$0")/demo_lib.sh"
need_demo "$W" models/flexolmo-main
OUT="$W/router-tune/docs$DOCS-steps$STEPS-lr$LR"
mkdir -p "$OUT"
sets=("$W/data/public")
if [ "$DOCS" -gt 0 ]; then
  for d in $(closed_domains "$W"); do
    head -n "$DOCS" "$W/corpus/$d/train.jsonl" > "$OUT/$d.jsonl"
    "$B" data prepare --input "$OUT/$d.jsonl" --tokenizer "$W/tokenizer.json" --out "$OUT/proxy-$d" > /dev/null
    sets+=("$OUT/proxy-$d")
  done
fi
"$B" router-tune --model "$W/models/flexolmo-main" --data "${sets[@]}" --out "$OUT/model" \
  --steps "$STEPS" --lr "$LR" --warmup $((STEPS / 10)) --quiet
"$(dirname "$0")/optout_check.sh" "$OUT/model" "$W"
