// CUDA headers and the two constructs that differ between a real nvcc build and the host
// emulation build (-DSPK_EMULATION, see csrc/tests/cuda_emulation.h): the dynamic shared
// memory declaration and the kernel launch.
#pragma once

#if defined(SPK_EMULATION)
#include "tests/cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define SPK_DYNAMIC_SMEM(name) extern __shared__ float name[]
#define SPK_DYNAMIC_SMEM_BYTES(name) extern __shared__ __align__(128) unsigned char name[]
#define SPK_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif
