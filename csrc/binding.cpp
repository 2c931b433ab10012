// torch.library registration of the CUDA kernels (namespace softprompt_kernels_cuda).
// Builds the PrefixAttnParams struct from tensors (every stride is passed, nothing is copied
// except where noted) and calls the launchers of the .cu files.
//
//   attn_fwd(q, k, v, prefix_k?, prefix_v?, prefix_index?, key_padding_mask?, causal, scale, dropout_p, seed)
//       -> (out [B,Hq,L,D], lse [B,Hq,L] float32); tensor-core kernel where choose_fwd_path allows it
//   last_fwd_path() -> int   FwdPath (launchers.h) of the last attn_fwd on this thread
//   last_bwd_path() -> int   FwdPath of the last attn_bwd on this thread
//   attn_bwd(dout, q, k, v, prefix_k?, prefix_v?, prefix_index?, key_padding_mask?, out, lse,
//            causal, scale, dropout_p, seed, deterministic) -> (dq, dk, dv, dprefix_k, dprefix_v)
//       dropout: keep decision spk::dropout_keep(seed, b, h, i, c) (prefix_attention_common.cuh).
//       dprefix_* are empty tensors (numel 0) when there is no prefix.
//   mlp_fwd(x [P,E], w1 [H1,E], b1?, w2 [N,H1], b2?, num_layers, num_kv_heads, head_dim, act)
//       -> (out [NL,2,Hkv,P,D], pre [P,H1])   act: 0 identity, 1 tanh, 2 relu, 3 gelu
//   mlp_bwd(dout, x, w1, b1?, w2, pre, has_b2, num_layers, num_kv_heads, head_dim, act)
//       -> (dx, dw1, db1, dw2, db2)   db1/db2 empty when the bias is None.
#include <ATen/ATen.h>
#include <torch/library.h>
#if !defined(SPK_EMULATION)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>

#include "launchers.h"

// The host emulation build (csrc/tests/cuda_emulation.h, -DSPK_EMULATION) registers the same
// ops for CPU tensors under softprompt_kernels_cuda_emu and runs the kernels on the host.
#if defined(SPK_EMULATION)
#define SPK_NS softprompt_kernels_cuda_emu
#define SPK_DISPATCH_KEY CPU
#define SPK_DEVICE_GUARD(dev) (void)(dev)
#else
#define SPK_NS softprompt_kernels_cuda
#define SPK_DISPATCH_KEY CUDA
#define SPK_DEVICE_GUARD(dev) c10::cuda::CUDAGuard guard_(dev)
#endif
#define SPK_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define SPK_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

namespace spk {
namespace {

#if defined(SPK_EMULATION)
bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
cudaStream_t current_stream() { return nullptr; }
#else
bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

// Output allocation; the emulation build poisons it with NaN so an unwritten element shows.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
#if defined(SPK_EMULATION)
  t.fill_(std::numeric_limits<double>::quiet_NaN());
#endif
  return t;
}

using at::Tensor;

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "softprompt_kernels_cuda: unsupported dtype ", t.scalar_type(),
                         " (expected float32, float16 or bfloat16)");
  }
  return DType::kFloat32;
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "softprompt_kernels_cuda: ", what, " failed: ", cudaGetErrorString(err));
}

void check_4d(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D, got shape ", t.sizes());
  TORCH_CHECK(on_kernel_device(t) && t.device() == q.device(), name, " must be on ", q.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have dtype ", q.scalar_type());
}

struct PrefixArgs {
  bool has = false;
  Tensor pk, pv, index;
};

// Fills sizes, input pointers and strides shared by forward and backward.
PrefixAttnParams make_params(const Tensor& q, const Tensor& k, const Tensor& v,
                             const std::optional<Tensor>& prefix_k, const std::optional<Tensor>& prefix_v,
                             const std::optional<Tensor>& prefix_index,
                             const std::optional<Tensor>& key_padding_mask, bool causal, double scale,
                             double dropout_p, int64_t seed, PrefixArgs& pre) {
  check_4d(q, "q", q);
  check_4d(k, "k", q);
  check_4d(v, "v", q);
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && v.sizes() == k.sizes(),
              "k and v must be [B, Hkv, S, D] = ", k.sizes(), " matching q ", q.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "Hq (", Hq, ") must be a multiple of Hkv (", Hkv, ")");
  TORCH_CHECK(S >= L, "S (", S, ") must be >= L (", L, ")");
  TORCH_CHECK(D >= 1 && D <= 256, "head dim must be in [1, 256], got ", D);

  PrefixAttnParams p;
  p.B = (int)B; p.Hq = (int)Hq; p.Hkv = (int)Hkv; p.L = (int)L; p.S = (int)S; p.D = (int)D;
  p.scale = (float)scale;
  p.causal = causal;
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  p.dropout_p = (float)dropout_p;
  p.keep_scale = (float)(1.0 / (1.0 - dropout_p));
  p.seed = (uint64_t)seed;
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_sl = q.stride(2); p.q_sd = q.stride(3);
  p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_ss = k.stride(2); p.k_sd = k.stride(3);
  p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_ss = v.stride(2); p.v_sd = v.stride(3);

  pre.has = prefix_k.has_value() && prefix_k->defined();
  TORCH_CHECK(pre.has == (prefix_v.has_value() && prefix_v->defined()) &&
                  pre.has == (prefix_index.has_value() && prefix_index->defined()),
              "prefix_k, prefix_v and prefix_index must be given together");
  if (pre.has) {
    pre.pk = *prefix_k; pre.pv = *prefix_v; pre.index = *prefix_index;
    check_4d(pre.pk, "prefix_k", q);
    check_4d(pre.pv, "prefix_v", q);
    TORCH_CHECK(pre.pk.size(1) == Hkv && pre.pk.size(3) == D && pre.pv.sizes() == pre.pk.sizes(),
                "prefix_k/prefix_v must be [T, Hkv, P, D], got ", pre.pk.sizes(), " and ", pre.pv.sizes());
    TORCH_CHECK(pre.index.scalar_type() == at::kLong && pre.index.dim() == 1 && pre.index.size(0) == B &&
                    pre.index.device() == q.device(),
                "prefix_index must be int64 [B] on ", q.device());
    pre.index = pre.index.contiguous();
    p.T = (int)pre.pk.size(0);
    p.P = (int)pre.pk.size(2);
    p.pk = pre.pk.data_ptr(); p.pv = pre.pv.data_ptr();
    p.prefix_index = pre.index.data_ptr<int64_t>();
    p.pk_st = pre.pk.stride(0); p.pk_sh = pre.pk.stride(1); p.pk_sp = pre.pk.stride(2); p.pk_sd = pre.pk.stride(3);
    p.pv_st = pre.pv.stride(0); p.pv_sh = pre.pv.stride(1); p.pv_sp = pre.pv.stride(2); p.pv_sd = pre.pv.stride(3);
  }
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B && m.size(1) == S &&
                    m.device() == q.device(),
                "key_padding_mask must be bool [B, S] = [", B, ", ", S, "] on ", q.device());
    p.kpm = m.data_ptr<bool>();
    p.kpm_sb = m.stride(0); p.kpm_ss = m.stride(1);
  }
  return p;
}

// Path of the last forward / backward on this thread (FwdPath code), for softprompt_kernels.cuda.last_path().
thread_local int g_last_fwd_path = 0, g_last_bwd_path = 0;
int64_t last_fwd_path() { return g_last_fwd_path; }
int64_t last_bwd_path() { return g_last_bwd_path; }

// SOFTPROMPT_KERNELS_CUDA_FWD=simt (SOFTPROMPT_KERNELS_CUDA_BWD=simt) forces the SIMT forward
// (backward), for A/B comparisons; anything else: auto.
bool tensor_cores_allowed(const char* var) {
  const char* env = std::getenv(var);
  return env == nullptr || std::strcmp(env, "simt") != 0;
}

std::tuple<Tensor, Tensor> attn_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const std::optional<Tensor>& prefix_k, const std::optional<Tensor>& prefix_v,
                                    const std::optional<Tensor>& prefix_index,
                                    const std::optional<Tensor>& key_padding_mask, bool causal, double scale,
                                    double dropout_p, int64_t seed) {
  SPK_DEVICE_GUARD(q.device());
  PrefixArgs pre;
  PrefixAttnParams p = make_params(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, causal, scale,
                                   dropout_p, seed, pre);
  Tensor out = new_output({p.B, p.Hq, p.L, p.D}, q.options());
  Tensor lse = new_output({p.B, p.Hq, p.L}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr(); p.lse = lse.data_ptr<float>();
  p.o_sb = out.stride(0); p.o_sh = out.stride(1); p.o_sl = out.stride(2); p.o_sd = out.stride(3);
  p.lse_sb = lse.stride(0); p.lse_sh = lse.stride(1); p.lse_sl = lse.stride(2);
  if (out.numel() > 0) {
    FwdPath path = FwdPath::kNone;
    check_cuda(launch_prefix_attn_fwd(p, dtype_of(q), current_stream(), tensor_cores_allowed("SOFTPROMPT_KERNELS_CUDA_FWD"),
                                      &path), "attn_fwd");
    g_last_fwd_path = (int)path;
  }
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attn_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& prefix_k,
    const std::optional<Tensor>& prefix_v, const std::optional<Tensor>& prefix_index,
    const std::optional<Tensor>& key_padding_mask, const Tensor& out, const Tensor& lse, bool causal, double scale,
    double dropout_p, int64_t seed, bool deterministic) {
  SPK_DEVICE_GUARD(q.device());
  PrefixArgs pre;
  PrefixAttnParams p = make_params(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, causal, scale,
                                   dropout_p, seed, pre);
  check_4d(dout, "dout", q);
  check_4d(out, "out", q);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "dout and out must have q's shape ", q.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.Hq &&
                  lse.size(2) == p.L,
              "lse must be float32 [B, Hq, L]");
  p.deterministic = deterministic;
  p.dout = dout.data_ptr(); p.out = const_cast<void*>(out.data_ptr()); p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.do_sb = dout.stride(0); p.do_sh = dout.stride(1); p.do_sl = dout.stride(2); p.do_sd = dout.stride(3);
  p.o_sb = out.stride(0); p.o_sh = out.stride(1); p.o_sl = out.stride(2); p.o_sd = out.stride(3);
  Tensor lse_c = lse.contiguous();  // delta shares lse's (contiguous) strides
  p.lse = lse_c.data_ptr<float>();
  p.lse_sb = lse_c.stride(0); p.lse_sh = lse_c.stride(1); p.lse_sl = lse_c.stride(2);
  Tensor delta = new_output(lse_c.sizes(), lse_c.options());
  p.delta = delta.data_ptr<float>();
  Tensor row_scale;
  if (q.scalar_type() == at::kFloat) {  // exact row statistics for float32 (see PrefixAttnParams)
    row_scale = new_output(lse_c.sizes(), lse_c.options());
    p.row_scale = row_scale.data_ptr<float>();
  }

  Tensor dq = new_output(q.sizes(), q.options());
  Tensor dk = new_output(k.sizes(), k.options());
  Tensor dv = new_output(v.sizes(), v.options());
  p.dq = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  p.dq_sb = dq.stride(0); p.dq_sh = dq.stride(1); p.dq_sl = dq.stride(2); p.dq_sd = dq.stride(3);
  p.dk_sb = dk.stride(0); p.dk_sh = dk.stride(1); p.dk_ss = dk.stride(2); p.dk_sd = dk.stride(3);
  p.dv_sb = dv.stride(0); p.dv_sh = dv.stride(1); p.dv_ss = dv.stride(2); p.dv_sd = dv.stride(3);

  Tensor dpk_buf, dpv_buf, dpk, dpv;
  const bool with_prefix = pre.has && p.P > 0;
  if (with_prefix) {
    auto fopt = q.options().dtype(at::kFloat);
    const int64_t slots = deterministic ? p.B : p.T;
    dpk_buf = deterministic ? new_output({slots, p.Hkv, p.P, p.D}, fopt) : at::zeros({slots, p.Hkv, p.P, p.D}, fopt);
    dpv_buf = deterministic ? new_output({slots, p.Hkv, p.P, p.D}, fopt) : at::zeros({slots, p.Hkv, p.P, p.D}, fopt);
    p.dpk = dpk_buf.data_ptr<float>(); p.dpv = dpv_buf.data_ptr<float>();
    p.dp_sr = dpk_buf.stride(0); p.dp_sh = dpk_buf.stride(1); p.dp_sp = dpk_buf.stride(2); p.dp_sd = dpk_buf.stride(3);
  } else {
    p.P = 0;  // a [T, Hkv, 0, D] prefix is no prefix
  }
  auto stream = current_stream();
  if (q.numel() > 0) {
    FwdPath path = FwdPath::kNone;
    check_cuda(launch_prefix_attn_bwd(p, dtype_of(q), stream, tensor_cores_allowed("SOFTPROMPT_KERNELS_CUDA_BWD"), &path),
               "attn_bwd");
    g_last_bwd_path = (int)path;
  } else { dk.zero_(); dv.zero_(); if (with_prefix) { dpk_buf.zero_(); dpv_buf.zero_(); } }

  if (pre.has) {
    if (!with_prefix) {
      dpk = at::zeros(pre.pk.sizes(), pre.pk.options());
      dpv = at::zeros(pre.pv.sizes(), pre.pv.options());
    } else if (deterministic) {
      dpk = new_output({p.T, p.Hkv, p.P, p.D}, q.options());
      dpv = new_output({p.T, p.Hkv, p.P, p.D}, q.options());
      const int64_t row = (int64_t)p.Hkv * p.P * p.D;
      check_cuda(launch_prefix_grad_reduce(p.dpk, p.prefix_index, dpk.data_ptr(), p.B, p.T, row, dtype_of(q), stream),
                 "prefix_grad_reduce");
      check_cuda(launch_prefix_grad_reduce(p.dpv, p.prefix_index, dpv.data_ptr(), p.B, p.T, row, dtype_of(q), stream),
                 "prefix_grad_reduce");
    } else {
      dpk = dpk_buf.to(q.scalar_type());
      dpv = dpv_buf.to(q.scalar_type());
    }
  } else {
    dpk = at::empty({0}, q.options());
    dpv = at::empty({0}, q.options());
  }
  return {dq, dk, dv, dpk, dpv};
}

// ------------------------------------------------------------------ prefix MLP
void check_mlp(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1, const Tensor& w2,
               const std::optional<Tensor>& b2, int64_t NL, int64_t Hkv, int64_t D, int64_t act) {
  TORCH_CHECK(on_kernel_device(x) && x.dim() == 2, "x must be a [P, E] tensor on the kernels' device");
  dtype_of(x);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == x.size(1) && w1.scalar_type() == x.scalar_type(),
              "w1 must be [H1, E] with x's dtype");
  TORCH_CHECK(w2.dim() == 2 && w2.size(1) == w1.size(0) && w2.size(0) == NL * 2 * Hkv * D &&
                  w2.scalar_type() == x.scalar_type(),
              "w2 must be [num_layers*2*Hkv*D, H1] with x's dtype");
  if (b1.has_value() && b1->defined())
    TORCH_CHECK(b1->dim() == 1 && b1->size(0) == w1.size(0) && b1->scalar_type() == x.scalar_type(), "b1 must be [H1]");
  if (b2.has_value() && b2->defined())
    TORCH_CHECK(b2->dim() == 1 && b2->size(0) == w2.size(0) && b2->scalar_type() == x.scalar_type(), "b2 must be [N]");
  TORCH_CHECK(act >= 0 && act <= 3, "act must be 0 (identity), 1 (tanh), 2 (relu) or 3 (gelu)");
}

const void* opt_ptr(const std::optional<Tensor>& t, Tensor& keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  keep = t->contiguous();
  return keep.data_ptr();
}

std::tuple<Tensor, Tensor> mlp_fwd(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1,
                                   const Tensor& w2, const std::optional<Tensor>& b2, int64_t num_layers,
                                   int64_t num_kv_heads, int64_t head_dim, int64_t act) {
  check_mlp(x, w1, b1, w2, b2, num_layers, num_kv_heads, head_dim, act);
  SPK_DEVICE_GUARD(x.device());
  auto stream = current_stream();
  const DType dt = dtype_of(x);
  const int64_t P = x.size(0), H1 = w1.size(0);
  Tensor b1c, b2c;
  // GEMM 1 in cuBLAS with a float32 result, so that the bias epilogue rounds the pre-activation
  // once (as nn.Linear does); a second rounding would flip relu's derivative near 0.
  Tensor h_lin = at::matmul(x.to(at::kFloat), w1.to(at::kFloat).t()).contiguous();
  Tensor pre = new_output({P, H1}, x.options());
  Tensor h = new_output({P, H1}, x.options());
  check_cuda(launch_mlp_bias_act(h_lin.data_ptr(), true, opt_ptr(b1, b1c), pre.data_ptr(), h.data_ptr(), (int)P,
                                 (int)H1, (int)act, dt, stream),
             "mlp_bias_act");
  Tensor y = at::matmul(h, w2.t()).contiguous();  // cuBLAS, [P, N]
  Tensor out = new_output({num_layers, 2, num_kv_heads, P, head_dim}, x.options());
  check_cuda(launch_mlp_layout_store(y.data_ptr(), opt_ptr(b2, b2c), out.data_ptr(), (int)P, (int)num_layers,
                                     (int)num_kv_heads, (int)head_dim, dt, stream),
             "mlp_layout_store");
  return {out, pre};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mlp_bwd(const Tensor& dout, const Tensor& x, const Tensor& w1,
                                                           const std::optional<Tensor>& b1, const Tensor& w2,
                                                           const Tensor& pre, bool has_b2, int64_t num_layers,
                                                           int64_t num_kv_heads, int64_t head_dim, int64_t act) {
  check_mlp(x, w1, b1, w2, std::nullopt, num_layers, num_kv_heads, head_dim, act);
  SPK_DEVICE_GUARD(x.device());
  auto stream = current_stream();
  const DType dt = dtype_of(x);
  const int64_t P = x.size(0), H1 = w1.size(0), N = w2.size(0);
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({num_layers, 2, num_kv_heads, P, head_dim}) &&
                  dout.scalar_type() == x.scalar_type(),
              "dout must be [num_layers, 2, Hkv, P, D] with x's dtype");
  TORCH_CHECK(pre.sizes() == at::IntArrayRef({P, H1}) && pre.scalar_type() == x.scalar_type(), "pre must be [P, H1]");
  const bool has_b1 = b1.has_value() && b1->defined();
  Tensor g = dout.contiguous();
  Tensor pre_c = pre.contiguous();
  Tensor dy = new_output({P, N}, x.options());
  Tensor db2 = has_b2 ? new_output({N}, x.options()) : at::empty({0}, x.options());
  check_cuda(launch_mlp_layout_gather(g.data_ptr(), dy.data_ptr(), has_b2 ? db2.data_ptr() : nullptr, (int)P,
                                      (int)num_layers, (int)num_kv_heads, (int)head_dim, dt, stream),
             "mlp_layout_gather");
  Tensor h = new_output({P, H1}, x.options());  // recomputed from the saved pre-activation
  check_cuda(launch_mlp_bias_act(pre_c.data_ptr(), false, nullptr, nullptr, h.data_ptr(), (int)P, (int)H1, (int)act, dt,
                                 stream),
             "mlp_bias_act");
  Tensor dw2 = at::matmul(dy.t(), h);
  Tensor dh = at::matmul(dy, w2).contiguous();
  Tensor dpre = new_output({P, H1}, x.options());
  Tensor db1 = has_b1 ? new_output({H1}, x.options()) : at::empty({0}, x.options());
  check_cuda(launch_mlp_act_bwd(dh.data_ptr(), pre_c.data_ptr(), dpre.data_ptr(), has_b1 ? db1.data_ptr() : nullptr,
                                (int)P, (int)H1, (int)act, dt, stream),
             "mlp_act_bwd");
  Tensor dw1 = at::matmul(dpre.t(), x);
  Tensor dx = at::matmul(dpre, w1);
  return {dx, dw1, db1, dw2, db2};
}

}  // namespace
}  // namespace spk

SPK_TORCH_LIBRARY(SPK_NS, m) {
  m.def("attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, Tensor? prefix_index, "
        "Tensor? key_padding_mask, bool causal, float scale, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, "
        "Tensor? prefix_index, Tensor? key_padding_mask, Tensor out, Tensor lse, bool causal, float scale, "
        "float dropout_p, int seed, bool deterministic) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("last_fwd_path() -> int");
  m.def("last_bwd_path() -> int");
  m.def("mlp_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, int num_layers, int num_kv_heads, "
        "int head_dim, int act) -> (Tensor, Tensor)");
  m.def("mlp_bwd(Tensor dout, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor pre, bool has_b2, int num_layers, "
        "int num_kv_heads, int head_dim, int act) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

SPK_TORCH_LIBRARY_IMPL(SPK_NS, CompositeExplicitAutograd, m) {
  m.impl("last_fwd_path", &spk::last_fwd_path);
  m.impl("last_bwd_path", &spk::last_bwd_path);
}

SPK_TORCH_LIBRARY_IMPL(SPK_NS, SPK_DISPATCH_KEY, m) {
  m.impl("attn_fwd", &spk::attn_fwd);
  m.impl("attn_bwd", &spk::attn_bwd);
  m.impl("mlp_fwd", &spk::mlp_fwd);
  m.impl("mlp_bwd", &spk::mlp_bwd);
}
