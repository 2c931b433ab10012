"""The real CUDA kernels in the race-detection build of the host emulation.

Run by tests/test_cuda_races.py in a subprocess:
``LD_PRELOAD=libtsan.so python tests/cuda_race_runner.py BUILD_DIR [nonatomic]``.

Builds csrc/*.cu and binding.cpp as C++ with ``-fsanitize=thread -DSPK_EMULATION``
(csrc/tests/cuda_emulation.h: every emulated thread a ThreadSanitizer fiber, happens-before
only from barriers and the end of a launch; the compiler runs without the preload), loads it,
and runs the tensor-core and SIMT forwards and the deterministic and atomic backwards on
ragged cases against the float64 reference, with a TSan fiber per thread and per block
(``SPK_EMU_RACES``).  ThreadSanitizer reports any race on stderr and the process exits 66.  ``nonatomic`` builds the mutation whose atomicAdd is a plain
read-modify-write.
"""
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from softprompt_kernels.cuda._testing import Case, check_attention, emulation_sources  # noqa: E402

PATH_TC, PATH_SIMT_FORCED = 1, 7
CASES = [  # (case, dtype, forward path, dropout)
    (Case(2, 4, 2, 70, 131, 67, 64, causal=True, mask=True, form="multi"), torch.bfloat16, "auto", 0.0),
    (Case(2, 2, 1, 40, 100, 9, 40, causal=False, mask=True, form="per_row"), torch.float16, "auto", 0.2),
    (Case(2, 4, 2, 33, 47, 5, 80, causal=True, mask=True, form="shared"), torch.float32, "simt", 0.0),
]


def main(build_dir: str, nonatomic: bool) -> None:
    from torch.utils.cpp_extension import load

    os.environ.pop("LD_PRELOAD", None)  # this process has the TSan runtime; the compiler must not
    torch.set_num_threads(1)
    os.makedirs(build_dir, exist_ok=True)
    flags = ["-O1", "-g", "-fsanitize=thread", "-DSPK_EMULATION"] + (["-DSPK_EMU_NONATOMIC_ATOMICADD"] if nonatomic else [])
    name = "softprompt_kernels_cuda_emu_tsan" + ("_nonatomic" if nonatomic else "")
    load(name=name, sources=emulation_sources(build_dir), extra_cflags=flags, extra_ldflags=["-fsanitize=thread"],
         extra_include_paths=[str(ROOT / "csrc")], is_python_module=False, build_directory=build_dir)
    E = torch.ops.softprompt_kernels_cuda_emu
    # the mutation only needs the atomic prefix reduction with two rows on one task (the last case),
    # and a race between blocks: one TSan fiber per block (cuda_emulation.h, SPK_EMU_RACES)
    runs = [(c, "blocks", False) for c in CASES[-1:]] if nonatomic else [
        (c, races, det) for c in CASES for races in ("threads", "blocks") for det in (True, False)]
    for (case, dtype, path, dropout_p), races, deterministic in runs:
        os.environ["SOFTPROMPT_KERNELS_CUDA_FWD"] = path
        os.environ["SPK_EMU_RACES"] = races
        want = PATH_TC if path == "auto" else PATH_SIMT_FORCED

        def fwd(q, k, v, pk, pv, idx, kpm, causal, scale, dropout_p=0.0, dseed=0):
            res = E.attn_fwd(q, k, v, pk, pv, idx, kpm, causal, scale, dropout_p, dseed)
            assert E.last_fwd_path() == want, (E.last_fwd_path(), want)
            return res

        def bwd(dout, q, k, v, pk, pv, idx, kpm, out, lse, causal, scale, dropout_p, dseed, det):
            g = E.attn_bwd(dout, q, k, v, pk, pv, idx, kpm, out, lse, causal, scale, dropout_p, dseed, det)
            return g if pk is not None else (*g[:3], None, None)

        kw = {}
        if dropout_p:
            from softprompt_kernels.cuda.prefix_attention import dropout_keep_mask
            kw = dict(dropout_p=dropout_p, keep_mask=dropout_keep_mask)
        check_attention(fwd, bwd, case, dtype, "cpu", deterministic=deterministic, seed=3, **kw)
        print(f"ok {case} {dtype} fwd={path} deterministic={deterministic} dropout={dropout_p} races={races}",
              flush=True)

if __name__ == "__main__":
    main(sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "nonatomic")
