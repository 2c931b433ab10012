// Prefix-attention forward (FlashAttention-2 style, SIMT): one block per (query tile, head, row).
// The key loop runs first over the prefix block [P, D] of task prefix_index[b] (no batch
// stride, never masked), then over the row's own keys (causal bottom-right / padding masked),
// with one online softmax across both.  Tiles live in shared memory as float; all
// accumulation is float32.
#include "cuda_compat.cuh"

#include "launchers.h"
#include "prefix_attention_tiles.cuh"

namespace spk {

template <typename Cfg>
constexpr int fwd_smem_floats() {
  return Cfg::kRows * Cfg::kStride + Cfg::kCols * Cfg::kStride + Cfg::kCols * Cfg::kDM +
         Cfg::kRows * (Cfg::kCols + 1);
}

// Every configuration fits the 99 KB of opt-in shared memory of sm_86/sm_89 (sm_80: 163 KB).
constexpr int kMaxSmemBytes = 99 * 1024;
static_assert(sizeof(float) * fwd_smem_floats<FwdCfg<32>>() <= kMaxSmemBytes, "smem");
static_assert(sizeof(float) * fwd_smem_floats<FwdCfg<64>>() <= kMaxSmemBytes, "smem");
static_assert(sizeof(float) * fwd_smem_floats<FwdCfg<128>>() <= kMaxSmemBytes, "smem");
static_assert(sizeof(float) * fwd_smem_floats<FwdCfg<256>>() <= kMaxSmemBytes, "smem");

template <typename T, int DM>
__global__ void __launch_bounds__(kThreads) prefix_attn_fwd_kernel(const PrefixAttnParams p) {
  using Cfg = FwdCfg<DM>;
  constexpr int BM = Cfg::kRows, BN = Cfg::kCols, TPR = Cfg::kTPR, DPT = Cfg::kDPT,
                NPT = Cfg::kCPT, QS = Cfg::kStride, PS = BN + 1;
  SPK_DYNAMIC_SMEM(smem);
  float* sQ = smem;             // [BM][QS]
  float* sK = sQ + BM * QS;     // [BN][QS]
  float* sV = sK + BN * QS;     // [BN][DM]
  float* sP = sV + BN * DM;     // [BM][PS]

  const int m0 = blockIdx.x * BM;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int hk = kv_head_of(h, p.Hq, p.Hkv);
  const int r = threadIdx.x / TPR;
  const int cg = threadIdx.x % TPR;
  const int i = m0 + r;
  const int64_t task = prefix_task(p, b);

  const T* q = static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)h * p.q_sh;
  const T* kbase = nullptr;
  const T* vbase = nullptr;
  load_tile<T, BM, DM, QS>(sQ, q, p.q_sl, p.q_sd, m0, p.L, p.D);

  float acc[DPT];
#pragma unroll
  for (int k = 0; k < DPT; ++k) acc[k] = 0.f;
  SoftmaxRow row = softmax_row_init();

  const int n_pre = num_tiles(p.P, BN);
  const int seq_end = seq_col_end(m0, BM, p.L, p.S, p.causal);
  const int n_tiles = n_pre + num_tiles(seq_end, BN);

  for (int t = 0; t < n_tiles; ++t) {
    const KeySource ks = key_source(p, t, n_pre, BN, b, hk, task, seq_end);
    kbase = static_cast<const T*>(ks.is_prefix ? p.pk : p.k) + ks.k_off;
    vbase = static_cast<const T*>(ks.is_prefix ? p.pv : p.v) + ks.v_off;
    __syncthreads();  // everyone is done with the previous K/V tile
    const bool* pad = key_pad_row(p, ks, b);
    load_tile<T, BN, DM, QS>(sK, kbase, ks.k_sn, ks.k_sd, ks.n0, ks.n_lim, p.D, pad, p.kpm_ss);
    load_tile<T, BN, DM, DM>(sV, vbase, ks.v_sn, ks.v_sd, ks.n0, ks.n_lim, p.D, pad, p.kpm_ss);
    __syncthreads();

    float s[NPT];
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
      const int nn = cg + TPR * j;
      const float dot = dot_smem<DM>(sQ + r * QS, sK + nn * QS);
      s[j] = column_visible(p, ks, i, ks.n0 + nn, b) ? dot * p.scale : -INFINITY;
      tile_max = fmaxf(tile_max, s[j]);
    }
    tile_max = group_max<TPR>(tile_max);
    const float alpha = online_rescale(row, tile_max);
    float lsum = 0.f;
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
      const int nn = cg + TPR * j;
      const float pj = masked_exp(s[j], row.m);
      // the denominator sums undropped probabilities; dropout scales what reaches V
      const float z = (pj > 0.f) ? dropout_factor(p, b, h, i, ks.is_prefix ? ks.n0 + nn : p.P + ks.n0 + nn) : 1.f;
      sP[r * PS + nn] = pj * z;
      lsum += pj;
    }
    row.l += group_sum<TPR>(lsum);
#pragma unroll
    for (int k = 0; k < DPT; ++k) acc[k] *= alpha;
    __syncwarp();  // sP row r is written and read by the same TPR lanes of one warp
#pragma unroll 4
    for (int nn = 0; nn < BN; ++nn) {
      const float pv = sP[r * PS + nn];
#pragma unroll
      for (int k = 0; k < DPT; ++k) acc[k] = fmaf(pv, sV[nn * DM + cg + TPR * k], acc[k]);
    }
    __syncwarp();
  }

  if (i < p.L) {
    const float inv_l = row_inv_l(row);
    T* o = static_cast<T*>(p.out) + (int64_t)b * p.o_sb + (int64_t)h * p.o_sh + (int64_t)i * p.o_sl;
#pragma unroll
    for (int k = 0; k < DPT; ++k) {
      const int d = cg + TPR * k;
      if (d < p.D) o[(int64_t)d * p.o_sd] = from_float<T>(acc[k] * inv_l);
    }
    if (cg == 0) {
      p.lse[(int64_t)b * p.lse_sb + (int64_t)h * p.lse_sh + (int64_t)i * p.lse_sl] = row_lse(row);
    }
  }
}

template <typename T, int DM>
static cudaError_t run_fwd(const PrefixAttnParams& p, cudaStream_t stream) {
  using Cfg = FwdCfg<DM>;
  const size_t smem = sizeof(float) * fwd_smem_floats<Cfg>();
  auto kernel = prefix_attn_fwd_kernel<T, DM>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  dim3 grid(num_tiles(p.L, Cfg::kRows), p.Hq, p.B);
  if (grid.x == 0 || p.B == 0 || p.Hq == 0) return cudaSuccess;
  SPK_LAUNCH(kernel, grid, kThreads, smem, stream, p);
  return cudaGetLastError();
}

template <typename T>
static cudaError_t dispatch_fwd(const PrefixAttnParams& p, cudaStream_t stream) {
  switch (head_dim_bucket(p.D)) {
    case 32: return run_fwd<T, 32>(p, stream);
    case 64: return run_fwd<T, 64>(p, stream);
    case 128: return run_fwd<T, 128>(p, stream);
    case 256: return run_fwd<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_prefix_attn_fwd(const PrefixAttnParams& p, DType dt, cudaStream_t stream, bool allow_tc,
                                   FwdPath* path) {
  const FwdPath chosen = allow_tc ? choose_fwd_path(p, dt) : FwdPath::kSimtForced;
  if (path != nullptr) *path = chosen;
  if (chosen == FwdPath::kTensorCore) return launch_prefix_attn_fwd_tc(p, dt, stream);
  switch (dt) {
    case DType::kFloat32: return dispatch_fwd<float>(p, stream);
    case DType::kFloat16: return dispatch_fwd<__half>(p, stream);
    case DType::kBFloat16: return dispatch_fwd<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace spk
