# Shared by the study scripts that work on a finished demo's work directory; sourced, not run.
#   B                       the binary: $FLEXRUN, or the checkout's target/release/flexrun
#                           (built if missing), wherever the script is run from
#   need_demo W PATH        a one-line error and exit 1 unless W/PATH exists (a finished demo)
#   closed_domains W        the demo's closed domains, one per line
#   eval_on W D MODEL JSON  MODEL's held-out loss on W's domain D (no tasks), written to JSON
#   finetune_as_dense W D I OUT STEPS LR [FLAGS...]
#                           fine-tune W's public model on domain D with the schedule and seed of
#                           the demo's I-th dense expert (warmup STEPS/10, seed 20+I), quietly
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
B=${FLEXRUN:-$ROOT/target/release/flexrun}
[ -x "$B" ] || cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"

need_demo() {
  [ -e "$1/$2" ] || { echo "error: $1 has no finished demo (run: flexrun demo --out $1)" >&2; exit 1; }
}

closed_domains() {
  ls "$1/data" | grep -vx public
}

eval_on() {
  "$B" eval --model "$3" --data "$2=$1/data/$2" --tasks 0 --json "$4" > /dev/null
}

finetune_as_dense() {
  local w=$1 d=$2 i=$3 out=$4 steps=$5 lr=$6
  shift 6
  "$B" finetune --public "$w/models/public" --data "$w/data/$d" --out "$out" "$@" \
    --steps "$steps" --lr "$lr" --warmup $((steps / 10)) --seed $((20 + i)) \
    --save-every 0 --quiet > /dev/null
}
