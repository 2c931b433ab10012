// Prefix-attention forward on tensor cores (sm_80+; FlashAttention-2 structure).
//
// One CTA of 4 warps per (64-query tile, head, row); warp w owns query rows [16w, 16w + 16) of
// the tile.  Key tiles of 64: first the prefix block [P, D] of task prefix_index[b] (no batch
// stride, never masked), then the row's own keys (bottom-right causal, padding mask), one
// online softmax across both.  Per key tile:
//   S[16 x 64] = Q K^T   mma.sync m16n8k16 (Q and K fragments by ldmatrix)
//   P = exp2(S * scale*log2(e) - m)   in registers; P (16-bit) is directly the A operand of
//   O[16 x DM] += P V    mma.sync (V by ldmatrix.trans)
// Shared memory (16-bit, XOR-swizzled 16-byte chunks: chunk' = chunk ^ (row % 8)):
//   Q [64][DM], K [2][64][DM], V [2][64][DM]; K/V of tile t+1 load by cp.async while tile t
//   is computed (two stages).  DM in {64, 128} is the head-dim bucket; D <= DM, D % 8 == 0
//   (columns >= D are zero-filled).  Output / lse contract as the SIMT kernel: a row with no
//   visible key gets out = 0, lse = -inf.  Dropout: spk::dropout_keep, as the SIMT kernel.
#include "cuda_compat.cuh"

#include "launchers.h"
#include "prefix_attention_tiles.cuh"
#include "tc_primitives.cuh"
#include "tc_tiles.cuh"

namespace spk {
namespace tc {

constexpr int kBM = 64, kBN = 64;  // query rows x keys per tile

template <int DM>
constexpr size_t fwd_smem_bytes() {
  return 2 * (size_t)(kBM * DM + 2 * kStages * kBN * DM);  // 16-bit Q + K/V stages
}
static_assert(fwd_smem_bytes<128>() <= 99 * 1024, "smem");

template <typename T, int DM, bool kDropout>
__global__ void __launch_bounds__(kThreads) prefix_attn_fwd_tc_kernel(const PrefixAttnParams p) {
#if SPK_TC_ENABLED
  constexpr int KQ = DM / 16;   // k-steps of Q K^T
  constexpr int NS = kBN / 8;   // n-tiles of S (8 keys each)
  constexpr int NO = DM / 8;    // n-tiles of O (8 head-dim columns each)
  SPK_DYNAMIC_SMEM_BYTES(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kBM][DM]
  T* sK = sQ + kBM * DM;                   // [kStages][kBN][DM]
  T* sV = sK + kStages * kBN * DM;         // [kStages][kBN][DM]

  const int tid = (int)threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int m0 = (int)blockIdx.x * kBM, h = (int)blockIdx.y, b = (int)blockIdx.z;
  const int hk = kv_head_of(h, p.Hq, p.Hkv);
  const int64_t task = prefix_task(p, b);
  const int n_pre = num_tiles(p.P, kBN);
  const int seq_end = seq_col_end(m0, kBM, p.L, p.S, p.causal);
  const int n_tiles = n_pre + num_tiles(seq_end, kBN);
  const float sl2 = p.scale * 1.4426950408889634f;  // scale * log2(e), folded into exp2

  const T* q = static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)h * p.q_sh;
  auto issue_kv = [&](int t) {  // cp.async of key tile t into stage t % 2, one commit group
    const KeySource ks = key_source(p, t, n_pre, kBN, b, hk, task, seq_end);
    const T* kb = static_cast<const T*>(ks.is_prefix ? p.pk : p.k) + ks.k_off;
    const T* vb = static_cast<const T*>(ks.is_prefix ? p.pv : p.v) + ks.v_off;
    const bool* pad = key_pad_row(p, ks, b);
    load_tile_async<T, DM, kBN>(sK + (t % kStages) * kBN * DM, kb, ks.k_sn, ks.n0, ks.n_lim, p.D, pad, p.kpm_ss);
    load_tile_async<T, DM, kBN>(sV + (t % kStages) * kBN * DM, vb, ks.v_sn, ks.n0, ks.n_lim, p.D, pad, p.kpm_ss);
  };
  load_tile_async<T, DM, kBM>(sQ, q, p.q_sl, m0, p.L, p.D);
  if (n_tiles > 0) issue_kv(0);
  cp_async_commit();

  float acc[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
  float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f};  // rows g, g + 8 (l: lane partial)
  const int li = lane % 8, mi = lane / 8;  // ldmatrix: row in matrix, matrix index

  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) issue_kv(t + 1);
    cp_async_commit();
    cp_async_wait<1>();  // everything but tile t + 1 has landed (this thread's copies)
    __syncthreads();     // ... and every other thread's

    const T* k_s = sK + (t % kStages) * kBN * DM;
    const T* v_s = sV + (t % kStages) * kBN * DM;
    const KeySource ks = key_source(p, t, n_pre, kBN, b, hk, task, seq_end);

    float s[NS][4];
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KQ; ++kk) {
      uint32_t qa[4];
      ldmatrix_x4(qa, sQ + swz<DM>(warp * 16 + (mi & 1) * 8 + li, kk * 16 + (mi >> 1) * 8));
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {  // keys [16 np, 16 np + 16): two n-tiles per ldmatrix
        uint32_t kb[4];
        ldmatrix_x4(kb, k_s + swz<DM>(np * 16 + (mi >> 1) * 8 + li, kk * 16 + (mi & 1) * 8));
        mma_16816<T>(s[2 * np], qa, kb, s[2 * np]);
        mma_16816<T>(s[2 * np + 1], qa, kb + 2, s[2 * np + 1]);
      }
    }

    // masks only where the tile has a column some row may not see
    const bool full = ks.is_prefix ? ks.n0 + kBN <= p.P
                                   : (ks.n0 + kBN <= p.S && p.kpm == nullptr &&
                                      (!p.causal || ks.n0 + kBN - 1 <= causal_last_col(m0, p.L, p.S)));
    const int i0 = m0 + warp * 16 + g;  // query rows i0 (e < 2) and i0 + 8 (e >= 2)
    if (!full) {
      const int lim0 = ks.is_prefix ? p.P : ks.n_lim;  // columns >= lim0 do not exist
      const int shift = (ks.is_prefix || !p.causal) ? (1 << 30) : p.S - p.L;  // causal: col <= i + shift
      const bool* kpm = (ks.is_prefix || p.kpm == nullptr) ? nullptr : p.kpm + (int64_t)b * p.kpm_sb;
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int col = ks.n0 + n * 8 + 2 * t4 + j;
          const bool ok = col < lim0 && (kpm == nullptr || kpm[(int64_t)col * p.kpm_ss]);
#pragma unroll
          for (int r = 0; r < 2; ++r)
            if (!ok || col > i0 + 8 * r + shift) s[n][2 * r + j] = -INFINITY;
        }
    }

    // online softmax (raw-score max; exp2 with the scale folded)
    float alpha[2], ms[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_m[r];
#pragma unroll
      for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      alpha[r] = (row_m[r] == -INFINITY) ? 0.f : exp2_approx((row_m[r] - mx) * sl2);
      row_m[r] = mx;
      ms[r] = (mx == -INFINITY) ? 0.f : mx * sl2;
      row_l[r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const float pe = exp2_approx(fmaf(s[n][e], sl2, -ms[r]));
        row_l[r] += pe;  // the denominator sums undropped probabilities
        if constexpr (kDropout) {
          const int c = ks.n0 + n * 8 + 2 * t4 + (e & 1);
          s[n][e] = dropout_keep(p.seed, b, h, i0 + 8 * r, ks.is_prefix ? c : p.P + c, p.dropout_p)
                        ? pe * p.keep_scale : 0.f;
        } else {
          s[n][e] = pe;
        }
      }
#pragma unroll
    for (int n = 0; n < NO; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[n][e] *= alpha[e >> 1];

    // O += P V: the S accumulators of keys [16 kk, 16 kk + 16) are the A fragment of step kk
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < NO / 2; ++dp) {  // head-dim columns [16 dp, 16 dp + 16)
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, v_s + swz<DM>(kk * 16 + (mi & 1) * 8 + li, dp * 16 + (mi >> 1) * 8));
        mma_16816<T>(acc[2 * dp], pa, vb, acc[2 * dp]);
        mma_16816<T>(acc[2 * dp + 1], pa, vb + 2, acc[2 * dp + 1]);
      }
    }
    __syncthreads();  // stage t % 2 is refilled by the next iteration's cp.async
  }
  cp_async_wait<0>();

  // epilogue: l over the 4 lanes of a row, out = acc / l (0 for an empty row), lse
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_l[r] += __shfl_xor_sync(0xffffffffu, row_l[r], 1);
    row_l[r] += __shfl_xor_sync(0xffffffffu, row_l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = m0 + warp * 16 + g + 8 * r;
    if (i >= p.L) continue;
    const float inv_l = row_l[r] > 0.f ? 1.f / row_l[r] : 0.f;
    T* o = static_cast<T*>(p.out) + (int64_t)b * p.o_sb + (int64_t)h * p.o_sh + (int64_t)i * p.o_sl;
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      const int d = n * 8 + 2 * t4;
      if (d < p.D) {
        o[(int64_t)d * p.o_sd] = from_float<T>(acc[n][2 * r] * inv_l);
        o[(int64_t)(d + 1) * p.o_sd] = from_float<T>(acc[n][2 * r + 1] * inv_l);
      }
    }
    if (t4 == 0)
      p.lse[(int64_t)b * p.lse_sb + (int64_t)h * p.lse_sh + (int64_t)i * p.lse_sl] =
          row_l[r] > 0.f ? row_m[r] * p.scale + logf(row_l[r]) : -INFINITY;
  }
#endif
}

template <typename T, int DM, bool kDropout>
static cudaError_t run_fwd_tc(const PrefixAttnParams& p, cudaStream_t stream) {
  const size_t smem = fwd_smem_bytes<DM>();
  auto kernel = prefix_attn_fwd_tc_kernel<T, DM, kDropout>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  dim3 grid(num_tiles(p.L, kBM), p.Hq, p.B);
  if (grid.x == 0 || p.B == 0 || p.Hq == 0) return cudaSuccess;
  SPK_LAUNCH(kernel, grid, kThreads, smem, stream, p);
  return cudaGetLastError();
}

template <typename T, int DM>
static cudaError_t dispatch_dropout(const PrefixAttnParams& p, cudaStream_t stream) {
  return p.dropout_p > 0.f ? run_fwd_tc<T, DM, true>(p, stream) : run_fwd_tc<T, DM, false>(p, stream);
}

template <typename T>
static cudaError_t dispatch_dim(const PrefixAttnParams& p, cudaStream_t stream) {
  return p.D <= 64 ? dispatch_dropout<T, 64>(p, stream) : dispatch_dropout<T, 128>(p, stream);
}

}  // namespace tc

namespace {
bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }
bool rows16(int64_t s_row, int64_t s_d) { return s_d == 1 && s_row % 8 == 0; }
}  // namespace

FwdPath choose_fwd_path(const PrefixAttnParams& p, DType dt) {
#if !defined(SPK_EMULATION) && !defined(SPK_WITH_CUTE)
  return FwdPath::kSimtNotBuilt;
#endif
  if (dt == DType::kFloat32) return FwdPath::kSimtDtype;
  if (p.D % 8 != 0 || p.D > 128) return FwdPath::kSimtHeadDim;
  if (!(p.scale > 0.f) || !(p.scale < INFINITY)) return FwdPath::kSimtScale;
  bool ok = aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && rows16(p.q_sl, p.q_sd) &&
            rows16(p.k_ss, p.k_sd) && rows16(p.v_ss, p.v_sd) && p.q_sb % 8 == 0 && p.q_sh % 8 == 0 &&
            p.k_sb % 8 == 0 && p.k_sh % 8 == 0 && p.v_sb % 8 == 0 && p.v_sh % 8 == 0;
  if (p.P > 0)
    ok = ok && aligned16(p.pk) && aligned16(p.pv) && rows16(p.pk_sp, p.pk_sd) && rows16(p.pv_sp, p.pv_sd) &&
         p.pk_st % 8 == 0 && p.pk_sh % 8 == 0 && p.pv_st % 8 == 0 && p.pv_sh % 8 == 0;
  if (!ok) return FwdPath::kSimtLayout;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess || major < 8)
    return FwdPath::kSimtArch;
  return FwdPath::kTensorCore;
}

cudaError_t launch_prefix_attn_fwd_tc(const PrefixAttnParams& p, DType dt, cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat16: return tc::dispatch_dim<__half>(p, stream);
    case DType::kBFloat16: return tc::dispatch_dim<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace spk
