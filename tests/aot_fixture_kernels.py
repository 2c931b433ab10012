"""Small Triton kernels with known compile facts, for testing the AOT driver (tests/test_triton_aot.py).

Not shipped.  ``aot_specs()``: an fp16 GEMM (uses wgmma on sm_90) and an elementwise kernel
(no tensor cores).  ``spill_specs()``: a kernel that keeps 2 x 64x64 fp32 tiles live in one
warp (256 values per thread + temporaries > 255 registers), so it must spill.
``bad_specs()``: a spec whose signature misses an argument (driver must report an error).
"""
import triton
import triton.language as tl

from softprompt_kernels.triton.kernel_spec import KernelSpec


@triton.jit
def _gemm(A, B, C, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C[M, N] = A[M, K] @ B[K, N]; one BMxBN tile per program."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(A + rm[:, None] * s_am + kk[None, :] * s_ak, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(B + kk[:, None] * s_bk + rn[None, :] * s_bn, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(C + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(C.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _axpy(X, Y, Z, n, alpha, BLOCK: tl.constexpr):
    """Z[n] = alpha * X + Y."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(Z + offs, alpha * tl.load(X + offs, mask=m) + tl.load(Y + offs, mask=m), mask=m)


@triton.jit
def _spill(X, Y, n_iter, BM: tl.constexpr, BN: tl.constexpr):
    """Two BMxBN fp32 tiles live across a loop: far more values than one warp's registers hold."""
    offs = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    a = tl.zeros((BM, BN), dtype=tl.float32)
    b = tl.zeros((BM, BN), dtype=tl.float32)
    for i in range(n_iter):
        x = tl.load(X + i * BM * BN + offs)
        a = a * x + b
        b = b * 1.5 + tl.exp(a)
    tl.store(Y + offs, a + b)


_GEMM_SIG = {"A": "*fp16", "B": "*fp16", "C": "*fp16", "M": "i32", "N": "i32", "K": "i32",
             "s_am": "i32", "s_ak": "i32", "s_bk": "i32", "s_bn": "i32", "s_cm": "i32", "s_cn": "i32"}


def aot_specs():
    return [
        KernelSpec("gemm[fp16,128x128x64]", _gemm, _GEMM_SIG, {"BM": 128, "BN": 128, "BK": 64},
                   num_warps=8, num_stages=3, expect_wgmma=True),
        KernelSpec("axpy[fp32,1024]", _axpy,
                   {"X": "*fp32", "Y": "*fp32", "Z": "*fp32", "n": "i32", "alpha": "fp32"}, {"BLOCK": 1024},
                   num_warps=4, num_stages=1),
    ]


def spill_specs():
    return [KernelSpec("spill[fp32,64x64,1warp]", _spill, {"X": "*fp32", "Y": "*fp32", "n_iter": "i32"},
                       {"BM": 64, "BN": 64}, num_warps=1, num_stages=1)]


def bad_specs():
    sig = dict(_GEMM_SIG)
    del sig["K"]
    return [KernelSpec("gemm[missing K]", _gemm, sig, {"BM": 64, "BN": 64, "BK": 32})]
