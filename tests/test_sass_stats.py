"""softprompt_kernels.triton.sass_stats: main-loop finder on handwritten SASS, and the static targets
of the shipped sm_90 16-bit forward configurations (issue 12 item 4; compiled in a subprocess)."""
import os

import pytest

from softprompt_kernels.triton import aot, sass_stats

# Function k: prologue HGMMA; loop A [0x20, 0x70] with two wgmmas and a NOP; a barrier spin loop
# without MMA [0x90, 0xa0]; an outer loop [0xb0, 0x110] around an inner HMMA loop [0xc0, 0xe0];
# EXIT; an out-of-line retry block that jumps back into loop A (range holds EXIT); the final self-branch.
SASS = """
	code for sm_90a
	.target	sm_90a

		Function : k
	.headerflags	@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                        /* 0x00000a00ff017b82 */
                                                                                   /* 0x000fe20000000800 */
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], RZ, !UPT ; /* 0x00e000000c1879f0 */
        /*0020*/                   FFMA R2, R3, R4, -R5 ;                          /* 0x0000000403027223 */
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], R24 ; /* 0x00e000000c1879f0 */
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R56, R88, gdesc[UR8].tnspB, R56, gsb0 ; /* 0x40e0 */
        /*0050*/                   MUFU.EX2 R6, R7 ;                               /* 0x0000000700067308 */
        /*0060*/                   NOP ;                                           /* 0x0000000000007918 */
        /*0070*/              @!P2 BRA 0x20 ;                                      /* 0xffffff7800b0a947 */
        /*0080*/                   FADD R8, R8, R9 ;                               /* 0x0000000908087221 */
        /*0090*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4+0x10], R3 ; /* 0x000000 */
        /*00a0*/               @!P0 BRA 0x90 ;                                     /* 0xfffffffc00fc7947 */
        /*00b0*/                   IADD3 R10, R10, 0x1, RZ ;                       /* 0x00000001 */
        /*00c0*/                   HMMA.16816.F32.BF16 R12, R20, R22, R12 ;        /* 0x000000 */
        /*00d0*/                   HMMA.16816.F32.BF16 R14, R20, R23, R14 ;        /* 0x000000 */
        /*00e0*/               @P1 BRA 0xc0 ;                                      /* 0xfffffffc */
        /*00f0*/                   ISETP.GE.AND P3, PT, R10, R11, PT ;             /* 0x000000 */
        /*0100*/                   FMUL R12, R12, R13 ;                            /* 0x000000 */
        /*0110*/              @!P3 BRA 0xb0 ;                                      /* 0xfffffff */
        /*0120*/                   EXIT ;                                          /* 0x000000000000794d */
        /*0130*/                   SYNCS.PHASECHK.TRANS64 P0, [UR4+0x10], R3 ;     /* 0x000000 */
        /*0140*/                   BRA 0x40 ;                                      /* 0x000000 */
        /*0150*/                   BRA 0x150;                                      /* 0xfffffffc00fc7947 */

		Function : other
        /*0000*/                   HMMA.1688.F32 R4, R8, R10, R4 ;                 /* 0x000000 */
        /*0010*/                   BRA 0x0 ;                                       /* 0x000000 */
"""

# The same loop A written with labels (older cuobjdump releases print branch targets this way).
SASS_LABELS = """
		Function : lab
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   DMMA.884 R4, R8, R10, R4 ;
        /*0020*/                   DMMA.8x8x4 R4, R8, R10, R4 ;
        /*0030*/              @P0 BRA `(.L_x_1) ;
        /*0040*/                   EXIT ;
"""


def test_loops_of_handwritten_sass():
    loops = sass_stats.loop_stats(SASS, "k", num_warps=8, scores_per_iter=128 * 64)
    assert [(lp["start"], lp["end"]) for lp in loops] == [(0x20, 0x70), (0xc0, 0xe0)]
    a, inner = loops
    # FFMA, HGMMA, HGMMA, MUFU, BRA (the NOP is not counted)
    assert a["instructions"] == 5
    assert a["mma"] == {"m64n128k16": 1, "m64n64k16": 1}
    assert a["mma_flops"] == 2 * (2 * 64 * 128 * 16 + 2 * 64 * 64 * 16)   # 2 warpgroups of 8 warps
    assert a["instr_per_score"] == pytest.approx(5 * 8 * 32 / (128 * 64))
    assert a["ops"] == {"HGMMA": 2, "FFMA": 1, "MUFU": 1, "BRA": 1}
    assert sass_stats.wgmma_n(a) == [128, 64]
    assert inner["instructions"] == 3 and inner["mma"] == {"m16n8k16": 2}
    assert inner["mma_flops"] == 2 * 2 * 16 * 8 * 16 * 8                  # per warp, 8 warps


def test_scores_from_mma_work():
    """Without a tile, scores per iteration = MMA FLOPs / FLOPs per score (4 * D in a forward)."""
    (a, _inner) = sass_stats.loop_stats(SASS, "k", num_warps=8, flops_per_score=4 * 16)
    assert a["scores_per_iter"] == a["mma_flops"] / 64
    assert a["instr_per_score"] == pytest.approx(5 * 8 * 32 / a["scores_per_iter"])
    (none, _) = sass_stats.loop_stats(SASS, "k", num_warps=8)
    assert none["scores_per_iter"] is None and none["instr_per_score"] is None


def test_function_selection_and_labels():
    with pytest.raises(ValueError, match="name one"):
        sass_stats.loop_stats(SASS, num_warps=4)
    with pytest.raises(KeyError, match="nope"):
        sass_stats.loop_stats(SASS, "nope", num_warps=4)
    (o,) = sass_stats.loop_stats(SASS, "other", num_warps=4, scores_per_iter=16 * 8)
    assert o["mma"] == {"m16n8k8": 1} and o["instructions"] == 2
    (lab,) = sass_stats.loop_stats(SASS_LABELS, num_warps=4, scores_per_iter=64)
    assert (lab["start"], lab["end"]) == (0x10, 0x30)
    assert lab["mma"] == {"m8n8k4": 2} and lab["mma_flops"] == 2 * (2 * 8 * 8 * 4 * 4)


# ---------------------------------------------------------------- the shipped forward (compiles)
FWD_TARGET = 12.0   # thread-instructions per score element, unmasked loops, sm_90, D = 64 and 128


def test_shipped_sm90_forward_meets_the_static_targets(tmp_path):
    """16-bit sm_90 forward specs at D = 64 / 128, zero spills, wgmma in every loop; on the main
    tiles (variants "plain" and "causal") every wgmma has N >= 64; the "plain" variant (a prefix,
    nothing optional) has exactly two loops without any select (the unmasked prefix and full-sequence
    loops) and they take <= 12 thread-instructions per score element."""
    results, proc = aot.run_subprocess(
        ["softprompt_kernels.triton.prefix_attention"], (90,), name_filter=r"^prefix_attn_fwd\[d=(64|128),(bf16|fp16),sm90,",
        cache_dir=str(tmp_path / "cache") if os.environ.get("SPK_AOT_COLD") == "1" else None, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(results) == 2 * 2 * 3, [r["name"] for r in results]
    for r in results:
        assert r["error"] is None and not r["spills"] and r["wgmma"], r["name"]
        loops = r["extra"]["loops"]
        assert loops, r["name"]
        for lp in loops:
            assert lp["mma"] and all(k.startswith("m64n") for k in lp["mma"]), (r["name"], lp["mma"])
            if not r["name"].endswith(",full]"):
                assert min(sass_stats.wgmma_n(lp)) >= 64, (r["name"], lp["mma"])
        if r["name"].endswith(",plain]"):
            assert len(loops) == 4, (r["name"], len(loops))
            unmasked = [lp for lp in loops if "FSEL" not in lp["ops"]]
            assert len(unmasked) == 2, (r["name"], [lp["ops"].get("FSEL") for lp in loops])
            for lp in unmasked:
                assert lp["instr_per_score"] <= FWD_TARGET, (r["name"], lp["instr_per_score"])
