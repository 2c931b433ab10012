// Host emulation of the subset of CUDA that csrc/*.cu uses, so the real kernel code can be
// executed on a CPU (tests/test_cuda_host.py).  Compiled as C++20 with -DSPK_EMULATION.
//
// A block's threads are cooperative fibers (ucontext) on one OS thread, scheduled round
// robin; __syncthreads / __syncwarp are barriers over the live threads of the block / warp,
// __shfl_xor_sync exchanges through a per-warp slot array between two warp barriers.
// Blocks run one after another, in grid, reversed or random order (SPK_EMU_ORDER).  Tensor-core primitives (csrc/tc_primitives.cuh): mma.sync and
// ldmatrix are warp collectives over warp_exchange (PTX ISA fragment layouts), cp.async is
// queued per thread and performed at cp.async.wait_group (16-byte alignment asserted; a failed
// check is reported by cudaGetLastError).  Shared memory is poisoned with 0xff bytes (NaN in
// float32, float16 and bfloat16).  This checks indexing, masking, the math and barrier
// placement (a read of shared memory before the writing threads reached the barrier reads
// stale data here too, since fibers only switch at barriers); it cannot show
// GPU-specific issues (memory model, bank conflicts, timing).
//
// Race detection (built with -fsanitize=thread; tests/test_cuda_races.py): every thread of every
// block is its own ThreadSanitizer fiber, and the only happens-before edges are the ones CUDA
// gives: a block barrier (__syncthreads) orders the block's threads, a warp barrier (__syncwarp,
// shuffles, warp collectives) orders one warp's lanes, and the end of a launch orders everything
// before the next host step.  Switching fibers creates no edge (no_sync), so TSan's per-word shadow
// memory reports two accesses to the same word of shared or global memory, one of them a write,
// from two threads with no barrier between them (within a block), or from two blocks (unless both
// are atomics).  The emulator's own bookkeeping is excluded (ignore regions); each block gets its
// own shared memory, fibers and barrier objects, so reuse across blocks is not a race.  TSan has
// 256 slots and gives a new fiber a recycled slot's history as if ordered, so between blocks the
// per-thread mode sees races only among blocks whose threads fit in 256 slots together;
// SPK_EMU_RACES=blocks (one fiber per block, nothing inside a block checked) covers any two of
// 256 blocks.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <random>
#include <cstddef>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#define SPK_EMU_TSAN 1
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_ignore_thread_begin();  // exported by the TSan runtime, not in its header
extern "C" void __tsan_ignore_thread_end();
#endif

namespace spk_emu {
// ThreadSanitizer annotations (no-ops in a plain build).
#if defined(SPK_EMU_TSAN)
inline void hb_release(void* addr) { __tsan_release(addr); }
inline void hb_acquire(void* addr) { __tsan_acquire(addr); }
inline void internal_begin() { __tsan_ignore_thread_begin(); }
inline void internal_end() { __tsan_ignore_thread_end(); }
#else
inline void hb_release(void*) {}
inline void hb_acquire(void*) {}
inline void internal_begin() {}
inline void internal_end() {}
#endif
}  // namespace spk_emu

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
  char* sync = nullptr;  // 2 bytes: happens-before objects of even / odd generations (fresh per block)
};

// One emulated cp.async (16 bytes; zero-fill when !valid).
struct AsyncCopy {
  void* dst;
  const void* src;
  bool valid;
};

struct Fiber {
  ucontext_t ctx;
  void* tsan = nullptr;  // the ThreadSanitizer fiber of this thread (race-detection build)
  std::vector<char> stack;
  bool done = false;
  Barrier* waiting = nullptr;
  long wait_gen = 0;
  unsigned tid = 0;
  long collectives = 0;                         // warp collectives issued (exchange buffer parity)
  std::vector<AsyncCopy> open_group;            // cp.async issued since the last commit
  std::vector<std::vector<AsyncCopy>> groups;   // committed, not yet waited for (oldest first)
};

struct BlockState {
  dim3 block_idx, block_dim, grid_dim;
  std::vector<Fiber> fibers;
  Barrier block_bar;
  std::vector<Barrier> warp_bars;
  std::vector<float> shfl;
  std::vector<uint64_t> xchg;  // warp collectives: [warp][parity][lane][kXchgWords]
  std::vector<float> smem;
  std::vector<char> sync;  // the barriers' happens-before objects, 2 per barrier per block of the launch
  ucontext_t sched;
  void* sched_tsan = nullptr;  // the scheduler's ThreadSanitizer fiber
  char launch_done = 0;        // happens-before object: every thread's exit -> the launch's return
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

// Back to the scheduler (no happens-before edge: the scheduler never passes one on between threads).
inline void yield_to_scheduler(BlockState* s, Fiber* f) {
#if defined(SPK_EMU_TSAN)
  __tsan_switch_to_fiber(s->sched_tsan, __tsan_switch_to_fiber_no_sync);
#endif
  swapcontext(&f->ctx, &s->sched);
}

inline void arrive_and_wait(Barrier& bar) {
  BlockState* s = state();
  Fiber* f = s->current;
  internal_begin();
  const long gen = bar.gen;
  f->waiting = &bar;
  f->wait_gen = gen;
  hb_release(bar.sync + (gen & 1));  // everything before the barrier ...
  if (++bar.arrived == bar.expected) {
    bar.arrived = 0;
    ++bar.gen;
  }
  internal_end();
  yield_to_scheduler(s, f);  // the scheduler resumes us once bar.gen moved on
  hb_acquire(bar.sync + (gen & 1));  // ... happens before everything after it
}

inline void drop(Barrier& bar) {
  hb_release(bar.sync + (bar.gen & 1));
  --bar.expected;
  if (bar.arrived > 0 && bar.arrived == bar.expected) {
    bar.arrived = 0;
    ++bar.gen;
  }
}

inline float* dynamic_smem() { return state()->smem.data(); }

// A kernel-side error (misaligned cp.async / ldmatrix, address outside shared memory): reported
// once on stderr and returned by the next cudaGetLastError(), so a test fails instead of aborting.
inline cudaError_t& last_error();
inline void fail(const char* what) {
  if (last_error() == cudaSuccess) std::fprintf(stderr, "spk_emu: %s\n", what);
  last_error() = cudaErrorLaunchFailure;
}

inline bool in_smem(const void* p, size_t bytes) {
  const char* lo = reinterpret_cast<const char*>(state()->smem.data());
  const char* hi = lo + state()->smem.size() * sizeof(float);
  const char* c = static_cast<const char*>(p);
  return c >= lo && c + bytes <= hi;
}

constexpr int kXchgWords = 8;

// Warp-collective exchange: every lane of the calling warp publishes n <= kXchgWords words; after
// one warp barrier, `all[lane][w]` holds lane's words.  Two buffers alternate by call parity, so a
// lane cannot overwrite a buffer that another lane is still reading (that lane would have to pass
// the next collective's barrier first).
inline void warp_exchange(const uint64_t* words, int n, uint64_t (*all)[kXchgWords]) {
  BlockState* s = state();
  Fiber* f = s->current;
  const unsigned warp = f->tid / 32, lane = f->tid % 32;
  internal_begin();  // the exchange buffer is the emulator's, not the kernel's memory
  uint64_t* buf = s->xchg.data() + ((size_t)warp * 2 + (f->collectives++ & 1)) * 32 * kXchgWords;
  for (int w = 0; w < n; ++w) buf[lane * kXchgWords + w] = words[w];
  internal_end();
  arrive_and_wait(s->warp_bars[warp]);
  internal_begin();
  for (int l = 0; l < 32; ++l)
    for (int w = 0; w < n; ++w) all[l][w] = buf[l * kXchgWords + w];
  internal_end();
}

inline unsigned lane_id() { return state()->current->tid % 32; }

// cp.async: queued per thread, performed at cp.async.wait_group (so a read before the wait sees the
// shared-memory poison, as a missing wait would on a GPU).  Both addresses must be 16-byte aligned.
inline void cp_async_16(void* dst, const void* src, bool valid) {
  if ((reinterpret_cast<uintptr_t>(dst) & 15u) != 0 || (valid && (reinterpret_cast<uintptr_t>(src) & 15u) != 0)) {
    fail("cp.async: address not 16-byte aligned");
    return;
  }
  if (!in_smem(dst, 16)) {
    fail("cp.async: destination outside dynamic shared memory");
    return;
  }
  internal_begin();
  state()->current->open_group.push_back(AsyncCopy{dst, src, valid});
  internal_end();
}
inline void cp_async_commit() {
  Fiber* f = state()->current;
  internal_begin();
  f->groups.push_back(std::move(f->open_group));
  f->open_group.clear();
  internal_end();
}
// cp.async.wait_group n: all but the newest n committed groups have landed.
inline void cp_async_wait(int n) {
  Fiber* f = state()->current;
  internal_begin();
  while ((int)f->groups.size() > n) {
    std::vector<AsyncCopy> group = std::move(f->groups.front());
    f->groups.erase(f->groups.begin());
    internal_end();
    for (const AsyncCopy& c : group) {  // the copies themselves are this thread's accesses
      if (c.valid) std::memcpy(c.dst, c.src, 16);
      else std::memset(c.dst, 0, 16);
    }
    internal_begin();
    group = {};
  }
  internal_end();
}

inline float shfl_xor(float v, int off) {
  BlockState* s = state();
  const unsigned tid = s->current->tid;
  const unsigned warp = tid / 32, lane = tid % 32;
  internal_begin();
  s->shfl[tid] = v;
  internal_end();
  arrive_and_wait(s->warp_bars[warp]);
  internal_begin();
  const float r = s->shfl[warp * 32 + (lane ^ (unsigned)off)];
  internal_end();
  arrive_and_wait(s->warp_bars[warp]);
  return r;
}

template <class F>
struct Trampoline {
  static F* fn;
  static void run() {
    BlockState* s = state();
    (*fn)();
    internal_begin();
    Fiber* f = s->current;
    f->done = true;
    drop(s->block_bar);
    drop(s->warp_bars[f->tid / 32]);
#if defined(SPK_EMU_TSAN)
    // Read the scheduler's state before the release below, which must follow this thread's last
    // access.  Then leave by an explicit switch, never by returning: the return would run this
    // function's TSan exit hook on the scheduler's fiber (its shadow call stack would underflow).
    void* sched_tsan = s->sched_tsan;
    ucontext_t* sched = &s->sched;
    char* launch_done = &s->launch_done;
    internal_end();
    hb_release(launch_done);  // the launch's return acquires it
    __tsan_switch_to_fiber(sched_tsan, __tsan_switch_to_fiber_no_sync);
    setcontext(sched);
#else
    internal_end();
#endif
  }
};
template <class F>
F* Trampoline<F>::fn = nullptr;

inline cudaError_t& last_error() {
  static thread_local cudaError_t e = cudaSuccess;
  return e;
}

// Storage type of dynamic shared memory: 16-byte aligned (vector<float> data is malloc-aligned).
static_assert(alignof(std::max_align_t) >= 16, "emulated shared memory must be 16-byte aligned");

// Schedule of a launch, from the environment: SPK_EMU_ORDER = "forward" (default: blocks in grid
// order, fibers resumed in thread order), "reverse" (both reversed) or "shuffle" (blocks in a random
// order, fibers in a new random order at every scheduler pass; seed SPK_EMU_SEED).  Correct kernels
// give the same result under every order; a race between threads or blocks may not.
struct Order {
  enum Kind { kForward, kReverse, kShuffle } kind = kForward;
  uint64_t seed = 0;
};
inline Order schedule_order() {
  Order o;
  const char* k = std::getenv("SPK_EMU_ORDER");
  if (k != nullptr && std::strcmp(k, "reverse") == 0) o.kind = Order::kReverse;
  if (k != nullptr && std::strcmp(k, "shuffle") == 0) o.kind = Order::kShuffle;
  const char* seed = std::getenv("SPK_EMU_SEED");
  if (seed != nullptr) o.seed = std::strtoull(seed, nullptr, 10);
  return o;
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
  constexpr size_t kStack = 256 * 1024;
  internal_begin();  // the scheduler's own accesses are not the kernel's
  BlockState s;
  s.block_dim = block;
  s.grid_dim = grid;
  s.fibers.resize(block.x);
#if !defined(SPK_EMU_TSAN)
  for (auto& f : s.fibers) f.stack.resize(kStack);
#else
  s.sched_tsan = __tsan_get_current_fiber();
#endif
  s.shfl.assign(((block.x + 31) / 32) * 32, 0.f);
  s.xchg.assign((size_t)((block.x + 31) / 32) * 2 * 32 * kXchgWords, 0);
  BlockState* saved = state();
  state() = &s;
  const Order order = schedule_order();
  std::mt19937_64 rng(order.seed);
  std::vector<dim3> blocks;  // run order of the blocks
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) blocks.push_back(dim3(bx, by, bz));
  if (order.kind == Order::kReverse) std::reverse(blocks.begin(), blocks.end());
  if (order.kind == Order::kShuffle) std::shuffle(blocks.begin(), blocks.end(), rng);
  std::vector<unsigned> fiber_order(block.x);  // order in which the scheduler resumes fibers
  for (unsigned t = 0; t < block.x; ++t) fiber_order[t] = order.kind == Order::kReverse ? block.x - 1 - t : t;
  const unsigned warps = (block.x + 31) / 32;
  s.sync.assign(2 * (1 + warps) * blocks.size(), 0);  // each block's barriers get their own objects
  size_t block_number = 0;
#if defined(SPK_EMU_TSAN)
  std::vector<std::vector<void*>> finished;  // TSan fibers of the blocks that ran
  // SPK_EMU_RACES = "threads" (default): a TSan fiber per thread, so races inside a block are seen,
  // and between blocks while both blocks' fibers fit in TSan's 256 slots (two 128-thread blocks
  // adjacent in the run order).  "blocks": one TSan fiber per block (no race inside a block is
  // seen), so that races between any two of up to 256 blocks of a launch are.
  const char* races = std::getenv("SPK_EMU_RACES");
  const bool per_block_fiber = races != nullptr && std::strcmp(races, "blocks") == 0;
  constexpr size_t kTsanSlots = 256;
  size_t live_fibers = 0;
#endif
  for (const dim3& blk : blocks) {
        const unsigned bx = blk.x, by = blk.y, bz = blk.z;
        s.block_idx = blk;
        // Fresh per block: shared memory (a new allocation has a clean shadow in the race-detection
        // build), the barriers' happens-before objects (a TSan sync object outlives a free, so
        // no two blocks of a launch share one), and under TSan the fibers and their stacks
        // (mmap: new pages, clean shadow; unmapped after the block).
        std::vector<float>().swap(s.smem);
        // poison shared memory with all-ones bytes: NaN as float32, float16 and bfloat16 alike
        s.smem.resize(smem_bytes / sizeof(float) + 1);
        std::memset(s.smem.data(), 0xff, s.smem.size() * sizeof(float));
        char* sync = s.sync.data() + 2 * (1 + warps) * block_number++;  // never shared by two blocks
        s.block_bar = Barrier{(int)block.x, 0, 0, sync};
        s.warp_bars.assign(warps, Barrier{});
        for (unsigned w = 0; w < warps; ++w) s.warp_bars[w].sync = sync + 2 * (1 + w);
        for (unsigned t = 0; t < block.x; ++t) s.warp_bars[t / 32].expected += 1;
#if defined(SPK_EMU_TSAN)
        // Fibers of finished blocks stay alive while TSan has slots for them (see below).
        const size_t fresh = per_block_fiber ? 1 : block.x;
        while (!finished.empty() && live_fibers + fresh > kTsanSlots) {
          for (void* f : finished.front()) __tsan_destroy_fiber(f);
          live_fibers -= finished.front().size();
          finished.erase(finished.begin());
        }
        live_fibers += fresh;
        void* block_fiber = per_block_fiber ? __tsan_create_fiber(0) : nullptr;
        char* stacks = static_cast<char*>(
            mmap(nullptr, kStack * block.x, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
        if (stacks == MAP_FAILED) {
          std::fprintf(stderr, "spk_emu: cannot map fiber stacks\n");
          std::abort();
        }
#endif
        for (unsigned t = 0; t < block.x; ++t) {
          Fiber& f = s.fibers[t];
          f.done = false;
          f.waiting = nullptr;
          f.tid = t;
          f.collectives = 0;
          f.open_group.clear();
          f.groups.clear();  // copies never waited for are dropped with the block
          getcontext(&f.ctx);
#if defined(SPK_EMU_TSAN)
          f.tsan = per_block_fiber ? block_fiber : __tsan_create_fiber(0);
          f.ctx.uc_stack.ss_sp = stacks + kStack * t;
          f.ctx.uc_stack.ss_size = kStack;
#else
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
#endif
          f.ctx.uc_link = &s.sched;
          makecontext(&f.ctx, (void (*)())Trampoline<Body>::run, 0);
        }
        unsigned live = block.x;
        while (live > 0) {
          bool progressed = false;
          if (order.kind == Order::kShuffle) std::shuffle(fiber_order.begin(), fiber_order.end(), rng);
          for (unsigned t : fiber_order) {
            Fiber& f = s.fibers[t];
            if (f.done) continue;
            if (f.waiting != nullptr && f.waiting->gen == f.wait_gen) continue;  // still blocked
            f.waiting = nullptr;
            s.current = &f;
#if defined(SPK_EMU_TSAN)
            __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
#endif
            swapcontext(&s.sched, &f.ctx);
            progressed = true;
            if (f.done) --live;
          }
          if (!progressed) {
            std::fprintf(stderr, "spk_emu: deadlock in block (%u,%u,%u)\n", bx, by, bz);
            std::abort();
          }
        }
#if defined(SPK_EMU_TSAN)
        // A finished block's fibers are destroyed only when TSan runs out of slots: it hands a
        // destroyed fiber's slot (it has 256) to the next fiber it creates with the slot's
        // history as if ordered, which would hide a race between those two blocks.
        finished.emplace_back();
        if (per_block_fiber) finished.back().push_back(block_fiber);
        else
          for (auto& f : s.fibers) finished.back().push_back(f.tsan);
        munmap(stacks, kStack * block.x);
#endif
  }
  hb_acquire(&s.launch_done);  // the launch returns after every thread of every block finished
#if defined(SPK_EMU_TSAN)
  for (auto& group : finished)
    for (void* f : group) __tsan_destroy_fiber(f);
#endif
  state() = saved;
  internal_end();
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
#if defined(SPK_EMU_NONATOMIC_ATOMICADD)
// Mutation for the race tests only: atomicAdd as a plain read-modify-write, which TSan must report.
inline float atomicAdd(float* addr, float v) { const float old = *addr; *addr = old + v; return old; }
#else
inline float atomicAdd(float* addr, float v) { return std::atomic_ref<float>(*addr).fetch_add(v); }
#endif
inline float __expf(float x) { return std::exp(x); }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75 };
// The emulated device reports compute capability 9.x (mma.sync / ldmatrix / cp.async available).
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = 9; return cudaSuccess; }
inline float __logf(float x) { return std::log(x); }
inline cudaError_t cudaGetLastError() {
  cudaError_t e = spk_emu::last_error();
  spk_emu::last_error() = cudaSuccess;
  return e;
}

#define SPK_DYNAMIC_SMEM(name) float* name = spk_emu::dynamic_smem()
#define SPK_DYNAMIC_SMEM_BYTES(name) unsigned char* name = reinterpret_cast<unsigned char*>(spk_emu::dynamic_smem())
#define SPK_LAUNCH(kernel, grid, block, smem, stream, ...) spk_emu::launch(grid, block, smem, kernel, __VA_ARGS__)
