// Host test of the emulated tensor-core primitives (csrc/tc_primitives.cuh under
// csrc/tests/cuda_emulation.h): fragment layouts against the PTX ISA formulas, written here in
// the ISA's own terms (element a_i / b_i / c_i of a lane, "groupID", "threadID_in_group"),
// independently of the inverse maps the emulation uses.  Also the ldmatrix addressing the
// tensor-core forward uses, and cp.async semantics (deferred until wait_group, zero-fill,
// 16-byte alignment).  Build: g++ -std=c++20 -DSPK_EMULATION -Icsrc; prints ALL PASSED.
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda_compat.cuh"
#include "tc_primitives.cuh"

static int g_fail = 0;
#define CHECK(cond, ...)                          \
  do {                                            \
    if (!(cond)) {                                \
      if (g_fail++ < 20) {                        \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);                 \
        std::printf("\n");                        \
      }                                           \
    }                                             \
  } while (0)

// ---- PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" (.f16/.bf16)
// a_i, i in [0, 8): row = groupID (i < 2 || 4 <= i < 6) else groupID + 8; col = 2 tig + (i & 1) (+8 for i >= 4)
static void isa_a(int lane, int i, int* row, int* col) {
  const int gid = lane >> 2, tig = lane % 4;
  *row = (i < 2 || (i >= 4 && i < 6)) ? gid : gid + 8;
  *col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
}
// b_i, i in [0, 4): row = 2 tig + (i & 1) (+8 for i >= 2); col = groupID
static void isa_b(int lane, int i, int* row, int* col) {
  const int gid = lane >> 2, tig = lane % 4;
  *row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
  *col = gid;
}
// c_i, i in [0, 4): row = groupID (i < 2) else groupID + 8; col = 2 tig + (i & 1)
static void isa_c(int lane, int i, int* row, int* col) {
  const int gid = lane >> 2, tig = lane % 4;
  *row = i < 2 ? gid : gid + 8;
  *col = tig * 2 + (i & 1);
}

template <typename T> uint16_t to_bits(float x);
template <> uint16_t to_bits<__half>(float x) { return __float2half_rn(x).bits; }
template <> uint16_t to_bits<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x).bits; }

// ---- mma.m16n8k16: two warps, each with its own A, B, C (small integers: every sum exact)
struct MmaData {
  float A[2][16][16], B[2][16][8], C[2][16][8], D[2][16][8];
};

template <typename T>
void mma_kernel(MmaData* m) {
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float c[4], d[4];
  for (int i = 0; i < 8; ++i) {  // element a_i sits in register i / 2, half i % 2
    int r, k;
    isa_a(lane, i, &r, &k);
    a[i / 2] |= (uint32_t)to_bits<T>(m->A[w][r][k]) << (16 * (i % 2));
  }
  for (int i = 0; i < 4; ++i) {
    int k, n;
    isa_b(lane, i, &k, &n);
    b[i / 2] |= (uint32_t)to_bits<T>(m->B[w][k][n]) << (16 * (i % 2));
  }
  for (int i = 0; i < 4; ++i) {
    int r, n;
    isa_c(lane, i, &r, &n);
    c[i] = m->C[w][r][n];
  }
  spk::tc::mma_16816<T>(d, a, b, c);
  for (int i = 0; i < 4; ++i) {
    int r, n;
    isa_c(lane, i, &r, &n);
    m->D[w][r][n] = d[i];
  }
}

template <typename T>
void test_mma(const char* name) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> u(-8, 8);
  MmaData m;
  for (int w = 0; w < 2; ++w) {
    for (auto& r : m.A[w]) for (float& x : r) x = (float)u(rng);
    for (auto& r : m.B[w]) for (float& x : r) x = (float)u(rng);
    for (auto& r : m.C[w]) for (float& x : r) x = (float)u(rng) * 0.5f;
  }
  std::memset(m.D, 0xff, sizeof(m.D));
  spk_emu::launch(dim3(1), dim3(64), 0, mma_kernel<T>, &m);
  CHECK(cudaGetLastError() == cudaSuccess, "%s mma launch", name);
  for (int w = 0; w < 2; ++w)
    for (int i = 0; i < 16; ++i)
      for (int n = 0; n < 8; ++n) {
        double want = m.C[w][i][n];
        for (int k = 0; k < 16; ++k) want += (double)m.A[w][i][k] * m.B[w][k][n];
        CHECK(m.D[w][i][n] == (float)want, "%s mma warp %d D[%d][%d] = %g, want %g", name, w, i, n, m.D[w][i][n], want);
      }
}

// ---- ldmatrix.x4 (.trans): 4 matrices, rows at scattered 16-byte aligned addresses
constexpr int kRowSlots = 64;  // 16-byte slots in the shared buffer
static int slot_of(int mat, int row) { return (mat * 8 + row) * 7 % kRowSlots; }  // 7 coprime to 64
static uint16_t val(int mat, int row, int col) { return (uint16_t)(mat * 64 + row * 8 + col + 1); }

struct LdsmOut {
  uint32_t r[2][32][4];
};

void ldsm_kernel(LdsmOut* out) {
  SPK_DYNAMIC_SMEM_BYTES(smem);
  uint16_t* s = reinterpret_cast<uint16_t*>(smem);
  if (threadIdx.x == 0)
    for (int m = 0; m < 4; ++m)
      for (int r = 0; r < 8; ++r)
        for (int c = 0; c < 8; ++c) s[slot_of(m, r) * 8 + c] = val(m, r, c);
  __syncthreads();
  const int lane = threadIdx.x;  // lanes 8i..8i+7 give the rows of matrix i
  const uint16_t* row = s + slot_of(lane / 8, lane % 8) * 8;
  spk::tc::ldmatrix_x4(out->r[0][lane], row);
  spk::tc::ldmatrix_x4_trans(out->r[1][lane], row);
}

void test_ldmatrix() {
  LdsmOut out;
  spk_emu::launch(dim3(1), dim3(32), kRowSlots * 16, ldsm_kernel, &out);
  CHECK(cudaGetLastError() == cudaSuccess, "ldmatrix launch");
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 2; ++j) {
        // ISA: without .trans lane holds row lane/4, cols 2(lane%4)+j; .trans: the transpose
        const uint16_t n = (uint16_t)(out.r[0][lane][i] >> (16 * j));
        const uint16_t t = (uint16_t)(out.r[1][lane][i] >> (16 * j));
        CHECK(n == val(i, lane / 4, 2 * (lane % 4) + j), "ldmatrix lane %d reg %d half %d", lane, i, j);
        CHECK(t == val(i, 2 * (lane % 4) + j, lane / 4), "ldmatrix.trans lane %d reg %d half %d", lane, i, j);
      }
}

// ---- the forward kernel's ldmatrix addressing gives the ISA fragments
// Q tile rows-major [16][16] -> A; K [16 keys][16 d] -> B of two n-tiles (S = Q K^T);
// V [16 keys][16 d] with .trans -> B of two n-tiles (O = P V).
struct AddrOut {
  uint32_t qa[32][4], kb[32][4], vb[32][4];
};
static uint16_t tile_val(int which, int r, int c) { return (uint16_t)(which * 256 + r * 16 + c + 1); }

void addr_kernel(AddrOut* out) {
  SPK_DYNAMIC_SMEM_BYTES(smem);
  uint16_t* s = reinterpret_cast<uint16_t*>(smem);  // 3 tiles [16][16], row stride 16
  if (threadIdx.x == 0)
    for (int w = 0; w < 3; ++w)
      for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) s[w * 256 + r * 16 + c] = tile_val(w, r, c);
  __syncthreads();
  const int lane = threadIdx.x, li = lane % 8, mi = lane / 8;  // as in prefix_attention_fwd_tc.cu
  spk::tc::ldmatrix_x4(out->qa[lane], s + ((mi & 1) * 8 + li) * 16 + (mi >> 1) * 8);
  spk::tc::ldmatrix_x4(out->kb[lane], s + 256 + ((mi >> 1) * 8 + li) * 16 + (mi & 1) * 8);
  spk::tc::ldmatrix_x4_trans(out->vb[lane], s + 512 + ((mi & 1) * 8 + li) * 16 + (mi >> 1) * 8);
}

void test_kernel_addressing() {
  AddrOut out;
  spk_emu::launch(dim3(1), dim3(32), 3 * 256 * 2, addr_kernel, &out);
  CHECK(cudaGetLastError() == cudaSuccess, "addressing launch");
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 8; ++i) {  // A = Q[row][k]
      int r, k;
      isa_a(lane, i, &r, &k);
      CHECK((uint16_t)(out.qa[lane][i / 2] >> (16 * (i % 2))) == tile_val(0, r, k), "Q->A lane %d a%d", lane, i);
    }
    for (int nt = 0; nt < 2; ++nt)
      for (int i = 0; i < 4; ++i) {
        int k, n;
        isa_b(lane, i, &k, &n);
        // S = Q K^T: B[k][n] = K[key = 8 nt + n][d = k];  O = P V: B[k][n] = V[key = k][d = 8 nt + n]
        const uint16_t kb = (uint16_t)(out.kb[lane][2 * nt + i / 2] >> (16 * (i % 2)));
        const uint16_t vb = (uint16_t)(out.vb[lane][2 * nt + i / 2] >> (16 * (i % 2)));
        CHECK(kb == tile_val(1, 8 * nt + n, k), "K->B lane %d ntile %d b%d", lane, nt, i);
        CHECK(vb == tile_val(2, k, 8 * nt + n), "V->B lane %d ntile %d b%d", lane, nt, i);
      }
  }
}

// ---- cp.async: deferred to wait_group, zero-fill, alignment
struct CpOut {
  uint16_t before[8], after_wait1[16], after_wait0[16];
};
alignas(16) static uint16_t g_src[32];

void cp_kernel(CpOut* out) {
  SPK_DYNAMIC_SMEM_BYTES(smem);
  uint16_t* s = reinterpret_cast<uint16_t*>(smem);
  if (threadIdx.x != 0) return;
  spk::tc::cp_async_16(s, g_src, true);
  spk::tc::cp_async_commit();
  spk::tc::cp_async_16(s + 8, g_src + 8, false);  // zero-fill
  spk::tc::cp_async_commit();
  std::memcpy(out->before, s, 16);
  spk::tc::cp_async_wait<1>();
  std::memcpy(out->after_wait1, s, 32);
  spk::tc::cp_async_wait<0>();
  std::memcpy(out->after_wait0, s, 32);
}

void misaligned_kernel(int which) {
  SPK_DYNAMIC_SMEM_BYTES(smem);
  uint16_t* s = reinterpret_cast<uint16_t*>(smem);
  if (which == 0) spk::tc::cp_async_16(s, g_src + 1, true);
  if (which == 1) spk::tc::cp_async_16(s + 4, g_src, true);
  if (which == 2) {
    uint32_t r[4];
    spk::tc::ldmatrix_x4(r, s + 4 + 8 * (int)threadIdx.x);
  }
  spk::tc::cp_async_commit();
  spk::tc::cp_async_wait<0>();
}

void test_cp_async() {
  for (int i = 0; i < 32; ++i) g_src[i] = (uint16_t)(100 + i);
  CpOut out;
  spk_emu::launch(dim3(1), dim3(32), 64, cp_kernel, &out);
  CHECK(cudaGetLastError() == cudaSuccess, "cp.async launch");
  for (int i = 0; i < 8; ++i) CHECK(out.before[i] == 0xffff, "cp.async landed before wait_group");
  for (int i = 0; i < 8; ++i) CHECK(out.after_wait1[i] == 100 + i, "wait_group 1: first group");
  for (int i = 8; i < 16; ++i) CHECK(out.after_wait1[i] == 0xffff, "wait_group 1 landed the newest group");
  for (int i = 0; i < 8; ++i) CHECK(out.after_wait0[i] == 100 + i, "wait_group 0: first group");
  for (int i = 8; i < 16; ++i) CHECK(out.after_wait0[i] == 0, "zero-fill");
  for (int which = 0; which < 3; ++which) {
    spk_emu::launch(dim3(1), dim3(32), 1024, misaligned_kernel, which);
    CHECK(cudaGetLastError() != cudaSuccess, "misaligned access %d not reported", which);
  }
}

int main() {
  test_mma<__nv_bfloat16>("bf16");
  test_mma<__half>("f16");
  test_ldmatrix();
  test_kernel_addressing();
  test_cp_async();
  if (g_fail) {
    std::printf("%d FAILURES\n", g_fail);
    return 1;
  }
  std::printf("ALL PASSED\n");
  return 0;
}
