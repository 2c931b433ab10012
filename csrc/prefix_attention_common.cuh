// Shared definitions of the CUDA prefix-attention kernels.
//
// Everything here is plain C++ that also compiles with a host compiler (g++): the params
// struct, index arithmetic, the visibility predicate, and the online-softmax / LSE-merge
// updates.  csrc/tests/host_test.cpp executes these functions on the CPU.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SPK_HD __host__ __device__ __forceinline__
#else
#define SPK_HD inline
#endif

namespace spk {

// One struct carries every pointer, size and stride (elements, int64) of the forward and
// backward passes, as FlashAttention's Flash_fwd_params / Flash_bwd_params do.
// Shapes: q/out/dout/dq [B,Hq,L,D]; k/v/dk/dv [B,Hkv,S,D]; pk/pv [T,Hkv,P,D];
// prefix_index [B]; kpm [B,S] (bool); lse/delta [B,Hq,L] (float32);
// dpk/dpv (float32) are [B,Hkv,P,D] per-row partials (deterministic) or [T,Hkv,P,D]
// accumulators (atomic mode).
struct PrefixAttnParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* pk = nullptr;
  const void* pv = nullptr;
  const int64_t* prefix_index = nullptr;
  const bool* kpm = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  // backward
  const void* dout = nullptr;
  float* delta = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* dpk = nullptr;
  float* dpv = nullptr;
  // Optional float32 [B,Hq,L] (lse's strides).  When set, the backward runs an exact
  // row-statistics pass first: row_scale = 1 / sum_j exp(s_j - lse) and delta = sum_j P_ij dP_ij,
  // which removes the rounding error of the saved lse from the recomputed probabilities
  // (used for float32 inputs; low precision uses delta = rowsum(dout * out)).
  float* row_scale = nullptr;

  int64_t q_sb = 0, q_sh = 0, q_sl = 0, q_sd = 0;
  int64_t k_sb = 0, k_sh = 0, k_ss = 0, k_sd = 0;
  int64_t v_sb = 0, v_sh = 0, v_ss = 0, v_sd = 0;
  int64_t pk_st = 0, pk_sh = 0, pk_sp = 0, pk_sd = 0;
  int64_t pv_st = 0, pv_sh = 0, pv_sp = 0, pv_sd = 0;
  int64_t kpm_sb = 0, kpm_ss = 0;
  int64_t o_sb = 0, o_sh = 0, o_sl = 0, o_sd = 0;
  int64_t lse_sb = 0, lse_sh = 0, lse_sl = 0;  // also used for delta
  int64_t do_sb = 0, do_sh = 0, do_sl = 0, do_sd = 0;
  int64_t dq_sb = 0, dq_sh = 0, dq_sl = 0, dq_sd = 0;
  int64_t dk_sb = 0, dk_sh = 0, dk_ss = 0, dk_sd = 0;
  int64_t dv_sb = 0, dv_sh = 0, dv_ss = 0, dv_sd = 0;
  int64_t dp_sr = 0, dp_sh = 0, dp_sp = 0, dp_sd = 0;  // dpk/dpv buffers (same layout)

  int B = 0, Hq = 0, Hkv = 0, L = 0, S = 0, P = 0, D = 0, T = 0;
  float scale = 1.f;
  float dropout_p = 0.f;     // attention dropout on the probabilities (0: off)
  float keep_scale = 1.f;    // 1 / (1 - dropout_p)
  uint64_t seed = 0;
  bool causal = false;
  bool deterministic = true;
};

// ---------------------------------------------------------------- index arithmetic
SPK_HD int64_t offset4(int64_t i0, int64_t i1, int64_t i2, int64_t i3, int64_t s0, int64_t s1,
                       int64_t s2, int64_t s3) {
  return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3;
}

// GQA: query head h reads kv head h / (Hq / Hkv).
SPK_HD int kv_head_of(int h, int Hq, int Hkv) { return h / (Hq / Hkv); }

SPK_HD int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Number of tiles of size `block` covering n (0 when n == 0).
SPK_HD int num_tiles(int n, int block) { return n <= 0 ? 0 : ceil_div(n, block); }

// Last sequence column a causal query row i may see (bottom-right aligned); may be < 0.
SPK_HD int causal_last_col(int i, int L, int S) { return i + (S - L); }

// Exclusive end of the sequence columns that rows [m0, m0 + block_m) can see.
SPK_HD int seq_col_end(int m0, int block_m, int L, int S, bool causal) {
  if (!causal) return S;
  int last_row = m0 + block_m - 1;
  if (last_row > L - 1) last_row = L - 1;
  int end = causal_last_col(last_row, L, S) + 1;
  if (end > S) end = S;
  return end < 0 ? 0 : end;
}

// First query row that can see sequence column j under causal masking (0 if not causal).
SPK_HD int causal_first_row(int j, int L, int S, bool causal) {
  if (!causal) return 0;
  int r = j - (S - L);
  return r < 0 ? 0 : r;
}

// Visibility of sequence column j (0 <= j < S) for query row i; `pad_ok` is
// key_padding_mask[b, j] (true when no mask is given).  Prefix columns are always visible.
SPK_HD bool seq_visible(int i, int j, int L, int S, bool causal, bool pad_ok) {
  if (i < 0 || i >= L || j < 0 || j >= S) return false;
  if (causal && j > causal_last_col(i, L, S)) return false;
  return pad_ok;
}

SPK_HD bool prefix_visible(int i, int c, int L, int P) { return i >= 0 && i < L && c >= 0 && c < P; }

// ---------------------------------------------------------------- softmax updates
SPK_HD float neg_inf() { return -INFINITY; }

// Full-precision expf/logf (not __expf/__logf): the backward recomputes probabilities from the
// saved lse, and float32 inputs must meet the same tolerance rule as the low-precision ones.
SPK_HD float fast_exp(float x) { return expf(x); }

SPK_HD float safe_log(float x) { return logf(x); }

// Running state of one softmax row: max m and denominator l (both relative to m).
struct SoftmaxRow {
  float m;
  float l;
};

SPK_HD SoftmaxRow softmax_row_init() { return SoftmaxRow{-INFINITY, 0.f}; }

// New running max after seeing a tile whose row max is tile_max; returns the factor that
// rescales the old accumulator and denominator (0 when the old max was -inf).
SPK_HD float online_rescale(SoftmaxRow& row, float tile_max) {
  float m_new = row.m > tile_max ? row.m : tile_max;
  float alpha = (row.m == -INFINITY) ? 0.f : fast_exp(row.m - m_new);
  row.m = m_new;
  row.l *= alpha;
  return alpha;
}

// exp(s - m) that is 0 for a masked score (s == -inf), also when m == -inf.
SPK_HD float masked_exp(float s, float m) { return (s == -INFINITY) ? 0.f : fast_exp(s - m); }

// Probability recomputed in backward from the saved lse (0 for masked score or empty row).
SPK_HD float prob_from_lse(float s, float lse) {
  return (s == -INFINITY || lse == -INFINITY) ? 0.f : fast_exp(s - lse);
}

// Natural-log logsumexp of the row; -inf for a row with no visible column.
SPK_HD float row_lse(SoftmaxRow row) {
  return (row.l > 0.f) ? row.m + safe_log(row.l) : -INFINITY;
}

// 1 / l, or 0 for an empty row (output becomes 0, never NaN).
SPK_HD float row_inv_l(SoftmaxRow row) { return (row.l > 0.f) ? 1.f / row.l : 0.f; }

// Merge two partial softmax states (e.g. prefix block and sequence block computed apart).
SPK_HD SoftmaxRow merge_rows(SoftmaxRow a, SoftmaxRow b, float* wa, float* wb) {
  float m = a.m > b.m ? a.m : b.m;
  if (m == -INFINITY) {
    *wa = 0.f;
    *wb = 0.f;
    return SoftmaxRow{-INFINITY, 0.f};
  }
  *wa = (a.m == -INFINITY) ? 0.f : fast_exp(a.m - m);
  *wb = (b.m == -INFINITY) ? 0.f : fast_exp(b.m - m);
  return SoftmaxRow{m, a.l * *wa + b.l * *wb};
}

// Merge of two log-sum-exp values: log(exp(a) + exp(b)), -inf aware.
SPK_HD float lse_merge(float a, float b) {
  float m = a > b ? a : b;
  if (m == -INFINITY) return -INFINITY;
  return m + safe_log(fast_exp(a - m) + fast_exp(b - m));
}

// ---------------------------------------------------------------- dropout
// 32-bit integer finalizer (xorshift-multiply); multipliers below 2^31 so that the Python
// side (dropout_keep_mask) reproduces it exactly with int64 tensor arithmetic.
SPK_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x5bd1e995u;
  x ^= x >> 16;
  return x;
}

// Keep decision of probability (b, h, i, c); c = combined column (prefix c < P, sequence P + j).
// Uniform u = top 24 bits of the hash / 2^24; kept iff u >= p (exact in float32).
SPK_HD bool dropout_keep(uint64_t seed, int b, int h, int i, int c, float p) {
  uint32_t x = mix32((uint32_t)c);
  x = mix32(x ^ (uint32_t)i);
  x = mix32(x ^ (uint32_t)h);
  x = mix32(x ^ (uint32_t)b);
  x = mix32(x ^ (uint32_t)(seed >> 32));
  x = mix32(x ^ (uint32_t)(seed & 0xffffffffu));
  return (float)(x >> 8) * (1.0f / 16777216.0f) >= p;
}

// Dropout multiplier of one probability: 0 (dropped) or 1 / (1 - p) (kept); 1 without dropout.
SPK_HD float dropout_factor(const PrefixAttnParams& p, int b, int h, int i, int c) {
  if (p.dropout_p <= 0.f) return 1.f;
  return dropout_keep(p.seed, b, h, i, c, p.dropout_p) ? p.keep_scale : 0.f;
}

}  // namespace spk
