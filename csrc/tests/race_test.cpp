// Planted races for the race-detection build of the host emulation (tests/test_cuda_races.py).
// Built with -fsanitize=thread -DSPK_EMULATION; `race_test <kernel> <racy|clean>` launches one
// kernel.  Each racy variant misses exactly one barrier (or atomic) that its clean twin has, so a
// ThreadSanitizer report for the racy run and none for the clean one shows the emulation sees
// that kind of race.
#include "tests/cuda_emulation.h"

#include <string>

// Read-after-write in shared memory: thread t reads the word thread t + 1 wrote.
__global__ void smem_read_after_write(float* out, bool sync) {
  SPK_DYNAMIC_SMEM(smem);
  const unsigned t = threadIdx.x, n = blockDim.x;
  smem[t] = (float)t;
  if (sync) __syncthreads();
  out[blockIdx.x * n + t] = smem[(t + 1) % n];
}

// Write-after-read: a tile buffer reused by the next iteration without a barrier after its use.
__global__ void smem_write_after_read(float* out, bool sync) {
  SPK_DYNAMIC_SMEM(smem);
  const unsigned t = threadIdx.x, n = blockDim.x;
  float acc = 0.f;
  for (int it = 0; it < 2; ++it) {
    smem[t] = (float)(t + it * n);
    __syncthreads();
    acc += smem[(t + 1) % n];
    if (sync) __syncthreads();
  }
  out[blockIdx.x * n + t] = acc;
}

// A warp barrier orders one warp only: reading another warp's word needs __syncthreads.
__global__ void smem_across_warps(float* out, bool sync) {
  SPK_DYNAMIC_SMEM(smem);
  const unsigned t = threadIdx.x, n = blockDim.x;
  smem[t] = (float)t;
  if (sync) __syncthreads();
  else __syncwarp();
  out[blockIdx.x * n + t] = smem[(t + 32) % n] + smem[t ^ 1u];
}

// Inside one warp a warp barrier is enough (clean in both variants' sense: `sync` adds nothing).
__global__ void smem_within_warp(float* out, bool) {
  SPK_DYNAMIC_SMEM(smem);
  const unsigned t = threadIdx.x, n = blockDim.x;
  smem[t] = (float)t;
  __syncwarp();
  out[blockIdx.x * n + t] = smem[t ^ 1u];
}

// Blocks accumulating into one global word: a plain read-modify-write races, atomicAdd does not
// (a block barrier before it orders that block's threads only).
__global__ void global_accumulate(float* out, bool atomic) {
  __syncthreads();
  if (threadIdx.x == 0) {
    if (atomic) atomicAdd(out, 1.0f);
    else out[0] += 1.0f;
  }
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: race_test <kernel> <racy|clean>\n");
    return 2;
  }
  const std::string kernel = argv[1];
  const bool clean = std::string(argv[2]) == "clean";
  const unsigned blocks = 3, threads = 64;
  std::vector<float> out(blocks * threads, 0.f);
  const size_t smem = threads * sizeof(float);
  if (kernel == "smem_read_after_write") SPK_LAUNCH(smem_read_after_write, dim3(blocks), dim3(threads), smem, nullptr, out.data(), clean);
  else if (kernel == "smem_write_after_read") SPK_LAUNCH(smem_write_after_read, dim3(blocks), dim3(threads), smem, nullptr, out.data(), clean);
  else if (kernel == "smem_across_warps") SPK_LAUNCH(smem_across_warps, dim3(blocks), dim3(threads), smem, nullptr, out.data(), clean);
  else if (kernel == "smem_within_warp") SPK_LAUNCH(smem_within_warp, dim3(blocks), dim3(threads), smem, nullptr, out.data(), clean);
  else if (kernel == "global_accumulate") SPK_LAUNCH(global_accumulate, dim3(blocks), dim3(threads), smem, nullptr, out.data(), clean);
  else {
    std::fprintf(stderr, "unknown kernel %s\n", kernel.c_str());
    return 2;
  }
  if (cudaGetLastError() != cudaSuccess) return 3;
  double sum = 0;
  for (float x : out) sum += x;
  std::printf("%s %s checksum %.1f\n", argv[1], argv[2], sum);
  return 0;
}
