// Tensor-core primitives of the sm_80+ kernels, each a small wrapper with two implementations:
//   * device (nvcc, SPK_WITH_CUTE): CuTe's arch atoms, i.e. one PTX instruction each
//     (mma.sync.m16n8k16 .f32.{bf16,f16}, ldmatrix.x4[.trans], cp.async.cg 16 B with zero-fill);
//   * host emulation (SPK_EMULATION): warp collectives of csrc/tests/cuda_emulation.h whose
//     fragment layouts follow the PTX ISA tables (checked by csrc/tests/tc_emulation_test.cpp).
// Fragments (PTX ISA "mma.m16n8k16", 16-bit A/B, f32 C/D; g = lane / 4, t = lane % 4):
//   A 16x16 row-major, 4 regs of 2 halves: reg r, half j -> (g + 8*(r&1), 2t + j + 8*(r>>1))
//   B 16x8 (k x n),    2 regs:             reg r, half j -> (k = 2t + j + 8r, n = g)
//   C/D 16x8 f32,      4 floats:           elem e        -> (g + 8*(e>>1), 2t + (e&1))
// ldmatrix.x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; reg i of lane l holds
//   M_i[l/4][2(l%4) + j] (j = half), or M_i[2(l%4) + j][l/4] with .trans.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "cuda_compat.cuh"
#include "dtype_utils.cuh"

#if !defined(SPK_EMULATION) && defined(SPK_WITH_CUTE)
#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>
#endif

// SPK_TC_ENABLED: the tensor-core kernels have a real body here (device code for sm_80+ with
// CuTe, or the host emulation); elsewhere they compile to an empty body and are never launched.
#if defined(SPK_EMULATION)
#define SPK_TC_ENABLED 1
#elif defined(SPK_WITH_CUTE) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define SPK_TC_ENABLED 1
#else
#define SPK_TC_ENABLED 0
#endif

namespace spk {
namespace tc {

__device__ __forceinline__ uint16_t bits16(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint16_t bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// Two floats rounded to T and packed as one 32-bit fragment register (lo = lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return (uint32_t)bits16(from_float<T>(lo)) | ((uint32_t)bits16(from_float<T>(hi)) << 16);
}

#if defined(SPK_EMULATION)

inline float half_to_float(__half, uint16_t b) { return __half2float(__half{b}); }
inline float half_to_float(__nv_bfloat16, uint16_t b) { return __bfloat162float(__nv_bfloat16{b}); }

// d = a * b + c (m16n8k16); products exact, sums in double, rounded once to float.
template <typename T>
inline void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  const uint64_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  uint64_t all[32][spk_emu::kXchgWords];
  spk_emu::warp_exchange(mine, 6, all);
  auto A = [&](int row, int k) {  // inverse of the A table above
    const uint32_t reg = (uint32_t)all[(row % 8) * 4 + (k % 8) / 2][(row / 8) + 2 * (k / 8)];
    return half_to_float(T{}, (uint16_t)(reg >> (16 * (k % 2))));
  };
  auto B = [&](int k, int n) {
    const uint32_t reg = (uint32_t)all[n * 4 + (k % 8) / 2][4 + k / 8];
    return half_to_float(T{}, (uint16_t)(reg >> (16 * (k % 2))));
  };
  const int lane = (int)spk_emu::lane_id(), g = lane / 4, t = lane % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    double acc = 0.0;
    for (int k = 0; k < 16; ++k) acc += (double)A(row, k) * (double)B(k, col);
    out[e] = (float)(acc + (double)c[e]);
  }
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

template <bool kTrans>
inline void ldmatrix_x4_impl(uint32_t r[4], const void* row_addr) {
  if ((reinterpret_cast<uintptr_t>(row_addr) & 15u) != 0) spk_emu::fail("ldmatrix: row address not 16-byte aligned");
  if (!spk_emu::in_smem(row_addr, 16)) spk_emu::fail("ldmatrix: row address outside dynamic shared memory");
  const uint64_t mine[1] = {(uint64_t)reinterpret_cast<uintptr_t>(row_addr)};
  uint64_t all[32][spk_emu::kXchgWords];
  spk_emu::warp_exchange(mine, 1, all);
  const int lane = (int)spk_emu::lane_id();
  for (int i = 0; i < 4; ++i) {
    uint32_t v = 0;
    for (int j = 0; j < 2; ++j) {
      const int row = kTrans ? 2 * (lane % 4) + j : lane / 4;
      const int col = kTrans ? lane / 4 : 2 * (lane % 4) + j;
      const uintptr_t addr = (uintptr_t)all[8 * i + row][0];
      uint16_t h = 0xffff;
      if (spk_emu::in_smem(reinterpret_cast<const void*>(addr), 16))
        std::memcpy(&h, reinterpret_cast<const char*>(addr) + 2 * col, 2);
      v |= (uint32_t)h << (16 * j);
    }
    r[i] = v;
  }
}
inline void ldmatrix_x4(uint32_t r[4], const void* row_addr) { ldmatrix_x4_impl<false>(r, row_addr); }
inline void ldmatrix_x4_trans(uint32_t r[4], const void* row_addr) { ldmatrix_x4_impl<true>(r, row_addr); }

inline void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  spk_emu::cp_async_16(smem_dst, gmem_src, valid);
}
inline void cp_async_commit() { spk_emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() { spk_emu::cp_async_wait(N); }

// ex2.approx.ftz.f32: 2^x with results below FLT_MIN flushed to +0 (the hardware's relative error,
// at most 2^-22, is not modelled: the float64 comparison tolerates far more)
inline float exp2_approx(float x) {
  const float y = std::exp2(x);
  return y < FLT_MIN ? 0.f : y;
}

#elif SPK_TC_ENABLED

template <typename T>
__device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                         const float c[4]) {
  cute::SM80_16x8x16_F32BF16BF16F32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1],
                                            c[2], c[3]);
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4]) {
  cute::SM80_16x8x16_F32F16F16F32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], c[2],
                                          c[3]);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row_addr) {
  cute::SM75_U32x4_LDSM_N::copy(*static_cast<const cute::uint128_t*>(row_addr), r[0], r[1], r[2], r[3]);
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* row_addr) {
  cute::SM75_U16x8_LDSM_T::copy(*static_cast<const cute::uint128_t*>(row_addr), r[0], r[1], r[2], r[3]);
}
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(*static_cast<const cute::uint128_t*>(gmem_src),
                                                               *static_cast<cute::uint128_t*>(smem_dst), valid);
}
__device__ __forceinline__ void cp_async_commit() { cute::cp_async_fence(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { cute::cp_async_wait<N>(); }

// one MUFU.EX2 (exp2f without fast-math adds a range check and two scalings around it)
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

#endif

}  // namespace tc
}  // namespace spk
