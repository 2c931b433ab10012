// Prefix-attention backward (FlashAttention-2 style, SIMT):
//   1. delta[b,h,i] = sum_d dout * out                              (preprocess), or, when
//      p.row_scale is set (float32), the exact row-statistics pass: the dQ kernel in STATS
//      mode computes sum_j P~_ij and sum_j P~_ij dP_ij with P~ = exp(s - lse)
//   2. dK/dV: one block per (key tile, kv head, row); key tiles are the prefix tiles followed
//      by the sequence tiles; each block loops over the query heads of its GQA group and the
//      query tiles that can see it.  Prefix tiles write float32 per-row partials [B,Hkv,P,D]
//      (deterministic) or atomically add into [T,Hkv,P,D] (atomic mode).
//   3. dQ: one block per (query tile, head, row), loops over prefix + sequence key tiles.
//   4. deterministic prefix reduction: fixed-order sum of the partials over rows b per task.
// float16 / bfloat16 calls that choose_bwd_path allows run 1. and 4. here and the tensor-core
// dK/dV and dQ kernels of prefix_attention_bwd_tc.cu in place of 2. and 3.
// P is recomputed from the saved lse; masked scores and empty rows (lse = -inf) give P = 0.
#include <type_traits>

#include "cuda_compat.cuh"

#include "launchers.h"
#include "prefix_attention_tiles.cuh"

namespace spk {

// ------------------------------------------------------------------ 1. delta
template <typename T>
__global__ void __launch_bounds__(kThreads) prefix_attn_bwd_delta_kernel(const PrefixAttnParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = (int64_t)blockIdx.x * (kThreads / 32) + warp;  // flattened (b, h, i)
  const int64_t n_rows = (int64_t)p.B * p.Hq * p.L;
  if (row >= n_rows) return;
  const int i = (int)(row % p.L);
  const int h = (int)((row / p.L) % p.Hq);
  const int b = (int)(row / ((int64_t)p.L * p.Hq));
  const T* o = static_cast<const T*>(p.out) + b * p.o_sb + h * p.o_sh + i * p.o_sl;
  const T* g = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + i * p.do_sl;
  float acc = 0.f;
  for (int d = lane; d < p.D; d += 32) acc += to_float(o[d * p.o_sd]) * to_float(g[d * p.do_sd]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) p.delta[b * p.lse_sb + h * p.lse_sh + i * p.lse_sl] = acc;
}

// ------------------------------------------------------------------ 2. dK / dV
template <typename Cfg>
constexpr int dkv_smem_floats() {
  return 2 * Cfg::kRows * Cfg::kStride + 2 * Cfg::kCols * Cfg::kStride +
         2 * Cfg::kRows * (Cfg::kCols + 1) + 3 * Cfg::kCols;
}

template <typename T, int DM>
__global__ void __launch_bounds__(kThreads, 1) prefix_attn_bwd_dkdv_kernel(const PrefixAttnParams p) {
  using Cfg = DkvCfg<DM>;
  constexpr int BN = Cfg::kRows, BM = Cfg::kCols, TPR = Cfg::kTPR, DPT = Cfg::kDPT,
                MPT = Cfg::kCPT, QS = Cfg::kStride, PS = BM + 1;
  SPK_DYNAMIC_SMEM(smem);
  float* sK = smem;              // [BN][QS]
  float* sV = sK + BN * QS;      // [BN][QS]
  float* sQ = sV + BN * QS;      // [BM][QS]
  float* sdO = sQ + BM * QS;     // [BM][QS]
  float* sPT = sdO + BM * QS;    // [BN][PS]  P^T
  float* sdST = sPT + BN * PS;   // [BN][PS]  dS^T
  float* sLse = sdST + BN * PS;  // [BM]
  float* sDelta = sLse + BM;     // [BM]
  float* sRs = sDelta + BM;      // [BM] row scale (1 without the exact pass)

  const int hk = blockIdx.y;
  const int b = blockIdx.z;
  const int nr = threadIdx.x / TPR;  // key owned by this thread group
  const int cg = threadIdx.x % TPR;
  const int64_t task = prefix_task(p, b);
  const int n_pre = num_tiles(p.P, BN);
  const KeySource ks = key_source(p, blockIdx.x, n_pre, BN, b, hk, task, p.S);
  const int n = ks.n0 + nr;

  const bool* pad = key_pad_row(p, ks, b);
  load_tile<T, BN, DM, QS>(sK, static_cast<const T*>(ks.is_prefix ? p.pk : p.k) + ks.k_off,
                           ks.k_sn, ks.k_sd, ks.n0, ks.n_lim, p.D, pad, p.kpm_ss);
  load_tile<T, BN, DM, QS>(sV, static_cast<const T*>(ks.is_prefix ? p.pv : p.v) + ks.v_off,
                           ks.v_sn, ks.v_sd, ks.n0, ks.n_lim, p.D, pad, p.kpm_ss);

  float dk[DPT], dv[DPT];
#pragma unroll
  for (int k = 0; k < DPT; ++k) { dk[k] = 0.f; dv[k] = 0.f; }

  const int group = p.Hq / p.Hkv;
  int m_first = 0;
  if (!ks.is_prefix) m_first = (causal_first_row(ks.n0, p.L, p.S, p.causal) / BM) * BM;

  for (int g = 0; g < group; ++g) {
    const int h = hk * group + g;
    const T* q = static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)h * p.q_sh;
    const T* dO = static_cast<const T*>(p.dout) + (int64_t)b * p.do_sb + (int64_t)h * p.do_sh;
    const int64_t lrow = (int64_t)b * p.lse_sb + (int64_t)h * p.lse_sh;
    for (int m0 = m_first; m0 < p.L; m0 += BM) {
      __syncthreads();  // previous Q/dO tile fully consumed
      load_tile<T, BM, DM, QS>(sQ, q, p.q_sl, p.q_sd, m0, p.L, p.D);
      load_tile<T, BM, DM, QS>(sdO, dO, p.do_sl, p.do_sd, m0, p.L, p.D);
      for (int m = threadIdx.x; m < BM; m += kThreads) {
        const bool ok = m0 + m < p.L;
        sLse[m] = ok ? p.lse[lrow + (int64_t)(m0 + m) * p.lse_sl] : -INFINITY;
        sDelta[m] = ok ? p.delta[lrow + (int64_t)(m0 + m) * p.lse_sl] : 0.f;
        sRs[m] = (ok && p.row_scale != nullptr) ? p.row_scale[lrow + (int64_t)(m0 + m) * p.lse_sl] : 1.f;
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < MPT; ++j) {
        const int m = cg + TPR * j;
        const bool vis = column_visible(p, ks, m0 + m, n, b);
        const float s = vis ? dot_smem<DM>(sK + nr * QS, sQ + m * QS) * p.scale : -INFINITY;
        const float pt = prob_from_lse(s, sLse[m]) * sRs[m];
        const float z = (pt > 0.f) ? dropout_factor(p, b, h, m0 + m, ks.is_prefix ? n : p.P + n) : 1.f;
        const float dp = dot_smem<DM>(sV + nr * QS, sdO + m * QS) * z;
        sPT[nr * PS + m] = pt * z;
        sdST[nr * PS + m] = pt * (dp - sDelta[m]);
      }
      __syncwarp();  // sPT/sdST row nr belongs to the TPR lanes of one warp
      // Blocked summation: this tile's BM terms first, then into the running sums (the
      // prefix keys collect B * group * L terms; one sequential sum would lose float32 bits).
      float tk[DPT], tv[DPT];
#pragma unroll
      for (int k = 0; k < DPT; ++k) { tk[k] = 0.f; tv[k] = 0.f; }
#pragma unroll 4
      for (int m = 0; m < BM; ++m) {
        const float pt = sPT[nr * PS + m];
        const float ds = sdST[nr * PS + m];
#pragma unroll
        for (int k = 0; k < DPT; ++k) {
          const int d = cg + TPR * k;
          tv[k] = fmaf(pt, sdO[m * QS + d], tv[k]);
          tk[k] = fmaf(ds, sQ[m * QS + d], tk[k]);
        }
      }
#pragma unroll
      for (int k = 0; k < DPT; ++k) { dk[k] += tk[k]; dv[k] += tv[k]; }
      __syncwarp();
    }
  }

  if (n >= ks.n_lim) return;
  if (!ks.is_prefix) {
    T* dkp = static_cast<T*>(p.dk) + (int64_t)b * p.dk_sb + (int64_t)hk * p.dk_sh + (int64_t)n * p.dk_ss;
    T* dvp = static_cast<T*>(p.dv) + (int64_t)b * p.dv_sb + (int64_t)hk * p.dv_sh + (int64_t)n * p.dv_ss;
#pragma unroll
    for (int k = 0; k < DPT; ++k) {
      const int d = cg + TPR * k;
      if (d < p.D) {
        dkp[(int64_t)d * p.dk_sd] = from_float<T>(dk[k] * p.scale);
        dvp[(int64_t)d * p.dv_sd] = from_float<T>(dv[k]);
      }
    }
  } else {
    // deterministic: this row's partial; atomic: accumulate into the task's slot
    const int64_t slot = p.deterministic ? (int64_t)b : task;
    const int64_t off = slot * p.dp_sr + (int64_t)hk * p.dp_sh + (int64_t)n * p.dp_sp;
#pragma unroll
    for (int k = 0; k < DPT; ++k) {
      const int d = cg + TPR * k;
      if (d < p.D) {
        const int64_t o = off + (int64_t)d * p.dp_sd;
        if (p.deterministic) {
          p.dpk[o] = dk[k] * p.scale;
          p.dpv[o] = dv[k];
        } else {
          atomicAdd(p.dpk + o, dk[k] * p.scale);
          atomicAdd(p.dpv + o, dv[k]);
        }
      }
    }
  }
}

// ------------------------------------------------------------------ 3. dQ
template <typename Cfg>
constexpr int dq_smem_floats() {
  return 2 * Cfg::kRows * Cfg::kStride + 2 * Cfg::kCols * Cfg::kStride + Cfg::kRows * (Cfg::kCols + 1);
}

// STATS = false: dQ.  STATS = true: the exact row-statistics pass (writes row_scale, delta).
template <typename T, int DM, bool STATS>
__global__ void __launch_bounds__(kThreads, 1) prefix_attn_bwd_dq_kernel(const PrefixAttnParams p) {
  using Cfg = DqCfg<DM>;
  constexpr int BM = Cfg::kRows, BN = Cfg::kCols, TPR = Cfg::kTPR, DPT = Cfg::kDPT,
                NPT = Cfg::kCPT, QS = Cfg::kStride, PS = BN + 1;
  SPK_DYNAMIC_SMEM(smem);
  float* sQ = smem;            // [BM][QS]
  float* sdO = sQ + BM * QS;   // [BM][QS]
  float* sK = sdO + BM * QS;   // [BN][QS]
  float* sV = sK + BN * QS;    // [BN][QS]
  float* sdS = sV + BN * QS;   // [BM][PS]

  const int m0 = blockIdx.x * BM;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int hk = kv_head_of(h, p.Hq, p.Hkv);
  const int r = threadIdx.x / TPR;
  const int cg = threadIdx.x % TPR;
  const int i = m0 + r;
  const int64_t task = prefix_task(p, b);

  load_tile<T, BM, DM, QS>(sQ, static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)h * p.q_sh,
                           p.q_sl, p.q_sd, m0, p.L, p.D);
  load_tile<T, BM, DM, QS>(sdO, static_cast<const T*>(p.dout) + (int64_t)b * p.do_sb + (int64_t)h * p.do_sh,
                           p.do_sl, p.do_sd, m0, p.L, p.D);
  const int64_t lo = (int64_t)b * p.lse_sb + (int64_t)h * p.lse_sh + (int64_t)i * p.lse_sl;
  const float lse_i = (i < p.L) ? p.lse[lo] : -INFINITY;
  const float delta_i = (!STATS && i < p.L) ? p.delta[lo] : 0.f;
  const float rs_i = (!STATS && i < p.L && p.row_scale != nullptr) ? p.row_scale[lo] : 1.f;
  float l_sum = 0.f, d_sum = 0.f;  // STATS: sum_j P~_ij, sum_j P~_ij dP_ij

  float dq[DPT];
#pragma unroll
  for (int k = 0; k < DPT; ++k) dq[k] = 0.f;

  const int n_pre = num_tiles(p.P, BN);
  const int seq_end = seq_col_end(m0, BM, p.L, p.S, p.causal);
  const int n_tiles = n_pre + num_tiles(seq_end, BN);
  for (int t = 0; t < n_tiles; ++t) {
    const KeySource ks = key_source(p, t, n_pre, BN, b, hk, task, seq_end);
    __syncthreads();
    const bool* pad = key_pad_row(p, ks, b);
    load_tile<T, BN, DM, QS>(sK, static_cast<const T*>(ks.is_prefix ? p.pk : p.k) + ks.k_off,
                             ks.k_sn, ks.k_sd, ks.n0, ks.n_lim, p.D, pad, p.kpm_ss);
    load_tile<T, BN, DM, QS>(sV, static_cast<const T*>(ks.is_prefix ? p.pv : p.v) + ks.v_off,
                             ks.v_sn, ks.v_sd, ks.n0, ks.n_lim, p.D, pad, p.kpm_ss);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
      const int nn = cg + TPR * j;
      const bool vis = column_visible(p, ks, i, ks.n0 + nn, b);
      const float s = vis ? dot_smem<DM>(sQ + r * QS, sK + nn * QS) * p.scale : -INFINITY;
      const float pr = prob_from_lse(s, lse_i) * rs_i;
      const float z = (pr > 0.f) ? dropout_factor(p, b, h, i, ks.is_prefix ? ks.n0 + nn : p.P + ks.n0 + nn) : 1.f;
      const float dp = dot_smem<DM>(sdO + r * QS, sV + nn * QS) * z;
      if (STATS) {
        l_sum += pr;
        d_sum = fmaf(pr, dp, d_sum);
      } else {
        sdS[r * PS + nn] = pr * (dp - delta_i);
      }
    }
    if (STATS) continue;
    __syncwarp();
#pragma unroll 4
    for (int nn = 0; nn < BN; ++nn) {
      const float ds = sdS[r * PS + nn];
#pragma unroll
      for (int k = 0; k < DPT; ++k) dq[k] = fmaf(ds, sK[nn * QS + cg + TPR * k], dq[k]);
    }
    __syncwarp();
  }
  if (STATS) {
    l_sum = group_sum<TPR>(l_sum);
    d_sum = group_sum<TPR>(d_sum);
    if (i < p.L && cg == 0) {
      p.row_scale[lo] = l_sum > 0.f ? 1.f / l_sum : 0.f;
      p.delta[lo] = l_sum > 0.f ? d_sum / l_sum : 0.f;
    }
    return;
  }
  if (i < p.L) {
    T* o = static_cast<T*>(p.dq) + (int64_t)b * p.dq_sb + (int64_t)h * p.dq_sh + (int64_t)i * p.dq_sl;
#pragma unroll
    for (int k = 0; k < DPT; ++k) {
      const int d = cg + TPR * k;
      if (d < p.D) o[(int64_t)d * p.dq_sd] = from_float<T>(dq[k] * p.scale);
    }
  }
}

// Every configuration fits the 99 KB of opt-in shared memory of sm_86/sm_89 (sm_80: 163 KB).
constexpr int kMaxSmemBytes = 99 * 1024;
static_assert(sizeof(float) * dkv_smem_floats<DkvCfg<32>>() <= kMaxSmemBytes, "smem");
static_assert(sizeof(float) * dkv_smem_floats<DkvCfg<64>>() <= kMaxSmemBytes, "smem");
static_assert(sizeof(float) * dkv_smem_floats<DkvCfg<128>>() <= kMaxSmemBytes, "smem");
static_assert(sizeof(float) * dkv_smem_floats<DkvCfg<256>>() <= kMaxSmemBytes, "smem");
static_assert(sizeof(float) * dq_smem_floats<DqCfg<32>>() <= kMaxSmemBytes, "smem");
static_assert(sizeof(float) * dq_smem_floats<DqCfg<64>>() <= kMaxSmemBytes, "smem");
static_assert(sizeof(float) * dq_smem_floats<DqCfg<128>>() <= kMaxSmemBytes, "smem");
static_assert(sizeof(float) * dq_smem_floats<DqCfg<256>>() <= kMaxSmemBytes, "smem");

// ------------------------------------------------------------------ 4. prefix reduction
template <typename T>
__global__ void __launch_bounds__(256) prefix_grad_reduce_kernel(const float* __restrict__ partial,
                                                                 const int64_t* __restrict__ index,
                                                                 T* __restrict__ out, int B,
                                                                 int64_t row_elems) {
  const int t = blockIdx.y;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < row_elems;
       e += (int64_t)gridDim.x * blockDim.x) {
    float acc = 0.f;
    for (int b = 0; b < B; ++b)  // fixed order: bitwise reproducible
      if (index[b] == t) acc += partial[(int64_t)b * row_elems + e];
    out[(int64_t)t * row_elems + e] = from_float<T>(acc);
  }
}

// ------------------------------------------------------------------ launchers
template <typename T, int DM, bool STATS>
static cudaError_t run_dq(const PrefixAttnParams& p, cudaStream_t stream) {
  using Cfg = DqCfg<DM>;
  const size_t smem = sizeof(float) * dq_smem_floats<Cfg>();
  auto kernel = prefix_attn_bwd_dq_kernel<T, DM, STATS>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  dim3 grid(num_tiles(p.L, Cfg::kRows), p.Hq, p.B);
  SPK_LAUNCH(kernel, grid, kThreads, smem, stream, p);
  return cudaGetLastError();
}

template <typename T, int DM>
static cudaError_t run_bwd(const PrefixAttnParams& p, cudaStream_t stream) {
  cudaError_t err;
  if (p.row_scale != nullptr) {  // exact row statistics (float32 only)
    if constexpr (std::is_same<T, float>::value) {
      err = run_dq<T, DM, true>(p, stream);
    } else {
      err = cudaErrorInvalidValue;
    }
  } else {
    const int64_t rows = (int64_t)p.B * p.Hq * p.L;
    const int per_block = kThreads / 32;
    SPK_LAUNCH(prefix_attn_bwd_delta_kernel<T>, (unsigned)((rows + per_block - 1) / per_block), kThreads, 0, stream, p);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess) return err;
  {
    using Cfg = DkvCfg<DM>;
    const size_t smem = sizeof(float) * dkv_smem_floats<Cfg>();
    auto kernel = prefix_attn_bwd_dkdv_kernel<T, DM>;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
    dim3 grid(num_tiles(p.P, Cfg::kRows) + num_tiles(p.S, Cfg::kRows), p.Hkv, p.B);
    if (grid.x > 0) SPK_LAUNCH(kernel, grid, kThreads, smem, stream, p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return run_dq<T, DM, false>(p, stream);
}

template <typename T>
static cudaError_t dispatch_bwd(const PrefixAttnParams& p, cudaStream_t stream) {
  switch (head_dim_bucket(p.D)) {
    case 32: return run_bwd<T, 32>(p, stream);
    case 64: return run_bwd<T, 64>(p, stream);
    case 128: return run_bwd<T, 128>(p, stream);
    case 256: return run_bwd<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_prefix_attn_bwd(const PrefixAttnParams& p, DType dt, cudaStream_t stream, bool allow_tc,
                                   FwdPath* path) {
  const FwdPath chosen = allow_tc ? choose_bwd_path(p, dt) : FwdPath::kSimtForced;
  if (path != nullptr) *path = chosen;
  if (p.B == 0 || p.Hq == 0 || p.L == 0) return cudaSuccess;
  if (chosen == FwdPath::kTensorCore) {  // 16-bit only: delta by the preprocess, then dK/dV and dQ
    const int64_t rows = (int64_t)p.B * p.Hq * p.L;
    const unsigned blocks = (unsigned)((rows + kThreads / 32 - 1) / (kThreads / 32));
    if (dt == DType::kFloat16) SPK_LAUNCH(prefix_attn_bwd_delta_kernel<__half>, blocks, kThreads, 0, stream, p);
    else SPK_LAUNCH(prefix_attn_bwd_delta_kernel<__nv_bfloat16>, blocks, kThreads, 0, stream, p);
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : launch_prefix_attn_bwd_tc(p, dt, stream);
  }
  switch (dt) {
    case DType::kFloat32: return dispatch_bwd<float>(p, stream);
    case DType::kFloat16: return dispatch_bwd<__half>(p, stream);
    case DType::kBFloat16: return dispatch_bwd<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
static cudaError_t run_reduce(const float* partial, const int64_t* index, void* out, int B, int T_,
                              int64_t row_elems, cudaStream_t stream) {
  if (T_ == 0 || row_elems == 0) return cudaSuccess;
  int64_t bx = (row_elems + 255) / 256;
  if (bx > 4096) bx = 4096;
  SPK_LAUNCH(prefix_grad_reduce_kernel<T>, dim3((unsigned)bx, T_), 256, 0, stream, partial, index, static_cast<T*>(out), B, row_elems);
  return cudaGetLastError();
}

cudaError_t launch_prefix_grad_reduce(const float* partial, const int64_t* index, void* out, int B,
                                      int T, int64_t row_elems, DType dt, cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat32: return run_reduce<float>(partial, index, out, B, T, row_elems, stream);
    case DType::kFloat16: return run_reduce<__half>(partial, index, out, B, T, row_elems, stream);
    case DType::kBFloat16: return run_reduce<__nv_bfloat16>(partial, index, out, B, T, row_elems, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace spk
