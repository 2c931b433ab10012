// Host emulation of the subset of CUDA that csrc/*.cu uses, so the real kernel code can be
// executed on a CPU (tests/test_cuda_host.py).  Compiled as C++20 with -DSPK_EMULATION.
//
// A block's threads are cooperative fibers (ucontext) on one OS thread, scheduled round
// robin; __syncthreads / __syncwarp are barriers over the live threads of the block / warp,
// __shfl_xor_sync exchanges through a per-warp slot array between two warp barriers.
// Blocks run one after another.  This checks indexing, masking, the math and barrier
// placement (a read of shared memory before the writing threads reached the barrier reads
// stale data here too, since fibers only switch at barriers); it cannot show
// GPU-specific issues (memory model, bank conflicts, timing).
#pragma once

#include <ucontext.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef int cudaError_t;
typedef void* cudaStream_t;
enum : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <class F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int bytes) {
  return bytes <= 227 * 1024 ? cudaSuccess : cudaErrorInvalidValue;
}
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }

// ---------------------------------------------------------------- storage types
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return (float)f;
}
inline __half __float2half_rn(float x) {
  _Float16 f = (_Float16)x;  // round to nearest even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = (uint32_t)b.bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  __nv_bfloat16 b;
  if (std::isnan(x)) {
    b.bits = 0x7fc0;
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    b.bits = (uint16_t)(u >> 16);
  }
  return b;
}

namespace spk_emu {

struct Barrier {
  int expected = 0;
  int arrived = 0;
  long gen = 0;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  Barrier* waiting = nullptr;
  long wait_gen = 0;
  unsigned tid = 0;
};

struct BlockState {
  dim3 block_idx, block_dim, grid_dim;
  std::vector<Fiber> fibers;
  Barrier block_bar;
  std::vector<Barrier> warp_bars;
  std::vector<float> shfl;
  std::vector<float> smem;
  ucontext_t sched;
  Fiber* current = nullptr;
};

inline BlockState*& state() {
  static thread_local BlockState* s = nullptr;
  return s;
}

struct Idx {
  unsigned x, y, z;
};
inline Idx thread_idx() { return Idx{state()->current->tid, 0, 0}; }
inline Idx block_idx() { auto& b = state()->block_idx; return Idx{b.x, b.y, b.z}; }
inline Idx block_dim() { auto& b = state()->block_dim; return Idx{b.x, b.y, b.z}; }
inline Idx grid_dim() { auto& b = state()->grid_dim; return Idx{b.x, b.y, b.z}; }

inline void arrive_and_wait(Barrier& bar) {
  BlockState* s = state();
  Fiber* f = s->current;
  f->waiting = &bar;
  f->wait_gen = bar.gen;
  if (++bar.arrived == bar.expected) {
    bar.arrived = 0;
    ++bar.gen;
  }
  swapcontext(&f->ctx, &s->sched);  // the scheduler resumes us once bar.gen moved on
}

inline void drop(Barrier& bar) {
  --bar.expected;
  if (bar.arrived > 0 && bar.arrived == bar.expected) {
    bar.arrived = 0;
    ++bar.gen;
  }
}

inline float* dynamic_smem() { return state()->smem.data(); }

inline float shfl_xor(float v, int off) {
  BlockState* s = state();
  const unsigned tid = s->current->tid;
  const unsigned warp = tid / 32, lane = tid % 32;
  s->shfl[tid] = v;
  arrive_and_wait(s->warp_bars[warp]);
  const float r = s->shfl[warp * 32 + (lane ^ (unsigned)off)];
  arrive_and_wait(s->warp_bars[warp]);
  return r;
}

template <class F>
struct Trampoline {
  static F* fn;
  static void run() {
    BlockState* s = state();
    (*fn)();
    Fiber* f = s->current;
    f->done = true;
    drop(s->block_bar);
    drop(s->warp_bars[f->tid / 32]);
  }
};
template <class F>
F* Trampoline<F>::fn = nullptr;

inline cudaError_t& last_error() {
  static thread_local cudaError_t e = cudaSuccess;
  return e;
}

template <class Kernel, class... Args>
void launch(dim3 grid, dim3 block, size_t smem_bytes, Kernel kernel, Args... args) {
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x > 1024) {
    last_error() = cudaErrorInvalidValue;
    return;
  }
  auto body = [&]() { kernel(args...); };
  using Body = decltype(body);
  Trampoline<Body>::fn = &body;
  BlockState s;
  s.block_dim = block;
  s.grid_dim = grid;
  s.fibers.resize(block.x);
  for (auto& f : s.fibers) f.stack.resize(256 * 1024);
  s.shfl.assign(((block.x + 31) / 32) * 32, 0.f);
  BlockState* saved = state();
  state() = &s;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block_idx = dim3(bx, by, bz);
        // poison shared memory: a read before any write shows up as NaN
        s.smem.assign(smem_bytes / sizeof(float) + 1, std::nanf(""));
        s.block_bar = Barrier{(int)block.x, 0, 0};
        s.warp_bars.assign((block.x + 31) / 32, Barrier{});
        for (unsigned t = 0; t < block.x; ++t) s.warp_bars[t / 32].expected += 1;
        for (unsigned t = 0; t < block.x; ++t) {
          Fiber& f = s.fibers[t];
          f.done = false;
          f.waiting = nullptr;
          f.tid = t;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &s.sched;
          makecontext(&f.ctx, (void (*)())Trampoline<Body>::run, 0);
        }
        unsigned live = block.x;
        while (live > 0) {
          bool progressed = false;
          for (auto& f : s.fibers) {
            if (f.done) continue;
            if (f.waiting != nullptr && f.waiting->gen == f.wait_gen) continue;  // still blocked
            f.waiting = nullptr;
            s.current = &f;
            swapcontext(&s.sched, &f.ctx);
            progressed = true;
            if (f.done) --live;
          }
          if (!progressed) {
            std::fprintf(stderr, "spk_emu: deadlock in block (%u,%u,%u)\n", bx, by, bz);
            std::abort();
          }
        }
      }
  state() = saved;
}

}  // namespace spk_emu

#define threadIdx (spk_emu::thread_idx())
#define blockIdx (spk_emu::block_idx())
#define blockDim (spk_emu::block_dim())
#define gridDim (spk_emu::grid_dim())

inline void __syncthreads() { spk_emu::arrive_and_wait(spk_emu::state()->block_bar); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  spk_emu::BlockState* s = spk_emu::state();
  spk_emu::arrive_and_wait(s->warp_bars[s->current->tid / 32]);
}
inline float __shfl_xor_sync(unsigned, float v, int off) { return spk_emu::shfl_xor(v, off); }
inline float atomicAdd(float* addr, float v) { return std::atomic_ref<float>(*addr).fetch_add(v); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline cudaError_t cudaGetLastError() {
  cudaError_t e = spk_emu::last_error();
  spk_emu::last_error() = cudaSuccess;
  return e;
}

#define SPK_DYNAMIC_SMEM(name) float* name = spk_emu::dynamic_smem()
#define SPK_LAUNCH(kernel, grid, block, smem, stream, ...) spk_emu::launch(grid, block, smem, kernel, __VA_ARGS__)
