// Elementwise / epilogue kernels of the fused prefix MLP.  The GEMMs themselves run in cuBLAS
// through ATen (binding.cpp); these kernels fuse what sits around them:
//   fwd:  bias + activation after GEMM 1 (its float32 output; also writes the pre-activation
//         saved for backward, rounded once as nn.Linear rounds it),
//         bias + store into the [num_layers, 2, Hkv, P, D] layout after GEMM 2;
//   bwd:  gather of dOut back to [P, N] fused with the db2 column sum, and
//         dH * act'(pre) fused with the db1 column sum.
// Column sums run in a fixed order (one thread per column loops over the rows): deterministic.
#include "cuda_compat.cuh"

#include "dtype_utils.cuh"
#include "launchers.h"
#include "prefix_mlp_common.cuh"

namespace spk {

constexpr int kMlpThreads = 256;

// TIn: float for the float32 output of GEMM 1 (one rounding to T, as nn.Linear), or T when
// the backward recomputes act(pre) from the saved pre-activation.
template <typename TIn, typename T>
__global__ void __launch_bounds__(kMlpThreads) mlp_bias_act_kernel(const TIn* __restrict__ x, const T* __restrict__ bias,
                                                                   T* __restrict__ pre, T* __restrict__ y,
                                                                   int64_t n, int cols, int act) {
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    float v = to_float(x[e]);
    if (bias != nullptr) v += to_float(bias[e % cols]);
    const T v_t = from_float<T>(v);  // the pre-activation in storage precision, as nn.Linear gives it
    if (pre != nullptr) pre[e] = v_t;
    y[e] = from_float<T>(act_fwd(to_float(v_t), act));
  }
}

template <typename T>
__global__ void __launch_bounds__(kMlpThreads) mlp_layout_store_kernel(const T* __restrict__ y, const T* __restrict__ bias,
                                                                       T* __restrict__ out, int P, int64_t N, int D) {
  // e walks the OUTPUT contiguously: coalesced stores; reads of y are D-contiguous runs.
  const int64_t n = (int64_t)P * N;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t d = e % D;
    const int64_t p = (e / D) % P;
    const int64_t lkh = e / ((int64_t)D * P);
    const int64_t c = lkh * D + d;
    float v = to_float(y[p * N + c]);
    if (bias != nullptr) v += to_float(bias[c]);
    out[e] = from_float<T>(v);
  }
}

template <typename T>
__global__ void __launch_bounds__(kMlpThreads) mlp_layout_gather_kernel(const T* __restrict__ dout, T* __restrict__ dy,
                                                                        T* __restrict__ dbias, int P, int64_t N, int D) {
  for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < N; c += (int64_t)gridDim.x * blockDim.x) {
    float acc = 0.f;
    for (int p = 0; p < P; ++p) {
      const T g = dout[mlp_layout_offset(c, p, P, D)];
      dy[(int64_t)p * N + c] = g;
      acc += to_float(g);
    }
    if (dbias != nullptr) dbias[c] = from_float<T>(acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kMlpThreads) mlp_act_bwd_kernel(const T* __restrict__ dh, const T* __restrict__ pre,
                                                                  T* __restrict__ dpre, T* __restrict__ dbias,
                                                                  int rows, int64_t cols, int act) {
  for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += (int64_t)gridDim.x * blockDim.x) {
    float acc = 0.f;
    for (int r = 0; r < rows; ++r) {
      const int64_t o = (int64_t)r * cols + c;
      const T g = from_float<T>(to_float(dh[o]) * act_grad(to_float(pre[o]), act));
      dpre[o] = g;
      acc += to_float(g);
    }
    if (dbias != nullptr) dbias[c] = from_float<T>(acc);
  }
}

static unsigned grid_for(int64_t n) {
  int64_t g = (n + kMlpThreads - 1) / kMlpThreads;
  if (g > 65535) g = 65535;
  return (unsigned)(g < 1 ? 1 : g);
}

#define SPK_DTYPE_SWITCH(dt, T, ...)                                  \
  switch (dt) {                                                       \
    case DType::kFloat32: { using T = float; __VA_ARGS__; break; }    \
    case DType::kFloat16: { using T = __half; __VA_ARGS__; break; }   \
    case DType::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return cudaErrorInvalidValue;                            \
  }

template <typename TIn, typename T>
static void run_bias_act(const void* x, const void* bias, void* pre, void* y, int64_t n, int cols, int act,
                         cudaStream_t stream) {
  auto kernel = mlp_bias_act_kernel<TIn, T>;
  SPK_LAUNCH(kernel, grid_for(n), kMlpThreads, 0, stream, static_cast<const TIn*>(x), static_cast<const T*>(bias),
             static_cast<T*>(pre), static_cast<T*>(y), n, cols, act);
}

cudaError_t launch_mlp_bias_act(const void* x, bool x_fp32, const void* bias, void* pre, void* y, int rows, int cols,
                                int act, DType dt, cudaStream_t stream) {
  const int64_t n = (int64_t)rows * cols;
  if (n == 0) return cudaSuccess;
  if (x_fp32) {
    SPK_DTYPE_SWITCH(dt, T, run_bias_act<float, T>(x, bias, pre, y, n, cols, act, stream));
  } else {
    SPK_DTYPE_SWITCH(dt, T, run_bias_act<T, T>(x, bias, pre, y, n, cols, act, stream));
  }
  return cudaGetLastError();
}

cudaError_t launch_mlp_layout_store(const void* y, const void* bias, void* out, int P, int num_layers, int Hkv, int D,
                                    DType dt, cudaStream_t stream) {
  const int64_t N = (int64_t)num_layers * 2 * Hkv * D;
  if (N * P == 0) return cudaSuccess;
  SPK_DTYPE_SWITCH(dt, T,
                   SPK_LAUNCH(mlp_layout_store_kernel<T>, grid_for(N * P), kMlpThreads, 0, stream, 
                       static_cast<const T*>(y), static_cast<const T*>(bias), static_cast<T*>(out), P, N, D));
  return cudaGetLastError();
}

cudaError_t launch_mlp_layout_gather(const void* dout, void* dy, void* dbias, int P, int num_layers, int Hkv, int D,
                                     DType dt, cudaStream_t stream) {
  const int64_t N = (int64_t)num_layers * 2 * Hkv * D;
  if (N == 0) return cudaSuccess;
  SPK_DTYPE_SWITCH(dt, T,
                   SPK_LAUNCH(mlp_layout_gather_kernel<T>, grid_for(N), kMlpThreads, 0, stream, 
                       static_cast<const T*>(dout), static_cast<T*>(dy), static_cast<T*>(dbias), P, N, D));
  return cudaGetLastError();
}

cudaError_t launch_mlp_act_bwd(const void* dh, const void* pre, void* dpre, void* dbias, int rows, int cols, int act,
                               DType dt, cudaStream_t stream) {
  if (cols == 0) return cudaSuccess;
  SPK_DTYPE_SWITCH(dt, T,
                   SPK_LAUNCH(mlp_act_bwd_kernel<T>, grid_for(cols), kMlpThreads, 0, stream, 
                       static_cast<const T*>(dh), static_cast<const T*>(pre), static_cast<T*>(dpre),
                       static_cast<T*>(dbias), rows, cols, act));
  return cudaGetLastError();
}

}  // namespace spk
