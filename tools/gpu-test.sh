#!/usr/bin/env bash
# Build the test binaries and the flexrun binary here (with CUDA kernels) and pack them into one
# folder that runs on a GPU machine with no Rust toolchain and no network:
#
#   tools/gpu-test.sh [OUT]        # default OUT: target/gpu-test (ignored by git)
#
# then, on the GPU machine, from a copy of the repository (carry the folder along, e.g. the
# device tool's `carry: ["target/gpu-test"]`):
#
#   target/gpu-test/run.sh                   # every test binary, then memcheck of the kernel tests
#   ONLY=gpu_kernels target/gpu-test/run.sh  # only binaries whose name matches the regex "gpu_kernels"
#
# It also writes OUT.tar.xz, the same folder compressed (~17 MiB), for copies that are size-limited;
# tools/gpu-check.sh runs everything from it.
#
# run.sh sets FLEXRUN_REQUIRE_GPU=1 (a missing GPU fails the CUDA tests instead of skipping
# them), logs every binary to $LOG_DIR (default OUT/logs) and exits non-zero on any failure.
# Binaries are stripped of debug info to keep the folder small (about 60 MiB).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/target/gpu-test}"
cd "$ROOT"

log() { echo "gpu-test: $*" >&2; }

# Kernels are compiled only when nvcc is found; without them every CUDA test would fail there.
if [[ -z "${NVCC:-}" ]] && ! command -v nvcc >/dev/null && [[ ! -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ]] &&
   [[ ! -x "$ROOT/.cuda/toolkit/bin/nvcc" ]]; then
  log "no nvcc: installing the project-local one (tools/setup-cuda.sh)"
  "$ROOT/tools/setup-cuda.sh" >/dev/null
fi

log "building (cargo build/test --release)"
cargo build --release --bin flexrun
msgs="$(mktemp)"
trap 'rm -f "$msgs"' EXIT
cargo test --release --no-run --message-format=json >"$msgs"

rm -rf "$OUT"
mkdir -p "$OUT/bin" "$OUT/tests"
# Test executables: compiler-artifact messages of test-profile targets with an executable.
python3 - "$msgs" "$OUT/bin" <<'EOF'
import json, shutil, sys, os
msgs, dst = sys.argv[1], sys.argv[2]
seen = set()
for line in open(msgs):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    kind = m["target"]["kind"][0]
    name = f'{kind}-{m["target"]["name"]}' if kind != "test" else m["target"]["name"]
    if name in seen:
        continue
    seen.add(name)
    shutil.copy2(m["executable"], os.path.join(dst, name))
    print(name)
EOF
# The kernel fatbins (magic 0xba55ed50) must be embedded, or every CUDA test would fail there.
python3 -c 'import sys; sys.exit(0 if b"\x50\xed\x55\xba" in open(sys.argv[1], "rb").read() else
  "gpu-test: the test binaries hold no CUDA kernels (no nvcc at build time? see the cargo warning)")' "$OUT/bin/gpu_kernels"
cp target/release/flexrun "$OUT/flexrun"
# The criterion GPU benchmarks (benches/gpu.rs), run there as `bench-gpu --bench`.
cargo bench --no-run --bench gpu --message-format=json 2>/dev/null | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        shutil.copy2(m["executable"], sys.argv[1])
' "$OUT/bench-gpu"
strip -g "$OUT"/bin/* "$OUT/flexrun" "$OUT/bench-gpu" 2>/dev/null || log "strip failed; binaries keep their debug info"
cp -r tests/fixtures "$OUT/tests/fixtures"

# The tests locate fixtures, the flexrun binary and scratch space through paths compiled in by
# cargo (CARGO_MANIFEST_DIR, CARGO_BIN_EXE_flexrun, CARGO_TARGET_TMPDIR); run.sh recreates them.
cat >"$OUT/paths.env" <<EOF
BUILD_ROOT='$ROOT'
BUILD_TARGET='$ROOT/target'
EOF

cat >"$OUT/run.sh" <<'EOF'
#!/usr/bin/env bash
# Run the packed flexrun tests on a GPU machine (made by tools/gpu-test.sh). Env: ONLY (a regex
# the binary names must match), LOG_DIR, TEST_TIMEOUT (seconds per binary, default 1200),
# MEMCHECK=0 to skip compute-sanitizer, TESTS=0 to run only compute-sanitizer. Extra arguments go to every test binary.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG="${LOG_DIR:-$HERE/logs}"
mkdir -p "$LOG"
SUMMARY="$LOG/summary.txt"
: >"$SUMMARY"
source "$HERE/paths.env"

# Recreate the compiled-in paths where they are missing (never replace what exists).
link() {
  if [[ ! -e "$1" ]]; then
    mkdir -p "$(dirname "$1")" && ln -s "$2" "$1" || echo "warning: cannot create $1" | tee -a "$SUMMARY"
  fi
}
link "$BUILD_ROOT/tests/fixtures" "$HERE/tests/fixtures"
link "$BUILD_TARGET/release/flexrun" "$HERE/flexrun"
mkdir -p "$BUILD_TARGET/tmp" 2>/dev/null || true

# cuBLAS ships with PyTorch's nvidia wheels or a CUDA toolkit, often outside the loader's path.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.13'; then
  for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 \
           $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))' 2>/dev/null) \
           $(find / -xdev -name 'libcublas.so.13*' -printf '%h\n' 2>/dev/null | sort -u | head -n 3); do
    if ls "$d"/libcublas.so.13* >/dev/null 2>&1; then
      export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      echo "cuBLAS from $d" >>"$SUMMARY"
      break
    fi
  done
fi

export FLEXRUN_REQUIRE_GPU=1
export RUST_BACKTRACE=1
{ nvidia-smi 2>&1 || echo "nvidia-smi failed"; echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"; } >"$LOG/environment.txt"
cd "$BUILD_ROOT" 2>/dev/null || cd "$HERE"

fail=0
for t in "$HERE"/bin/*; do
  name="$(basename "$t")"
  [[ "${TESTS:-1}" == 0 || ( -n "${ONLY:-}" && ! "$name" =~ $ONLY ) ]] && continue
  start=$(date +%s)
  timeout "${TEST_TIMEOUT:-1200}" "$t" "$@" >"$LOG/$name.log" 2>&1
  rc=$?
  line="$(grep -E '^test result:' "$LOG/$name.log" | tail -n1)"
  printf '%-28s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$line" | tee -a "$SUMMARY"
  [[ $rc == 0 ]] || fail=1
done

# Memory errors in the kernels: the cuda tests of every gpu_* binary under compute-sanitizer's
# memcheck, one thread (MEMCHECK_TIMEOUT seconds per binary, default 600).
if [[ "${MEMCHECK:-1}" != 0 ]]; then
  CS="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n1)"
  for t in "$HERE"/bin/gpu_*; do
    name="$(basename "$t")"
    [[ -n "${ONLY:-}" && ! "$name" =~ $ONLY ]] && continue
    if [[ -z "$CS" ]]; then
      echo "memcheck: compute-sanitizer not found, skipped" | tee -a "$SUMMARY"
      break
    fi
    start=$(date +%s)
    timeout "${MEMCHECK_TIMEOUT:-600}" "$CS" --tool memcheck --error-exitcode 99 --log-file "$LOG/memcheck-$name.log" \
      "$t" cuda --test-threads=1 >"$LOG/memcheck-$name-tests.log" 2>&1
    rc=$?
    printf '%-28s rc=%-3s %4ss  %s\n' "memcheck $name" "$rc" "$(( $(date +%s) - start ))" \
      "$(tail -n1 "$LOG/memcheck-$name.log" 2>/dev/null)" | tee -a "$SUMMARY"
    [[ $rc == 0 ]] || fail=1
  done
fi
# Shared-memory races in the Hopper attention kernels (warp-specialised, mbarrier-synchronised):
# racecheck of gpu_flash's *_sm90 tests (forward, backward, decode; SKIP on a GPU other than sm_90).
if [[ "${MEMCHECK:-1}" != 0 && "${RACECHECK:-1}" != 0 && -x "$HERE/bin/gpu_flash" && -n "${CS:-}" &&
      ( -z "${ONLY:-}" || "gpu_flash" =~ $ONLY ) ]]; then
  start=$(date +%s)
  timeout "${MEMCHECK_TIMEOUT:-600}" "$CS" --tool racecheck --error-exitcode 99 --log-file "$LOG/racecheck-gpu_flash.log" \
    "$HERE/bin/gpu_flash" _sm90 --test-threads=1 >"$LOG/racecheck-gpu_flash-tests.log" 2>&1
  rc=$?
  printf '%-28s rc=%-3s %4ss  %s\n' "racecheck gpu_flash" "$rc" "$(( $(date +%s) - start ))" \
    "$(tail -n1 "$LOG/racecheck-gpu_flash.log" 2>/dev/null)" | tee -a "$SUMMARY"
  [[ $rc == 0 ]] || fail=1
fi
echo "logs in $LOG" | tee -a "$SUMMARY"
exit $fail
EOF
chmod +x "$OUT/run.sh"
# One compressed archive of the folder (~17 MiB instead of ~95): what a size-limited copy to the GPU
# machine carries; tools/gpu-check.sh unpacks and runs it there.
tar -C "$(dirname "$OUT")" -cJf "$OUT.tar.xz" "$(basename "$OUT")"
log "packed $(ls "$OUT/bin" | wc -l) test binaries into $OUT ($(du -sh "$OUT" | cut -f1)) and $OUT.tar.xz ($(du -sh "$OUT.tar.xz" | cut -f1)); run $OUT/run.sh (or tools/gpu-check.sh) on the GPU machine"
