// Prefix-attention backward on tensor cores (sm_80+; FlashAttention-2 structure).  The delta
// preprocess (delta = rowsum(dO * O)) and the deterministic prefix reduction are the SIMT
// kernels of prefix_attention_bwd.cu; this file has the two main kernels.  P is recomputed from
// the saved lse: P = exp2(S * scale*log2(e) - lse*log2(e)), 0 for masked scores and empty rows.
//
// dK/dV: one CTA of 4 warps per (64-key tile, kv head, row); warp w owns keys [16w, 16w + 16).
//   Key tiles: the prefix block [P, D] of task prefix_index[b] (no batch stride), then the row's
//   own keys.  K and V stay in shared memory; the CTA streams (query head of its GQA group,
//   query tile of BQ) pairs, Q / dO / lse / delta double-buffered by cp.async.  Per pair:
//     S^T  [16 x BQ] = K Q^T      dP^T = V dO^T          (A: K / V by ldmatrix, B: Q / dO)
//     P^T = exp2(S^T * sl2 - lse2), dS^T = P^T (dP^T z - delta)   (z: dropout keep / (1 - p))
//     dV += (P^T z) dO            dK += dS^T Q           (A: the accumulators, B: ldmatrix.trans)
//   Sequence tiles write dK * scale, dV; prefix tiles write float32 per-row partials [B,Hkv,P,D]
//   (deterministic) or atomically add into [T,Hkv,P,D] (atomic mode), as the SIMT kernel.
// dQ: one CTA per (64-query tile, head, row), the forward's loop over prefix + sequence key tiles
//   (K/V double-buffered by cp.async):  S = Q K^T, dP = dO V^T, dS = P (dP z - delta),
//   dQ += dS K (B: K by ldmatrix.trans); out dQ * scale.
// Shared tiles are the swizzled 16-bit tiles of tc_tiles.cuh; DM in {64, 128} is the head-dim
// bucket, D <= DM, D % 8 == 0 (see choose_bwd_path).
#include "cuda_compat.cuh"

#include "launchers.h"
#include "prefix_attention_tiles.cuh"
#include "tc_primitives.cuh"
#include "tc_tiles.cuh"

namespace spk {
namespace tc {

constexpr int kKeys = 64;     // keys per dK/dV CTA, 16 per warp
constexpr int kQueries = 64;  // queries per dQ CTA, 16 per warp
constexpr float kLog2e = 1.4426950408889634f;

// Tiles streamed through the main loops: the query tile of the dK/dV kernel and the key tile of
// the dQ kernel.  Smaller at DM = 128, where dK + dV (2 x 64 floats per thread) or dQ (64) with
// S and dP of a 32-wide tile is what fits in 255 registers without spills.
template <int DM>
constexpr int kDkdvQTile = DM <= 64 ? 64 : 16;
template <int DM>
constexpr int kDqKeyTile = DM <= 64 ? 64 : 32;

template <int DM>
constexpr size_t dkdv_smem_bytes() {
  constexpr int BQ = kDkdvQTile<DM>;
  return 2 * (size_t)(2 * kKeys * DM + 2 * kStages * BQ * DM) + sizeof(float) * 2 * kStages * BQ;
}
template <int DM>
constexpr size_t dq_smem_bytes() {
  return 2 * (size_t)(2 * kQueries * DM + 2 * kStages * kDqKeyTile<DM> * DM);  // Q, dO + K/V stages
}
static_assert(dkdv_smem_bytes<128>() <= 99 * 1024 && dq_smem_bytes<128>() <= 99 * 1024, "smem");

// lse * log2(e) for the exp2 of P; +inf for a row that sees nothing (or does not exist), so P = 0.
__device__ __forceinline__ float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// dk/dv accumulator -> sequence gradient (T) or float32 prefix partial / atomic accumulator.
template <typename T, int NO>
__device__ __forceinline__ void store_dkdv(const PrefixAttnParams& p, const KeySource& ks, int b, int hk,
                                           int64_t task, int n_row0, const float (&dk)[NO][4],
                                           const float (&dv)[NO][4], int t4) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int n = n_row0 + 8 * r;
    if (n >= ks.n_lim) continue;
#pragma unroll
    for (int c = 0; c < NO; ++c)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int d = c * 8 + 2 * t4 + j;
        if (d >= p.D) continue;
        const float gk = dk[c][2 * r + j] * p.scale, gv = dv[c][2 * r + j];
        if (!ks.is_prefix) {
          static_cast<T*>(p.dk)[(int64_t)b * p.dk_sb + (int64_t)hk * p.dk_sh + (int64_t)n * p.dk_ss +
                                (int64_t)d * p.dk_sd] = from_float<T>(gk);
          static_cast<T*>(p.dv)[(int64_t)b * p.dv_sb + (int64_t)hk * p.dv_sh + (int64_t)n * p.dv_ss +
                                (int64_t)d * p.dv_sd] = from_float<T>(gv);
        } else {
          const int64_t slot = p.deterministic ? (int64_t)b : task;
          const int64_t o = slot * p.dp_sr + (int64_t)hk * p.dp_sh + (int64_t)n * p.dp_sp + (int64_t)d * p.dp_sd;
          if (p.deterministic) {
            p.dpk[o] = gk;
            p.dpv[o] = gv;
          } else {
            atomicAdd(p.dpk + o, gk);
            atomicAdd(p.dpv + o, gv);
          }
        }
      }
  }
}

template <typename T, int DM, bool kDropout>
__global__ void __launch_bounds__(kThreads) prefix_attn_bwd_dkdv_tc_kernel(const PrefixAttnParams p) {
#if SPK_TC_ENABLED
  constexpr int BN = kKeys, BQ = kDkdvQTile<DM>;
  constexpr int KD = DM / 16;  // k-steps of S^T = K Q^T and dP^T = V dO^T
  constexpr int NQ = BQ / 8;   // n-tiles of S^T (8 queries each)
  constexpr int NO = DM / 8;   // n-tiles of dK / dV (8 head-dim columns each)
  SPK_DYNAMIC_SMEM_BYTES(smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);                          // [BN][DM]
  T* sV = sK + BN * DM;                                            // [BN][DM]
  T* sQ = sV + BN * DM;                                            // [kStages][BQ][DM]
  T* sdO = sQ + kStages * BQ * DM;                                 // [kStages][BQ][DM]
  float* sLse = reinterpret_cast<float*>(sdO + kStages * BQ * DM);  // [kStages][BQ] lse_log2
  float* sDelta = sLse + kStages * BQ;                              // [kStages][BQ]

  const int tid = (int)threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int hk = (int)blockIdx.y, b = (int)blockIdx.z;
  const int64_t task = prefix_task(p, b);
  const KeySource ks = key_source(p, (int)blockIdx.x, num_tiles(p.P, BN), BN, b, hk, task, p.S);
  const int group = p.Hq / p.Hkv;
  const int m_first = ks.is_prefix ? 0 : causal_first_row(ks.n0, p.L, p.S, p.causal) / BQ * BQ;
  const int n_q = num_tiles(p.L - m_first, BQ);
  const int n_iters = group * n_q;  // (query head, query tile) pairs
  const float sl2 = p.scale * kLog2e;
  const bool* pad = key_pad_row(p, ks, b);

  load_tile_async<T, DM, BN>(sK, static_cast<const T*>(ks.is_prefix ? p.pk : p.k) + ks.k_off, ks.k_sn, ks.n0,
                             ks.n_lim, p.D, pad, p.kpm_ss);
  load_tile_async<T, DM, BN>(sV, static_cast<const T*>(ks.is_prefix ? p.pv : p.v) + ks.v_off, ks.v_sn, ks.n0,
                             ks.n_lim, p.D, pad, p.kpm_ss);
  auto issue_q = [&](int it) {  // Q, dO (cp.async) and lse, delta (plain stores) of pair `it`
    const int st = it % kStages, h = hk * group + it / n_q, m0 = m_first + (it % n_q) * BQ;
    const T* q = static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)h * p.q_sh;
    const T* dO = static_cast<const T*>(p.dout) + (int64_t)b * p.do_sb + (int64_t)h * p.do_sh;
    load_tile_async<T, DM, BQ>(sQ + st * BQ * DM, q, p.q_sl, m0, p.L, p.D);
    load_tile_async<T, DM, BQ>(sdO + st * BQ * DM, dO, p.do_sl, m0, p.L, p.D);
    const int64_t lrow = (int64_t)b * p.lse_sb + (int64_t)h * p.lse_sh;
    for (int m = tid; m < BQ; m += kThreads) {
      const bool ok = m0 + m < p.L;
      sLse[st * BQ + m] = ok ? lse_log2(p.lse[lrow + (int64_t)(m0 + m) * p.lse_sl]) : INFINITY;
      sDelta[st * BQ + m] = ok ? p.delta[lrow + (int64_t)(m0 + m) * p.lse_sl] : 0.f;
    }
  };
  if (n_iters > 0) issue_q(0);
  cp_async_commit();

  float dk[NO][4], dv[NO][4];
#pragma unroll
  for (int c = 0; c < NO; ++c)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[c][e] = dv[c][e] = 0.f;
  // this thread's key rows n_row0 and n_row0 + 8 (columns inside the key block); a missing or
  // padded key (zero-filled in sK) must get P = 0, not exp(0 - lse)
  const int n_row0 = ks.n0 + warp * 16 + g;
  bool key_ok[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int n = n_row0 + 8 * r;
    key_ok[r] = n < ks.n_lim && (pad == nullptr || pad[(int64_t)n * p.kpm_ss]);
  }
  const bool keys_full = ks.n0 + BN <= ks.n_lim && pad == nullptr;
  const int shift = (ks.is_prefix || !p.causal) ? (1 << 30) : p.S - p.L;  // causal: key n <= i + shift
  const int li = lane % 8, mi = lane / 8;                                  // ldmatrix: row, matrix index

  for (int it = 0; it < n_iters; ++it) {
    if (it + 1 < n_iters) issue_q(it + 1);
    cp_async_commit();
    cp_async_wait<1>();  // K, V and pair `it` have landed (this thread's copies)
    __syncthreads();     // ... and every other thread's, with their lse / delta stores

    const int st = it % kStages, h = hk * group + it / n_q, m0 = m_first + (it % n_q) * BQ;
    const T* q_s = sQ + st * BQ * DM;
    const T* do_s = sdO + st * BQ * DM;
    const float* lse_s = sLse + st * BQ;
    const float* delta_s = sDelta + st * BQ;

    float s[NQ][4], dp[NQ][4];
#pragma unroll
    for (int n = 0; n < NQ; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t ka[4], va[4];
      ldmatrix_x4(ka, sK + swz<DM>(warp * 16 + (mi & 1) * 8 + li, kk * 16 + (mi >> 1) * 8));
      ldmatrix_x4(va, sV + swz<DM>(warp * 16 + (mi & 1) * 8 + li, kk * 16 + (mi >> 1) * 8));
#pragma unroll
      for (int np = 0; np < NQ / 2; ++np) {  // queries [16 np, 16 np + 16): two n-tiles per ldmatrix
        uint32_t qb[4], ob[4];
        ldmatrix_x4(qb, q_s + swz<DM>(np * 16 + (mi >> 1) * 8 + li, kk * 16 + (mi & 1) * 8));
        mma_16816<T>(s[2 * np], ka, qb, s[2 * np]);
        mma_16816<T>(s[2 * np + 1], ka, qb + 2, s[2 * np + 1]);
        ldmatrix_x4(ob, do_s + swz<DM>(np * 16 + (mi >> 1) * 8 + li, kk * 16 + (mi & 1) * 8));
        mma_16816<T>(dp[2 * np], va, ob, dp[2 * np]);
        mma_16816<T>(dp[2 * np + 1], va, ob + 2, dp[2 * np + 1]);
      }
    }

    // masks only where some (key, query) pair of the tile is not visible; query rows >= L and
    // empty rows have lse_log2 = +inf, so their P is 0 without a mask
    const bool full = keys_full && (shift == (1 << 30) || ks.n0 + BN - 1 <= m0 + shift);
#pragma unroll
    for (int n = 0; n < NQ; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, c = n * 8 + 2 * t4 + (e & 1), i = m0 + c;
        float sv = s[n][e];
        if (!full && (!key_ok[r] || n_row0 + 8 * r > i + shift)) sv = -INFINITY;
        const float pt = exp2_approx(fmaf(sv, sl2, -lse_s[c]));
        float z = 1.f;
        if constexpr (kDropout) {
          const int col = n_row0 + 8 * r;
          z = (pt > 0.f && dropout_keep(p.seed, b, h, i, ks.is_prefix ? col : p.P + col, p.dropout_p))
                  ? p.keep_scale : 0.f;
        }
        dp[n][e] = pt * (dp[n][e] * z - delta_s[c]);  // dS^T
        s[n][e] = pt * z;                             // dropped P^T
      }

    // dV += P^T dO, dK += dS^T Q: the accumulators of queries [16 kq, 16 kq + 16) are the A fragment
#pragma unroll
    for (int kq = 0; kq < BQ / 16; ++kq) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kq][0], s[2 * kq][1]), pack2<T>(s[2 * kq][2], s[2 * kq][3]),
                              pack2<T>(s[2 * kq + 1][0], s[2 * kq + 1][1]),
                              pack2<T>(s[2 * kq + 1][2], s[2 * kq + 1][3])};
      const uint32_t da[4] = {pack2<T>(dp[2 * kq][0], dp[2 * kq][1]), pack2<T>(dp[2 * kq][2], dp[2 * kq][3]),
                              pack2<T>(dp[2 * kq + 1][0], dp[2 * kq + 1][1]),
                              pack2<T>(dp[2 * kq + 1][2], dp[2 * kq + 1][3])};
#pragma unroll
      for (int dd = 0; dd < NO / 2; ++dd) {  // head-dim columns [16 dd, 16 dd + 16)
        uint32_t ob[4], qb[4];
        ldmatrix_x4_trans(ob, do_s + swz<DM>(kq * 16 + (mi & 1) * 8 + li, dd * 16 + (mi >> 1) * 8));
        mma_16816<T>(dv[2 * dd], pa, ob, dv[2 * dd]);
        mma_16816<T>(dv[2 * dd + 1], pa, ob + 2, dv[2 * dd + 1]);
        ldmatrix_x4_trans(qb, q_s + swz<DM>(kq * 16 + (mi & 1) * 8 + li, dd * 16 + (mi >> 1) * 8));
        mma_16816<T>(dk[2 * dd], da, qb, dk[2 * dd]);
        mma_16816<T>(dk[2 * dd + 1], da, qb + 2, dk[2 * dd + 1]);
      }
    }
    __syncthreads();  // stage `st` is refilled by the next iteration
  }
  cp_async_wait<0>();
  store_dkdv<T, NO>(p, ks, b, hk, task, n_row0, dk, dv, t4);
#endif
}

template <typename T, int DM, bool kDropout>
__global__ void __launch_bounds__(kThreads) prefix_attn_bwd_dq_tc_kernel(const PrefixAttnParams p) {
#if SPK_TC_ENABLED
  constexpr int BM = kQueries, BN = kDqKeyTile<DM>;
  constexpr int KD = DM / 16;  // k-steps of S = Q K^T and dP = dO V^T
  constexpr int NS = BN / 8;   // n-tiles of S (8 keys each)
  constexpr int NO = DM / 8;   // n-tiles of dQ
  SPK_DYNAMIC_SMEM_BYTES(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][DM]
  T* sdO = sQ + BM * DM;                   // [BM][DM]
  T* sK = sdO + BM * DM;                   // [kStages][BN][DM]
  T* sV = sK + kStages * BN * DM;          // [kStages][BN][DM]

  const int tid = (int)threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int m0 = (int)blockIdx.x * BM, h = (int)blockIdx.y, b = (int)blockIdx.z;
  const int hk = kv_head_of(h, p.Hq, p.Hkv);
  const int64_t task = prefix_task(p, b);
  const int n_pre = num_tiles(p.P, BN);
  const int seq_end = seq_col_end(m0, BM, p.L, p.S, p.causal);
  const int n_tiles = n_pre + num_tiles(seq_end, BN);
  const float sl2 = p.scale * kLog2e;

  auto issue_kv = [&](int t) {  // cp.async of key tile t into stage t % 2, one commit group
    const KeySource ks = key_source(p, t, n_pre, BN, b, hk, task, seq_end);
    const bool* pad = key_pad_row(p, ks, b);
    load_tile_async<T, DM, BN>(sK + (t % kStages) * BN * DM,
                               static_cast<const T*>(ks.is_prefix ? p.pk : p.k) + ks.k_off, ks.k_sn, ks.n0,
                               ks.n_lim, p.D, pad, p.kpm_ss);
    load_tile_async<T, DM, BN>(sV + (t % kStages) * BN * DM,
                               static_cast<const T*>(ks.is_prefix ? p.pv : p.v) + ks.v_off, ks.v_sn, ks.n0,
                               ks.n_lim, p.D, pad, p.kpm_ss);
  };
  load_tile_async<T, DM, BM>(sQ, static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)h * p.q_sh, p.q_sl,
                             m0, p.L, p.D);
  load_tile_async<T, DM, BM>(sdO, static_cast<const T*>(p.dout) + (int64_t)b * p.do_sb + (int64_t)h * p.do_sh,
                             p.do_sl, m0, p.L, p.D);
  if (n_tiles > 0) issue_kv(0);
  cp_async_commit();

  const int i0 = m0 + warp * 16 + g;  // query rows i0 (e < 2) and i0 + 8 (e >= 2)
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = i0 + 8 * r;
    const int64_t o = (int64_t)b * p.lse_sb + (int64_t)h * p.lse_sh + (int64_t)i * p.lse_sl;
    lse2[r] = i < p.L ? lse_log2(p.lse[o]) : INFINITY;
    delta[r] = i < p.L ? p.delta[o] : 0.f;
  }
  float dq[NO][4];
#pragma unroll
  for (int c = 0; c < NO; ++c)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[c][e] = 0.f;
  const int li = lane % 8, mi = lane / 8;

  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) issue_kv(t + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* k_s = sK + (t % kStages) * BN * DM;
    const T* v_s = sV + (t % kStages) * BN * DM;
    const KeySource ks = key_source(p, t, n_pre, BN, b, hk, task, seq_end);

    float s[NS][4], dp[NS][4];
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t qa[4], oa[4];
      ldmatrix_x4(qa, sQ + swz<DM>(warp * 16 + (mi & 1) * 8 + li, kk * 16 + (mi >> 1) * 8));
      ldmatrix_x4(oa, sdO + swz<DM>(warp * 16 + (mi & 1) * 8 + li, kk * 16 + (mi >> 1) * 8));
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        uint32_t kb[4], vb[4];
        ldmatrix_x4(kb, k_s + swz<DM>(np * 16 + (mi >> 1) * 8 + li, kk * 16 + (mi & 1) * 8));
        mma_16816<T>(s[2 * np], qa, kb, s[2 * np]);
        mma_16816<T>(s[2 * np + 1], qa, kb + 2, s[2 * np + 1]);
        ldmatrix_x4(vb, v_s + swz<DM>(np * 16 + (mi >> 1) * 8 + li, kk * 16 + (mi & 1) * 8));
        mma_16816<T>(dp[2 * np], oa, vb, dp[2 * np]);
        mma_16816<T>(dp[2 * np + 1], oa, vb + 2, dp[2 * np + 1]);
      }
    }

    // the forward's masks: only where the tile has a column some row may not see
    const bool full = ks.is_prefix ? ks.n0 + BN <= p.P
                                   : (ks.n0 + BN <= p.S && p.kpm == nullptr &&
                                      (!p.causal || ks.n0 + BN - 1 <= causal_last_col(m0, p.L, p.S)));
    const int lim0 = ks.is_prefix ? p.P : ks.n_lim;
    const int shift = (ks.is_prefix || !p.causal) ? (1 << 30) : p.S - p.L;
    const bool* kpm = (ks.is_prefix || p.kpm == nullptr) ? nullptr : p.kpm + (int64_t)b * p.kpm_sb;
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int col = ks.n0 + n * 8 + 2 * t4 + j;
        const bool ok = full || (col < lim0 && (kpm == nullptr || kpm[(int64_t)col * p.kpm_ss]));
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int e = 2 * r + j, i = i0 + 8 * r;
          float sv = s[n][e];
          if (!full && (!ok || col > i + shift)) sv = -INFINITY;
          const float pe = exp2_approx(fmaf(sv, sl2, -lse2[r]));
          float z = 1.f;
          if constexpr (kDropout)
            z = (pe > 0.f && dropout_keep(p.seed, b, h, i, ks.is_prefix ? col : p.P + col, p.dropout_p))
                    ? p.keep_scale : 0.f;
          s[n][e] = pe * (dp[n][e] * z - delta[r]);  // dS
        }
      }

    // dQ += dS K: the dS accumulators of keys [16 kk, 16 kk + 16) are the A fragment of step kk
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t da[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dd = 0; dd < NO / 2; ++dd) {
        uint32_t kb[4];
        ldmatrix_x4_trans(kb, k_s + swz<DM>(kk * 16 + (mi & 1) * 8 + li, dd * 16 + (mi >> 1) * 8));
        mma_16816<T>(dq[2 * dd], da, kb, dq[2 * dd]);
        mma_16816<T>(dq[2 * dd + 1], da, kb + 2, dq[2 * dd + 1]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = i0 + 8 * r;
    if (i >= p.L) continue;
    T* o = static_cast<T*>(p.dq) + (int64_t)b * p.dq_sb + (int64_t)h * p.dq_sh + (int64_t)i * p.dq_sl;
#pragma unroll
    for (int c = 0; c < NO; ++c) {
      const int d = c * 8 + 2 * t4;
      if (d < p.D) {
        o[(int64_t)d * p.dq_sd] = from_float<T>(dq[c][2 * r] * p.scale);
        o[(int64_t)(d + 1) * p.dq_sd] = from_float<T>(dq[c][2 * r + 1] * p.scale);
      }
    }
  }
#endif
}

template <typename T, int DM, bool kDropout>
static cudaError_t run_bwd_tc(const PrefixAttnParams& p, cudaStream_t stream) {
  {
    const size_t smem = dkdv_smem_bytes<DM>();
    auto kernel = prefix_attn_bwd_dkdv_tc_kernel<T, DM, kDropout>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
    dim3 grid(num_tiles(p.P, kKeys) + num_tiles(p.S, kKeys), p.Hkv, p.B);
    if (grid.x > 0) SPK_LAUNCH(kernel, grid, kThreads, smem, stream, p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const size_t smem = dq_smem_bytes<DM>();
  auto kernel = prefix_attn_bwd_dq_tc_kernel<T, DM, kDropout>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  SPK_LAUNCH(kernel, dim3(num_tiles(p.L, kQueries), p.Hq, p.B), kThreads, smem, stream, p);
  return cudaGetLastError();
}

template <typename T, int DM>
static cudaError_t dispatch_bwd_dropout(const PrefixAttnParams& p, cudaStream_t stream) {
  return p.dropout_p > 0.f ? run_bwd_tc<T, DM, true>(p, stream) : run_bwd_tc<T, DM, false>(p, stream);
}

template <typename T>
static cudaError_t dispatch_bwd_dim(const PrefixAttnParams& p, cudaStream_t stream) {
  return p.D <= 64 ? dispatch_bwd_dropout<T, 64>(p, stream) : dispatch_bwd_dropout<T, 128>(p, stream);
}

}  // namespace tc

FwdPath choose_bwd_path(const PrefixAttnParams& p, DType dt) {
  const FwdPath fwd = choose_fwd_path(p, dt);  // q, k, v, prefix, dtype, head dim, scale, arch
  if (fwd != FwdPath::kTensorCore) return fwd;
  const bool dout_ok = (reinterpret_cast<uintptr_t>(p.dout) & 15u) == 0 && p.do_sd == 1 && p.do_sl % 8 == 0 &&
                       p.do_sb % 8 == 0 && p.do_sh % 8 == 0;
  return dout_ok ? FwdPath::kTensorCore : FwdPath::kSimtLayout;
}

cudaError_t launch_prefix_attn_bwd_tc(const PrefixAttnParams& p, DType dt, cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat16: return tc::dispatch_bwd_dim<__half>(p, stream);
    case DType::kBFloat16: return tc::dispatch_bwd_dim<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace spk
