// Host-side entry points of the CUDA kernels (defined in the .cu files, called by binding.cpp).
// Kept free of torch headers so the .cu files compile with nvcc alone.
#pragma once

#include <cstdint>

#if defined(SPK_EMULATION)
#include "tests/cuda_emulation.h"
#else
#include <cuda_runtime_api.h>
#endif

#include "prefix_attention_common.cuh"

namespace spk {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Head-dimension bucket a kernel is instantiated for (32, 64, 128, 256); 0 if D > 256.
inline int head_dim_bucket(int D) {
  return D <= 32 ? 32 : D <= 64 ? 64 : D <= 128 ? 128 : D <= 256 ? 256 : 0;
}

// Kernel family a forward or backward call ran on (binding.cpp records it; Python:
// softprompt_kernels.cuda.last_path("fwd" | "bwd")).
enum class FwdPath : int {
  kNone = 0,          // no forward has run
  kTensorCore = 1,    // prefix_attention_{fwd,bwd}_tc.cu (mma.sync / ldmatrix / cp.async)
  kSimtDtype = 2,     // SIMT: float32 inputs
  kSimtHeadDim = 3,   // SIMT: D > 128 or D % 8 != 0
  kSimtLayout = 4,    // SIMT: a last stride != 1, or a pointer / row stride not 16-byte aligned
  kSimtArch = 5,      // SIMT: device below sm_80
  kSimtNotBuilt = 6,  // SIMT: built without the CuTe headers (pip install nvidia-cutlass)
  kSimtForced = 7,    // SIMT: SOFTPROMPT_KERNELS_CUDA_FWD=simt (backward: ..._CUDA_BWD=simt)
  kSimtScale = 8,     // SIMT: scale <= 0 or not finite
};

// Which forward kernel supports p (kTensorCore, or the reason for the SIMT fallback).
FwdPath choose_fwd_path(const PrefixAttnParams& p, DType dt);

// Forward: writes p.out and p.lse; the tensor-core kernel when allow_tc and choose_fwd_path says so,
// else the SIMT kernel.  *path (optional) gets the path taken.
cudaError_t launch_prefix_attn_fwd(const PrefixAttnParams& p, DType dt, cudaStream_t stream, bool allow_tc = true,
                                   FwdPath* path = nullptr);
// The tensor-core forward alone (float16 / bfloat16, D <= 128, D % 8 == 0, see choose_fwd_path).
cudaError_t launch_prefix_attn_fwd_tc(const PrefixAttnParams& p, DType dt, cudaStream_t stream);

// Which backward kernels support p: choose_fwd_path's conditions and a dout that cp.async can
// read (unit last stride, 16-byte aligned pointer and row strides); kTensorCore or the SIMT reason.
FwdPath choose_bwd_path(const PrefixAttnParams& p, DType dt);

// Backward.  Needs p.delta (float32 [B,Hq,L] scratch, same strides as lse).  Writes dq, dk, dv and,
// when P > 0, the float32 buffers dpk/dpv: per-row partials [B,Hkv,P,D] (p.deterministic) or
// [T,Hkv,P,D] accumulators that the caller zero-fills (atomic mode).  The tensor-core dK/dV and dQ
// kernels when allow_tc and choose_bwd_path say so, else the SIMT ones; *path (optional) gets the
// path taken.
cudaError_t launch_prefix_attn_bwd(const PrefixAttnParams& p, DType dt, cudaStream_t stream, bool allow_tc = true,
                                   FwdPath* path = nullptr);
// The tensor-core dK/dV and dQ kernels alone (after the delta preprocess; see choose_bwd_path).
cudaError_t launch_prefix_attn_bwd_tc(const PrefixAttnParams& p, DType dt, cudaStream_t stream);

// Deterministic prefix-gradient reduction: out[t] = sum over b (in order) with index[b] == t of
// partial[b]; partial float32 [B, H*P*D] contiguous, out [T, H*P*D] contiguous in dtype dt.
cudaError_t launch_prefix_grad_reduce(const float* partial, const int64_t* index, void* out,
                                      int B, int T, int64_t row_elems, DType dt,
                                      cudaStream_t stream);

// ---- prefix MLP (activation codes: 0 identity, 1 tanh, 2 relu, 3 gelu (erf))
// y[p, c] = act(x[p, c] + bias[c]) for x [rows, cols] contiguous; pre (optional) gets x + bias.
// x is float32 when x_fp32 (the GEMM output), else of dtype dt; bias, pre, y are of dtype dt.
cudaError_t launch_mlp_bias_act(const void* x, bool x_fp32, const void* bias, void* pre, void* y,
                                int rows, int cols, int act, DType dt, cudaStream_t stream);
// out[l, kv, h, p, d] = y[p, c] + bias[c], c = ((l*2+kv)*Hkv+h)*D + d; y [P, NL*2*Hkv*D] contiguous.
cudaError_t launch_mlp_layout_store(const void* y, const void* bias, void* out, int P,
                                    int num_layers, int Hkv, int D, DType dt, cudaStream_t stream);
// Inverse of the layout store for backward: dy[p, c] = dout[l, kv, h, p, d]; dbias[c] = sum_p dy
// (fixed order; dbias may be null).  dout is contiguous [NL, 2, Hkv, P, D].
cudaError_t launch_mlp_layout_gather(const void* dout, void* dy, void* dbias, int P,
                                     int num_layers, int Hkv, int D, DType dt,
                                     cudaStream_t stream);
// dpre[p, c] = dh[p, c] * act'(pre[p, c]); dbias[c] = sum_p dpre[p, c] (may be null).
cudaError_t launch_mlp_act_bwd(const void* dh, const void* pre, void* dpre, void* dbias, int rows,
                               int cols, int act, DType dt, cudaStream_t stream);

}  // namespace spk
