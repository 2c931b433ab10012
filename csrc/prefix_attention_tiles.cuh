// Device helpers shared by the forward and backward attention kernels: tile configurations,
// global->shared tile loads, dot products over a head-dim bucket.
#pragma once

#include "cuda_compat.cuh"
#include "dtype_utils.cuh"
#include "prefix_attention_common.cuh"

namespace spk {

constexpr int kThreads = 128;  // 4 warps per block for every attention kernel

// Tile shape of one kernel kind for head-dim bucket DM.  ROWS is the tile dimension owned by
// the block (queries for fwd/dq, keys for dkdv), COLS the one it loops over.  TPR threads own
// one ROWS entry and split its head dim (and the COLS entries) among themselves.
template <int DM, int ROWS, int COLS>
struct TileCfg {
  static constexpr int kDM = DM;
  static constexpr int kRows = ROWS;
  static constexpr int kCols = COLS;
  static constexpr int kTPR = kThreads / ROWS;
  static constexpr int kDPT = DM / kTPR;     // head-dim entries per thread
  static constexpr int kCPT = COLS / kTPR;   // COLS entries per thread
  static constexpr int kStride = DM + 1;     // padded shared-memory row stride (floats)
  static_assert(kThreads % ROWS == 0 && 32 % kTPR == 0, "TPR lanes must sit in one warp");
  static_assert(DM % kTPR == 0 && COLS % kTPR == 0, "bad tile");
};

// Forward / dQ: rows = queries, cols = keys.  dK/dV: rows = keys, cols = queries.
template <int DM> struct FwdCfg;
template <> struct FwdCfg<32> : TileCfg<32, 32, 64> {};
template <> struct FwdCfg<64> : TileCfg<64, 32, 32> {};
template <> struct FwdCfg<128> : TileCfg<128, 32, 32> {};
template <> struct FwdCfg<256> : TileCfg<256, 16, 32> {};

template <int DM> struct DqCfg;
template <> struct DqCfg<32> : TileCfg<32, 32, 64> {};
template <> struct DqCfg<64> : TileCfg<64, 32, 32> {};
template <> struct DqCfg<128> : TileCfg<128, 32, 32> {};
template <> struct DqCfg<256> : TileCfg<256, 16, 16> {};

template <int DM> struct DkvCfg;
template <> struct DkvCfg<32> : TileCfg<32, 32, 64> {};
template <> struct DkvCfg<64> : TileCfg<64, 32, 32> {};
template <> struct DkvCfg<128> : TileCfg<128, 32, 32> {};
template <> struct DkvCfg<256> : TileCfg<256, 16, 16> {};

// Load rows [r0, r0 + NROWS) x [0, DM) of a strided [rows, D] matrix into shared memory
// (row stride SSTRIDE floats), zero-filling rows >= r_lim, columns >= D and rows r whose
// `pad[r * pad_s]` is false (padded-out keys, see key_pad_row: whatever they hold, NaN/inf from
// an uninitialised buffer, must contribute nothing, and 0 * NaN would poison P V, dP and dQ).
template <typename T, int NROWS, int DM, int SSTRIDE>
__device__ __forceinline__ void load_tile(float* __restrict__ dst, const T* __restrict__ base,
                                          int64_t s_row, int64_t s_d, int r0, int r_lim, int D,
                                          const bool* pad = nullptr, int64_t pad_s = 0) {
  for (int idx = threadIdx.x; idx < NROWS * DM; idx += kThreads) {
    const int rr = idx / DM;
    const int d = idx % DM;
    const int r = r0 + rr;
    float x = 0.f;
    if (r < r_lim && d < D && (pad == nullptr || pad[(int64_t)r * pad_s]))
      x = to_float(base[(int64_t)r * s_row + (int64_t)d * s_d]);
    dst[rr * SSTRIDE + d] = x;
  }
}

// Dot product over the head-dim bucket with four interleaved accumulators (shorter
// dependency chains, and a smaller rounding error than one sequential sum).
template <int DM>
__device__ __forceinline__ float dot_smem(const float* __restrict__ a, const float* __restrict__ b) {
  static_assert(DM % 4 == 0, "head-dim bucket must be a multiple of 4");
  float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
#pragma unroll 4
  for (int d = 0; d < DM; d += 4) {
    acc0 = fmaf(a[d], b[d], acc0);
    acc1 = fmaf(a[d + 1], b[d + 1], acc1);
    acc2 = fmaf(a[d + 2], b[d + 2], acc2);
    acc3 = fmaf(a[d + 3], b[d + 3], acc3);
  }
  return (acc0 + acc1) + (acc2 + acc3);
}

// Reductions over the TPR consecutive lanes that share one row.
template <int TPR>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int off = TPR / 2; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
template <int TPR>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int off = TPR / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// True when sequence key n of batch row b is padded out (key_padding_mask False).
__device__ __forceinline__ bool key_padded(const PrefixAttnParams& p, int64_t b, int n) {
  return p.kpm != nullptr && !p.kpm[b * p.kpm_sb + (int64_t)n * p.kpm_ss];
}

// Key source of combined-column tile `t`: the prefix block (tiles [0, n_prefix_tiles)) with no
// batch stride, then the sequence keys of row b.
struct KeySource {
  int64_t k_off, v_off;        // element offsets of (row/task, kv head)
  int64_t k_sn, k_sd, v_sn, v_sd;
  int n0;                      // first column of the tile inside its block
  int n_lim;                   // exclusive column limit inside its block
  bool is_prefix;
};

__device__ __forceinline__ KeySource key_source(const PrefixAttnParams& p, int t, int n_prefix_tiles,
                                                int block_n, int b, int hk, int64_t task,
                                                int seq_end) {
  KeySource ks;
  if (t < n_prefix_tiles) {
    ks.is_prefix = true;
    ks.k_off = task * p.pk_st + (int64_t)hk * p.pk_sh;
    ks.v_off = task * p.pv_st + (int64_t)hk * p.pv_sh;
    ks.k_sn = p.pk_sp; ks.k_sd = p.pk_sd; ks.v_sn = p.pv_sp; ks.v_sd = p.pv_sd;
    ks.n0 = t * block_n;
    ks.n_lim = p.P;
  } else {
    ks.is_prefix = false;
    ks.k_off = (int64_t)b * p.k_sb + (int64_t)hk * p.k_sh;
    ks.v_off = (int64_t)b * p.v_sb + (int64_t)hk * p.v_sh;
    ks.k_sn = p.k_ss; ks.k_sd = p.k_sd; ks.v_sn = p.v_ss; ks.v_sd = p.v_sd;
    ks.n0 = (t - n_prefix_tiles) * block_n;
    ks.n_lim = seq_end;
  }
  return ks;
}

// Visibility of column n (inside the source block) for query row i of batch row b.
__device__ __forceinline__ bool column_visible(const PrefixAttnParams& p, const KeySource& ks,
                                               int i, int n, int b) {
  if (ks.is_prefix) return prefix_visible(i, n, p.L, p.P);
  if (n >= ks.n_lim) return false;
  return seq_visible(i, n, p.L, p.S, p.causal, !key_padded(p, b, n));
}

// Row b's key_padding_mask (stride p.kpm_ss per key) for the tile loaders when `ks` is a sequence
// tile and a mask is given, else nullptr (prefix keys are never padded).
__device__ __forceinline__ const bool* key_pad_row(const PrefixAttnParams& p, const KeySource& ks, int64_t b) {
  return (ks.is_prefix || p.kpm == nullptr) ? nullptr : p.kpm + b * p.kpm_sb;
}

__device__ __forceinline__ int64_t prefix_task(const PrefixAttnParams& p, int b) {
  return (p.P > 0 && p.prefix_index != nullptr) ? p.prefix_index[b] : 0;
}

}  // namespace spk
