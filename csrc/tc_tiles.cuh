// Shared-memory tiles of the tensor-core kernels (forward and backward): XOR-swizzled 16-bit
// [rows][DM] tiles filled by cp.async.  A 16-byte chunk (8 elements) of row r lands at chunk
// index (chunk ^ (r % 8)) within its group of 8 chunks, so the 8 row addresses of one ldmatrix
// 8x8 matrix hit 8 different bank groups.
#pragma once

#include <cstdint>

#include "prefix_attention_tiles.cuh"
#include "tc_primitives.cuh"

namespace spk {
namespace tc {

constexpr int kStages = 2;  // cp.async stages of the streamed tiles

// Element offset of (row, col) in a swizzled [rows][DM] 16-bit tile (col % 8 kept in the chunk).
template <int DM>
__device__ __forceinline__ int swz(int row, int col) {
  return row * DM + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8 + (col & 7);
}

// cp.async of rows [r0, r0 + ROWS) x [0, DM) of a [rows, D] matrix (unit last stride, row stride
// `rs` elements, both 16-byte aligned) into a swizzled tile; rows >= r_lim and cols >= D -> 0, and
// rows whose `pad` entry is false (padded-out keys: pad = key_padding_mask row, pad_s its stride) -> 0,
// so that NaN/inf held by padded keys/values contributes nothing.
template <typename T, int DM, int ROWS>
__device__ __forceinline__ void load_tile_async(T* s, const T* g, int64_t rs, int r0, int r_lim, int D,
                                                const bool* pad = nullptr, int64_t pad_s = 0) {
  constexpr int C = DM / 8, RSTEP = kThreads / C;  // rows per pass
  static_assert(kThreads % C == 0 && ROWS % RSTEP == 0, "tile");
  const int r = (int)threadIdx.x / C, c = (int)threadIdx.x % C;
  const bool col_ok = c * 8 < D;
  const T* src = g + (int64_t)(r0 + r) * rs + c * 8;
  const int64_t step = (int64_t)RSTEP * rs;
  T* dst = s + swz<DM>(r, c * 8);  // swz(r + RSTEP * it, col) = swz(r, col) + RSTEP * it * DM (RSTEP % 8 == 0)
#pragma unroll
  for (int it = 0; it < ROWS / RSTEP; ++it) {
    const int row = r0 + r + it * RSTEP;
    const bool ok = col_ok && row < r_lim && (pad == nullptr || pad[(int64_t)row * pad_s]);
    cp_async_16(dst + it * RSTEP * DM, ok ? src : g, ok);
    src += step;
  }
}

}  // namespace tc
}  // namespace spk
