#!/usr/bin/env bash
# Everything that needs a GPU, in one call on the GPU machine, from the repository root, with the
# archive tools/gpu-test.sh made on the build machine (carry target/gpu-test.tar.xz along):
#
#   tools/gpu-check.sh [ARCHIVE] [RESULTS]   # defaults: target/gpu-test.tar.xz, $OUT or gpu-results
#
# 1. every GPU test binary (gpu_*) with FLEXRUN_REQUIRE_GPU=1, unless TESTS=0; on an sm_90 GPU,
#    gpu_model, gpu_flash and gpu_grouped again with the Hopper kernels (FLEXRUN_SM90=1), unless
#    SM90=0;
# 2. the main job trained and evaluated on the GPU: `flexrun demo --quick`, then the full demo
#    (its table in logs/demo-results.md), unless DEMO=0;
# 3. compute-sanitizer memcheck of every gpu_* binary's CUDA tests and racecheck of the Hopper
#    attention kernels' tests, unless MEMCHECK=0 (RACECHECK=0 skips the racecheck);
# 4. every benchmark with its PyTorch baseline (tools/gpu-bench.sh), unless BENCH=0;
# 5. with CRITERION=1, the criterion GPU benchmarks (benches/gpu.rs).
# Logs and benchmark JSON are packed into RESULTS/gpu-check.tgz after each phase (so a call cut
# short still returns what was done); a summary goes to stdout. Exits non-zero if anything failed.
#
# DEADLINE=S (seconds from the start) fits the whole check into a time limit: each phase is cut at
# the deadline and a phase that would start with under 15 s left is skipped (and reported);
# TESTS_S, DEMO_S, MEMCHECK_S, BENCH_S and CRITERION_S cap the phases one by one.
# TESTS_ONLY=REGEX runs only the test binaries (and their FLEXRUN_SM90=1 reruns) whose names
# match; BENCH_ONLY=REGEX runs only the benchmarks whose names match (tools/gpu-bench.sh's ONLY);
# MEMCHECK_ONLY=NAME sanitizes only the gpu_* binaries whose names contain NAME.
# A short check of the Hopper kernels, for example:
#   DEADLINE=540 DEMO=0 MEMCHECK=0 TESTS_ONLY='gpu_(flash|grouped)' \
#     BENCH_ONLY='attention|moe' tools/gpu-check.sh
set -uo pipefail
ARCHIVE="${1:-target/gpu-test.tar.xz}"
RESULTS="${2:-${OUT:-gpu-results}}"
WORK="$(mktemp -d)"
mkdir -p "$RESULTS" "$WORK/logs" "$WORK/bench"
tar -C "$WORK" -xJf "$ARCHIVE" || { echo "gpu-check: cannot unpack $ARCHIVE"; exit 1; }
G="$WORK/gpu-test"
pack() { tar -C "$WORK" -czf "$RESULTS/gpu-check.tgz" logs bench; }
fail=0
# left CAP: the seconds a phase may take, CAP or what is left before DEADLINE (5 s kept for packing).
left() {
  local cap="$1" rest
  [[ -z "${DEADLINE:-}" ]] && { echo "$cap"; return; }
  rest=$((DEADLINE - SECONDS - 5))
  echo $((rest < cap ? rest : cap))
}
# phase NAME CAP: true when the phase has at least 15 s; otherwise reports the skip.
phase() {
  if (($(left "$2") < 15)); then
    echo "== $1: skipped (deadline)"; fail=1; return 1
  fi
  echo "== $1"
}
nvidia-smi -L
if [[ "${TESTS:-1}" != 0 ]] && phase tests "${TESTS_S:-100000}"; then
  timeout "$(left "${TESTS_S:-100000}")" env LOG_DIR="$WORK/logs" MEMCHECK=0 ONLY="${TESTS_ONLY:-gpu_}" "$G/run.sh" || fail=1
  grep -hE "panicked" -A2 "$WORK"/logs/gpu_*.log | head -40
  pack
fi
# The model, attention and grouped GEMM tests again with the Hopper kernels in every path that
# has them (FLEXRUN_SM90=1; opt-in until verified), on a compute capability 9.0 GPU only.
if [[ "${TESTS:-1}" != 0 && "${SM90:-1}" != 0 ]] && nvidia-smi --query-gpu=compute_cap --format=csv,noheader | grep -q "^9.0" &&
   phase "tests with FLEXRUN_SM90=1" "${TESTS_S:-100000}"; then
  for only in gpu_model gpu_flash gpu_grouped; do
    [[ -n "${TESTS_ONLY:-}" && ! "$only" =~ $TESTS_ONLY ]] && continue
    timeout "$(left "${TESTS_S:-100000}")" env FLEXRUN_SM90=1 LOG_DIR="$WORK/logs/sm90" MEMCHECK=0 ONLY=$only "$G/run.sh" || fail=1
  done
  grep -hE "panicked" -A2 "$WORK"/logs/sm90/gpu_*.log 2>/dev/null | head -20
  pack
fi
if [[ "${DEMO:-1}" != 0 ]] && phase "demo on the GPU" "${DEMO_S:-100000}"; then
  for run in demo-quick:--quick demo:; do
    name="${run%%:*}"
    start=$SECONDS
    if timeout "$(left "${DEMO_S:-100000}")" "$G/flexrun" demo ${run#*:} --device cuda --out "$WORK/$name" >"$WORK/logs/$name.log" 2>&1; then
      echo "$name: ok in $((SECONDS - start)) s"
    else
      echo "$name: FAILED"; tail -5 "$WORK/logs/$name.log"; fail=1
    fi
  done
  cp "$WORK/demo/results.md" "$WORK/logs/demo-results.md" 2>/dev/null && grep -E "^- \[" "$WORK/logs/demo-results.md"
  pack
fi
if [[ "${MEMCHECK:-1}" != 0 ]] && phase compute-sanitizer "${MEMCHECK_S:-100000}"; then
  timeout "$(left "${MEMCHECK_S:-100000}")" env LOG_DIR="$WORK/logs/memcheck" TESTS=0 ONLY="gpu_.*${MEMCHECK_ONLY:-}" "$G/run.sh" || fail=1
  pack
fi
if [[ "${BENCH:-1}" != 0 ]] && phase benchmarks "${BENCH_S:-100000}"; then
  timeout "$(left "${BENCH_S:-100000}")" env BENCH_TIMEOUT="${BENCH_TIMEOUT:-120}" ONLY="${BENCH_ONLY:-}" tools/gpu-bench.sh "$G/flexrun" "$WORK/bench" || fail=1
  pack
fi
if [[ "${CRITERION:-0}" == 1 && -x "$G/bench-gpu" ]] && phase criterion "${CRITERION_S:-100000}"; then
  timeout "$(left "${CRITERION_S:-100000}")" "$G/bench-gpu" --bench 2>&1 | tee "$WORK/bench/criterion.txt" | grep -E "time:|thrpt:|^[a-z_]+/" || fail=1
  pack
fi
echo "results in $RESULTS/gpu-check.tgz"
exit $fail
