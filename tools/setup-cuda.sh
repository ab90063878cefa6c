#!/usr/bin/env bash
# Install a project-local CUDA compiler (nvcc, ptxas, cicc, headers) from pinned PyPI wheels into
# .cuda/ so that build.rs can compile kernels/*.cu on a machine with no CUDA toolkit and no GPU.
#
#   tools/setup-cuda.sh            # install (skips when already installed), print where nvcc is
#   tools/setup-cuda.sh --force    # reinstall
#
# Needs python3 with pip and PyPI access (about 100 MB downloaded); nvcc also needs the host
# compiler gcc/g++ (without it this script warns, and the build stays CPU-only).
# The wheels put a toolkit-like tree under site/nvidia/cu13/{bin,include,lib,nvvm}; .cuda/toolkit
# is a symlink to it, and build.rs looks for .cuda/toolkit/bin/nvcc. The five versions below must
# move together (a newer cicc emits PTX that an older ptxas rejects).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${FLEXRUN_CUDA_DIR:-$ROOT/.cuda}"
PINS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-nvvm==13.0.88
)
STAMP="$DEST/.installed"
WANT="${PINS[*]}"

log() { echo "setup-cuda: $*" >&2; }

# A toolkit is usable when nvcc runs and can build a fatbin with SASS (ptxas) and PTX.
smoke_test() {
  local nvcc="$1" tmp
  tmp="$(mktemp -d)"
  cat >"$tmp/t.cu" <<'EOF'
#include <cuda_bf16.h>
extern "C" __global__ void k(__nv_bfloat16 *x, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = __float2bfloat16(__expf(__bfloat162float(x[i])));
}
EOF
  if "$nvcc" -fatbin -O3 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=compute_90 \
      -o "$tmp/t.fatbin" "$tmp/t.cu" >"$tmp/log" 2>&1; then
    rm -rf "$tmp"
    return 0
  fi
  cat "$tmp/log" >&2
  rm -rf "$tmp"
  return 1
}

force=0
[[ "${1:-}" == "--force" ]] && force=1

if [[ $force == 0 && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$DEST/toolkit/bin/nvcc" ]]; then
  log "already installed (${PINS[*]})"
  echo "$DEST/toolkit/bin/nvcc"
  exit 0
fi

command -v python3 >/dev/null || { log "python3 is required"; exit 1; }
python3 -m pip --version >/dev/null 2>&1 || { log "pip is required (python3 -m pip)"; exit 1; }
have_host_cc=1
command -v gcc >/dev/null && command -v g++ >/dev/null || have_host_cc=0

log "installing ${PINS[*]} into $DEST/site"
rm -rf "$DEST/site" "$DEST/toolkit" "$STAMP"
mkdir -p "$DEST"
# --no-deps: the pins are the complete set; nvcc's own metadata would pull unpinned versions.
PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
  --target "$DEST/site" "${PINS[@]}"

# Locate the toolkit root (the folder holding bin/nvcc): nvidia/cu13 today; search so that a
# layout change (nvidia/cuda_nvcc/...) is still found.
NVCC_BIN="$(find "$DEST/site" -path '*/bin/nvcc' -type f | head -n1)"
[[ -n "$NVCC_BIN" ]] || { log "no bin/nvcc in the installed wheels"; exit 1; }
TK="$(cd "$(dirname "$NVCC_BIN")/.." && pwd)"
log "toolkit root: $TK"

# Split layouts (one folder per wheel) need the pieces merged into the root nvcc.profile expects:
# $TOP/nvvm/{bin/cicc,libdevice}, $TOP/include (crt/, cuda_runtime.h, cccl), $TOP/bin/ptxas.
for piece in nvvm/bin/cicc nvvm/libdevice/libdevice.10.bc include/cuda_runtime.h include/crt/host_config.h \
             include/cccl/cuda/std/version bin/ptxas bin/fatbinary; do
  if [[ ! -e "$TK/$piece" ]]; then
    found="$(find "$DEST/site" -path "*/$piece" | head -n1)"
    [[ -n "$found" ]] || { log "missing $piece in the installed wheels"; exit 1; }
    top="${piece%%/*}"
    src="${found%/"$piece"}/$top"
    log "linking $top from $src"
    if [[ -d "$TK/$top" ]]; then
      cp -rsn "$src/." "$TK/$top/"
    else
      ln -s "$src" "$TK/$top"
    fi
  fi
done
# pip --target drops the executable bit on nothing today, but be safe.
chmod +x "$TK"/bin/* "$TK"/nvvm/bin/* 2>/dev/null || true
# Relative link, so that the folder still works when the checkout moves.
ln -sfn "${TK#"$DEST"/}" "$DEST/toolkit"

cat >"$DEST/env.sh" <<EOF
# source this file to use the project-local nvcc in a shell
export CUDA_HOME="$DEST/toolkit"
export PATH="$DEST/toolkit/bin:\$PATH"
EOF

if [[ $have_host_cc == 0 ]]; then
  # Not fatal: build.rs sees no gcc and builds without kernels (with a warning), as without nvcc.
  log "warning: nvcc installed, but no host C++ compiler (gcc/g++): kernels cannot be built here (apt-get install g++)"
elif ! smoke_test "$DEST/toolkit/bin/nvcc"; then
  log "nvcc is installed but could not compile a test kernel (see above)"
  exit 1
fi
echo "$WANT" >"$STAMP"
# build.rs does not watch .cuda/ before it exists; a changed build.rs makes cargo rerun it.
[[ "$DEST" == "$ROOT/.cuda" && -f "$ROOT/build.rs" ]] && touch "$ROOT/build.rs"
log "ok: $("$DEST/toolkit/bin/nvcc" --version | tail -n2 | head -n1)"
echo "$DEST/toolkit/bin/nvcc"
