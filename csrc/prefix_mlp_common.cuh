// Host/device helpers of the fused prefix MLP: activations, their derivatives, and the
// [num_layers, 2, Hkv, P, D] layout arithmetic.  Tested on the host by csrc/tests/host_test.cpp.
#pragma once

#include <cmath>
#include <cstdint>

#include "prefix_attention_common.cuh"  // SPK_HD

namespace spk {

enum ActCode : int { kActIdentity = 0, kActTanh = 1, kActRelu = 2, kActGelu = 3 };

SPK_HD float act_fwd(float x, int act) {
  switch (act) {
    case kActTanh: return tanhf(x);
    case kActRelu: return x > 0.f ? x : 0.f;
    case kActGelu: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    default: return x;
  }
}

// d act(x) / dx
SPK_HD float act_grad(float x, int act) {
  switch (act) {
    case kActTanh: {
      const float t = tanhf(x);
      return 1.f - t * t;
    }
    case kActRelu: return x > 0.f ? 1.f : 0.f;
    case kActGelu: {
      const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
      const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
      return cdf + x * pdf;
    }
    default: return 1.f;
  }
}

// Column of the second Linear's output that lands at out[l, kv, h, :, d] (PEFT's order).
SPK_HD int64_t mlp_column(int l, int kv, int h, int d, int Hkv, int D) {
  return (((int64_t)l * 2 + kv) * Hkv + h) * D + d;
}

// Flat offset of out[l, kv, h, p, d] in the contiguous [NL, 2, Hkv, P, D] output for column c.
SPK_HD int64_t mlp_layout_offset(int64_t c, int p, int P, int D) {
  const int64_t d = c % D;
  const int64_t lkh = c / D;  // ((l*2+kv)*Hkv + h)
  return (lkh * P + p) * D + d;
}

}  // namespace spk
