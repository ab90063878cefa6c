// Embedding lookup y[n] = W[ids[n]] and its backward dW[v] = sum_{n: ids[n] = v} dy[n].
// CPU reference: src/ops/embedding.rs (embedding, EmbeddingBack). Wrapper:
// src/backend/cuda/embedding.rs. Test: tests/gpu_kernels.rs (embedding).
//
// The backward is deterministic without atomics: the wrapper groups the positions of each
// distinct id (CSR: uniq[u], positions[offsets[u]..offsets[u+1]] ascending, as the CPU loop
// visits them) and one thread per (distinct id, column) sums its rows in that order.
#include "common.cuh"

// W [vocab, h] (bf16 or f32), ids [n], y [n, h] bf16. Ids are checked by the wrapper; an
// out-of-range id gives a zero row here rather than a wild read.
template <typename T>
__device__ void embedding_fwd(const T *w, const unsigned *ids, bf16 *y, int n, int h, int vocab) {
  GRID_STRIDE(i, (long long)n * h) {
    const long long row = i / h, j = i % h;
    const unsigned id = ids[row];
    y[i] = id < (unsigned)vocab ? from_f32<bf16>(to_f32(w[(size_t)id * h + j])) : from_f32<bf16>(0.0f);
  }
}
extern "C" __global__ void embedding_fwd_bf16(const bf16 *w, const unsigned *ids, bf16 *y, int n, int h, int vocab) {
  embedding_fwd(w, ids, y, n, h, vocab);
}
extern "C" __global__ void embedding_fwd_f32(const float *w, const unsigned *ids, bf16 *y, int n, int h, int vocab) {
  embedding_fwd(w, ids, y, n, h, vocab);
}

// dW rows of the distinct ids (dW zeroed by the wrapper first). dy [n, h] bf16, dW [vocab, h]
// f32. Grid (ceil(h / blockDim.x), min(n_uniq, 65535)), grid-stride over distinct ids.
extern "C" __global__ void embedding_bwd_bf16(const bf16 *dy, const unsigned *uniq, const unsigned *offsets,
                                              const unsigned *positions, float *dw, int n_uniq, int h) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= h) return;
  for (int u = blockIdx.y; u < n_uniq; u += gridDim.y) {
    float acc = 0.0f;
    for (unsigned p = offsets[u]; p < offsets[u + 1]; ++p) acc += to_f32(dy[(size_t)positions[p] * h + j]);
    dw[(size_t)uniq[u] * h + j] = acc;
  }
}
