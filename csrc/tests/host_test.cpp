// Host-side test of the __host__ __device__ helpers shared by the CUDA kernels:
// index arithmetic, visibility predicates, online softmax / LSE merge, MLP activations and
// layout.  Built with g++ by tests/test_cuda_host.py; prints "ALL PASSED" and exits 0 on success.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../prefix_attention_common.cuh"
#include "../prefix_mlp_common.cuh"

static int failures = 0;
#define CHECK(cond)                                                       \
  do {                                                                    \
    if (!(cond)) {                                                        \
      std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);         \
      ++failures;                                                         \
    }                                                                     \
  } while (0)

static bool close(double a, double b, double tol) {
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= tol * (1.0 + std::fabs(b));
}

using namespace spk;

static void test_index() {
  CHECK(offset4(1, 2, 3, 4, 1000, 100, 10, 1) == 1234);
  CHECK(offset4(2, 0, 1, 5, 7, 3, 11, 2) == 2 * 7 + 11 + 10);
  // GQA: 8 query heads on 2 kv heads -> groups of 4
  for (int h = 0; h < 8; ++h) CHECK(kv_head_of(h, 8, 2) == h / 4);
  for (int h = 0; h < 5; ++h) CHECK(kv_head_of(h, 5, 1) == 0);  // MQA
  for (int h = 0; h < 6; ++h) CHECK(kv_head_of(h, 6, 6) == h);  // MHA
  CHECK(num_tiles(0, 32) == 0 && num_tiles(1, 32) == 1 && num_tiles(32, 32) == 1 && num_tiles(33, 32) == 2);
  CHECK(mlp_column(0, 0, 0, 0, 3, 5) == 0);
  CHECK(mlp_column(1, 1, 2, 4, 3, 5) == ((1 * 2 + 1) * 3 + 2) * 5 + 4);
}

// Brute-force check of every predicate against the contract's definition.
static void test_masks() {
  for (int L = 1; L <= 7; ++L)
    for (int S = L; S <= L + 5; ++S)
      for (int causal = 0; causal < 2; ++causal) {
        for (int i = -1; i <= L; ++i)
          for (int j = -1; j <= S; ++j)
            for (int pad = 0; pad < 2; ++pad) {
              const bool in = i >= 0 && i < L && j >= 0 && j < S;
              const bool want = in && (!causal || j <= i + S - L) && pad;
              CHECK(seq_visible(i, j, L, S, causal, pad) == want);
            }
        for (int j = 0; j < S; ++j) {  // first row that sees j
          int first = L;
          for (int i = 0; i < L; ++i)
            if (seq_visible(i, j, L, S, causal, true)) { first = i; break; }
          CHECK(causal_first_row(j, L, S, causal) == first);
        }
        for (int bm = 1; bm <= 4; ++bm)
          for (int m0 = 0; m0 < L; m0 += bm) {  // column end of a query tile
            int end = 0;
            for (int i = m0; i < m0 + bm && i < L; ++i)
              for (int j = 0; j < S; ++j)
                if (seq_visible(i, j, L, S, causal, true) && j + 1 > end) end = j + 1;
            CHECK(seq_col_end(m0, bm, L, S, causal) == end);
          }
      }
  for (int P = 0; P < 4; ++P)
    for (int c = -1; c <= P; ++c) CHECK(prefix_visible(0, c, 3, P) == (c >= 0 && c < P));
}

// Online softmax over tiles == direct softmax, including -inf (masked) entries and empty rows.
static void test_online_softmax() {
  std::mt19937 rng(0);
  std::normal_distribution<float> nd(0.f, 3.f);
  std::uniform_int_distribution<int> coin(0, 3);
  for (int trial = 0; trial < 300; ++trial) {
    const int n = 1 + trial % 37;
    const int tile = 1 + trial % 5;
    std::vector<float> s(n), v(n);
    for (int j = 0; j < n; ++j) {
      s[j] = (coin(rng) == 0 || trial % 50 == 0) ? -INFINITY : nd(rng);
      v[j] = nd(rng);
    }
    // reference in double
    double m = -INFINITY;
    for (float x : s) m = std::fmax(m, (double)x);
    double l = 0, acc = 0;
    if (m != -INFINITY)
      for (int j = 0; j < n; ++j)
        if (s[j] != -INFINITY) { l += std::exp(s[j] - m); acc += std::exp(s[j] - m) * v[j]; }
    const double ref_lse = l > 0 ? m + std::log(l) : -INFINITY;
    const double ref_out = l > 0 ? acc / l : 0.0;
    // tiled online update exactly as the kernels do it
    SoftmaxRow row = softmax_row_init();
    float o = 0.f;
    for (int j0 = 0; j0 < n; j0 += tile) {
      float tmax = -INFINITY;
      for (int j = j0; j < j0 + tile && j < n; ++j) tmax = std::fmax(tmax, s[j]);
      const float alpha = online_rescale(row, tmax);
      o *= alpha;
      for (int j = j0; j < j0 + tile && j < n; ++j) {
        const float p = masked_exp(s[j], row.m);
        CHECK(!std::isnan(p));
        row.l += p;
        o += p * v[j];
      }
    }
    const float out = o * row_inv_l(row);
    CHECK(!std::isnan(out) && !std::isnan(row_lse(row)));
    CHECK(close(out, ref_out, 1e-4));
    CHECK(close(row_lse(row), ref_lse, 1e-5));
    // backward recomputation: probabilities from lse sum to 1 (or are all 0 for an empty row)
    double psum = 0;
    for (int j = 0; j < n; ++j) psum += prob_from_lse(s[j] == -INFINITY ? -INFINITY : s[j], row_lse(row));
    CHECK(close(psum, l > 0 ? 1.0 : 0.0, 1e-5));
    // split into two halves and merge == whole row
    const int cut = n / 2;
    SoftmaxRow a = softmax_row_init(), b = softmax_row_init();
    for (int j = 0; j < n; ++j) {
      SoftmaxRow& r = j < cut ? a : b;
      const float alpha = online_rescale(r, s[j]);
      (void)alpha;
      r.l += masked_exp(s[j], r.m);
    }
    float wa, wb;
    const SoftmaxRow mrg = merge_rows(a, b, &wa, &wb);
    CHECK(close(row_lse(mrg), ref_lse, 1e-5));
    CHECK(close(lse_merge(row_lse(a), row_lse(b)), ref_lse, 1e-5));
  }
  // empty row: zeros and -inf, never NaN
  SoftmaxRow e = softmax_row_init();
  CHECK(online_rescale(e, -INFINITY) == 0.f);
  CHECK(masked_exp(-INFINITY, e.m) == 0.f);
  CHECK(row_inv_l(e) == 0.f && row_lse(e) == -INFINITY);
  CHECK(prob_from_lse(1.f, -INFINITY) == 0.f);
  CHECK(lse_merge(-INFINITY, -INFINITY) == -INFINITY);
  CHECK(close(lse_merge(-INFINITY, 2.f), 2.0, 1e-7));
}

static void test_mlp() {
  for (double x = -4.0; x <= 4.0; x += 0.37) {
    CHECK(close(act_fwd((float)x, kActTanh), std::tanh(x), 1e-6));
    CHECK(close(act_fwd((float)x, kActRelu), x > 0 ? x : 0, 1e-7));
    CHECK(close(act_fwd((float)x, kActGelu), 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))), 1e-6));
    CHECK(close(act_fwd((float)x, kActIdentity), x, 1e-7));
    for (int a = 0; a < 4; ++a) {  // derivative == central difference in double
      const double h = 1e-3;
      auto f = [&](double t) {
        switch (a) {
          case kActTanh: return std::tanh(t);
          case kActRelu: return t > 0 ? t : 0.0;
          case kActGelu: return 0.5 * t * (1 + std::erf(t / std::sqrt(2.0)));
          default: return t;
        }
      };
      const double fd = (f(x + h) - f(x - h)) / (2 * h);
      CHECK(close(act_grad((float)x, a), fd, 1e-4));
    }
  }
  // layout offset is the inverse of PEFT's view(P, NL, 2, Hkv, D).permute(1, 2, 3, 0, 4)
  const int NL = 3, Hkv = 2, P = 5, D = 4;
  std::vector<int> seen(NL * 2 * Hkv * P * D, 0);
  for (int l = 0; l < NL; ++l)
    for (int kv = 0; kv < 2; ++kv)
      for (int h = 0; h < Hkv; ++h)
        for (int p = 0; p < P; ++p)
          for (int d = 0; d < D; ++d) {
            const int64_t c = mlp_column(l, kv, h, d, Hkv, D);
            const int64_t want = ((((int64_t)l * 2 + kv) * Hkv + h) * P + p) * D + d;
            CHECK(mlp_layout_offset(c, p, P, D) == want);
            seen[want] += 1;
          }
  for (int x : seen) CHECK(x == 1);
}

// Dropout keep decisions: deterministic, the kept fraction is 1 - p, neighbours decorrelated.
static void test_dropout() {
  for (float p : {0.1f, 0.5f, 0.9f}) {
    int kept = 0, same_as_next = 0, n = 0;
    for (int b = 0; b < 3; ++b)
      for (int h = 0; h < 4; ++h)
        for (int i = 0; i < 50; ++i)
          for (int c = 0; c < 100; ++c, ++n) {
            const bool k = dropout_keep(12345u, b, h, i, c, p);
            CHECK(k == dropout_keep(12345u, b, h, i, c, p));
            kept += k;
            same_as_next += (k == dropout_keep(12345u, b, h, i, c + 1, p));
          }
    const double frac = (double)kept / n;
    CHECK(std::fabs(frac - (1.0 - p)) < 0.02);
    const double agree = (double)same_as_next / n;  // independent: p^2 + (1-p)^2
    CHECK(std::fabs(agree - (p * p + (1 - p) * (1 - p))) < 0.02);
  }
  int diff = 0;  // another seed gives another mask
  for (int c = 0; c < 1000; ++c) diff += dropout_keep(1u, 0, 0, 0, c, 0.5f) != dropout_keep(2u, 0, 0, 0, c, 0.5f);
  CHECK(diff > 400 && diff < 600);
  for (int c = 0; c < 100; ++c) CHECK(dropout_keep(7u, 1, 2, 3, c, 0.0f));  // p = 0 keeps everything
  CHECK(mix32(0u) == 0u && mix32(1u) != 1u);
}

int main() {
  test_index();
  test_masks();
  test_online_softmax();
  test_mlp();
  test_dropout();
  if (failures) {
    std::printf("%d FAILURES\n", failures);
    return 1;
  }
  std::printf("ALL PASSED\n");
  return 0;
}
