"""``softprompt-kernels bench --gpu`` (``./dev gpu``): every GPU test and the GPU benchmark, one command.

Stages (budgets in ``gpu_plan``; the whole run stays under 8 minutes on one H100/H200):

1. tests -- build the CUDA extension (JIT, ninja; skipped with the reason when nvcc / ninja are
   missing), ``pytest -m gpu`` on the test files that carry the marker (compiled Triton kernels
   against the float64 reference: tests/test_bench_gpu.py, tests/test_prefix_mlp.py), then
   ``pytest tests/test_cuda_gpu.py`` (the CUDA backend).  ``TRITON_INTERPRET`` is removed.
2. bench -- for each case of the grid, fwd, bwd and fwd+bwd ``triton.testing.do_bench`` medians of
   ours (Triton, CUDA) and the baselines (SDPA flash / cuDNN / efficient on the concatenated K/V,
   compiled FlexAttention with the prefix as extra keys, PEFT's whole per-layer path); TFLOP/s from
   the analytic FLOP count printed next to each row.  "fwd" is the training forward (inputs
   require grad); "bwd" is ``autograd.grad`` of a retained graph; "fwd+bwd" both.
3. write -- ``<out>/gpu.json`` and ``<out>/gpu.md`` (device, driver, CUDA, versions, date, every
   row) and one verdict line per target.

``--dry-run`` prints the plan and runs nothing (works without a GPU).  Without ``--dry-run`` on a
machine with no CUDA device the command prints the plan and exits 2: no GPU time is ever printed
that was not measured on a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from . import gpu_plan as plan
from .gpu_results import GpuRow, table_lines, verdict_lines, write_json, write_markdown

REPO = Path(__file__).resolve().parents[2]
EXIT_NO_GPU = 2
QUICK_ENV = "SOFTPROMPT_GPU_QUICK"   # set for the stage-1 pytest runs of --quick (fewer dtypes)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softprompt-kernels bench --gpu", description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help=argparse.SUPPRESS)  # how bench dispatches here
    p.add_argument("--quick", action="store_true", help="tiny grid (2 cases) and the bf16 tests only: ~1-2 minutes "
                   "(+ the one-time CUDA build on a fresh machine; <= 150 s budget)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit; runs nothing on a GPU")
    p.add_argument("--out", default="bench_results", help="directory for gpu.json / gpu.md (default %(default)s)")
    p.add_argument("--skip-tests", action="store_true", help="skip stage 1 (the CUDA extension is still built)")
    p.add_argument("--no-cuda", action="store_true", help="do not build / measure the CUDA extension")
    p.add_argument("--impl", action="append", choices=plan.IMPL_NAMES, help="only these implementations (repeatable)")
    p.add_argument("--case", action="append", help="only cases whose name contains this (repeatable)")
    return p


# --------------------------------------------------------------------------- environment
def _cmd_out(cmd: list[str]) -> Optional[str]:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def environment() -> dict:
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "python_executable": sys.executable,
           "platform": platform.platform(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cuda_available": torch.cuda.is_available()}
    for mod in ("triton", "transformers", "peft"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            env[mod] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   device_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
        smi = _cmd_out(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"])
        env["driver"] = smi.splitlines()[0].split(",")[0].strip() if smi else None
        env["nvidia_smi"] = smi
    else:
        env["device_name"] = "no CUDA device"
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    out = _cmd_out([nvcc, "--version"]) if nvcc else None
    m = re.search(r"release ([\d.]+)", out or "")
    env["nvcc"] = m.group(1) if m else None
    env["git_commit"] = _cmd_out(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    env["git_dirty"] = bool(_cmd_out(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]))
    return env


def _clean_env() -> dict:
    """The environment of the subprocesses: no TRITON_INTERPRET, the checkout on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    pp = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))   # ninja parallelism of the JIT build
    return env


# --------------------------------------------------------------------------- stage 1
def gpu_test_files(tests_dir: Path = REPO / "tests") -> list[str]:
    """Test files that carry the ``gpu`` marker (collected with ``-m gpu``); the other files are not
    imported, so a CPU-only test dependency missing on the GPU image cannot break collection."""
    out = []
    for p in sorted(tests_dir.rglob("test_*.py")):
        try:
            text = p.read_text()
        except OSError:
            continue
        if re.search(r"pytest\.mark\.gpu\b", text):
            out.append(str(p.relative_to(REPO)))
    return out


def test_commands(quick: bool, python: str = sys.executable) -> list[tuple[str, list[str]]]:
    """(name, argv) of stage 1 after the build, in order."""
    pytest = [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    cuda_k = ["-k", "bfloat16 or bitwise or public_op"] if quick else []
    return [("pytest -m gpu", pytest + ["-m", "gpu"] + gpu_test_files()),
            ("pytest tests/test_cuda_gpu.py", pytest + ["tests/test_cuda_gpu.py"] + cuda_k)]


def _run(name: str, cmd: list[str], timeout: float, quick: bool = False) -> dict:
    """Run one step in its own process group (a timeout kills nvcc / ninja / pytest children too)."""
    print(f"\n--- {name}: {shlex.join(cmd)} (timeout {timeout:.0f} s)", flush=True)
    t0 = time.monotonic()
    env = _clean_env()
    if quick:
        env[QUICK_ENV] = "1"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=max(timeout, 1))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        text, _ = proc.communicate()
        rc = 124
        text = (text or "") + f"\nTIMEOUT after {timeout:.0f} s"
    dt = time.monotonic() - t0
    tail = (text or "").strip().splitlines()[-40:]
    print("\n".join(tail))
    status = "passed" if rc == 0 else ("timed out" if rc == 124 else f"FAILED (rc {rc})")
    print(f"--- {name}: {status} in {dt:.0f} s", flush=True)
    return {"name": name, "cmd": cmd, "rc": rc, "seconds": dt, "status": status, "tail": tail[-15:]}


def _error_line(tail: list[str]) -> str:
    """The most telling line of a failed build's output."""
    for line in reversed(tail):
        if re.search(r"error|fatal|failed|mismatch", line, re.I):
            return " ".join(line.split())[:200]
    return tail[-1][:200] if tail else ""


def _remove_stale_build_lock(name: str) -> None:
    """A killed JIT build leaves torch's ``lock`` file behind; the next load would wait on it forever."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, False)) / "lock"
        if lock.exists():
            lock.unlink()
            print(f"removed the killed build's lock file {lock}")
    except Exception as e:  # noqa: BLE001 - best effort
        print(f"note: could not check for a stale build lock: {e}")


def build_cuda(timeout: float, no_cuda: bool) -> tuple[Optional[str], dict]:
    """Build + load the CUDA extension; (None, record) when usable, else (reason, record)."""
    if no_cuda:
        return "n/a: --no-cuda", {"name": "build CUDA extension", "status": "skipped", "seconds": 0.0}
    from ..cuda import _build

    problem = _build.toolchain_problem()
    if problem is not None:
        print(f"\n--- build CUDA extension: skipped: {problem}")
        return f"n/a: {problem}", {"name": "build CUDA extension", "status": f"skipped: {problem}", "seconds": 0.0}
    # in a subprocess, so that a hung nvcc cannot outlive the budget; the load below hits the cache
    rec = _run("build CUDA extension (JIT, ninja)",
               [sys.executable, "-c", "from softprompt_kernels.cuda import _build; _build.load(verbose=True)"], timeout)
    if rec["rc"] == 124:
        _remove_stale_build_lock(_build.LIB_NAMESPACE)
    if rec["rc"] != 0:
        return f"n/a: CUDA extension build {rec['status']}: {_error_line(rec['tail'])}", rec
    try:
        _build.load()
    except Exception as e:  # noqa: BLE001
        return f"n/a: CUDA extension load failed: {type(e).__name__}: {str(e)[:200]}", rec
    return None, rec


# --------------------------------------------------------------------------- stage 2
class Inputs:
    """bf16 tensors of one case (fresh random draws), shared by every implementation."""

    def __init__(self, c: plan.GpuCase, seed: int = 0, device: str = "cuda", dtype=None):
        import torch

        g = torch.Generator(device=device).manual_seed(seed)
        dt = dtype or torch.bfloat16
        self.device = device

        def rnd(*shape):
            return torch.randn(*shape, generator=g, device=device, dtype=dt)
        self.q, self.k, self.v = rnd(c.B, c.H, c.L, c.D), rnd(c.B, c.H, c.L, c.D), rnd(c.B, c.H, c.L, c.D)
        self.pk, self.pv = rnd(c.H, c.P, c.D), rnd(c.H, c.P, c.D)
        self.dout = rnd(c.B, c.H, c.L, c.D)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def make_impl(name: str, c: plan.GpuCase, x: Inputs, cuda_problem: Optional[str], compile_flex: bool = True):
    """(forward callable returning the output, leaves) of one implementation; raises when n/a.

    The tests build the PEFT path, the cuDNN-style dense-mask SDPA call and (uncompiled) flex on CPU."""
    import torch
    import torch.nn.functional as F

    if name in plan.OURS:
        backend = name.split("-")[1]
        if backend == "cuda" and cuda_problem:
            raise _NA(cuda_problem)
        from .. import prefix_attention

        leaves = [_leaf(t) for t in (x.q, x.k, x.v, x.pk, x.pv)]

        def fwd():
            return prefix_attention(*leaves, causal=c.causal, backend=backend)
        return fwd, leaves
    if name == "peft":
        leaves = [_leaf(t) for t in (x.q, x.k, x.v, x.pk, x.pv)]
        mask = plan.peft_mask(c.B, c.L, c.P, c.causal, device=x.device)

        def fwd():
            q, k, v, pk, pv = leaves
            kk = torch.cat([pk.unsqueeze(0).expand(c.B, -1, -1, -1), k], dim=2)
            vv = torch.cat([pv.unsqueeze(0).expand(c.B, -1, -1, -1), v], dim=2)
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        return fwd, leaves
    # the rest run on K/V concatenated beforehand (kernel against kernel, same total keys)
    kk = torch.cat([x.pk.unsqueeze(0).expand(c.B, -1, -1, -1), x.k], dim=2)
    vv = torch.cat([x.pv.unsqueeze(0).expand(c.B, -1, -1, -1), x.v], dim=2)
    leaves = [_leaf(x.q), _leaf(kk), _leaf(vv)]
    if name.startswith("sdpa-"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        be = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
              "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
        if not c.causal:
            mask = None
        elif name == "sdpa-cudnn":
            mask = plan.dense_visibility(c.L, c.P, True).to(x.device)[None, None]
        else:
            mask = plan.sdpa_causal_bias(c.L, c.P)

        def fwd():
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(*leaves, attn_mask=mask)
        return fwd, leaves
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block = create_block_mask(plan.flex_mask_mod(c.P, c.causal, c.L), None, None, c.L, c.P + c.L, device=x.device)
        flex = _compiled_flex(flex_attention) if compile_flex else flex_attention

        def fwd():
            return flex(*leaves, block_mask=block)
        return fwd, leaves
    raise ValueError(name)


class _NA(Exception):
    """An implementation that does not apply here (the message is the reason)."""


_FLEX = {}


def _compiled_flex(flex_attention):
    if "fn" not in _FLEX:
        import torch
        import torch._dynamo.config as dcfg
        import torch._functorch.config as fcfg

        # one compile per shape (static shapes): lift dynamo's recompile limit, which would otherwise
        # silently fall back to the unfused eager flex_attention after 8 shapes
        for k in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                  "accumulated_recompile_limit"):
            if hasattr(dcfg, k):
                setattr(dcfg, k, max(getattr(dcfg, k), 1024))
        if hasattr(dcfg, "automatic_dynamic_shapes"):
            dcfg.automatic_dynamic_shapes = False
        if hasattr(fcfg, "donated_buffer"):
            fcfg.donated_buffer = False      # "bwd" re-runs a retained backward graph
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def measure_impl(name: str, c: plan.GpuCase, x: Inputs, ref_out, *, cuda_problem, do_bench: Callable,
                 bench_kw: dict, deadline: float) -> tuple[list[GpuRow], object]:
    """Rows of the three passes of one implementation (n/a rows with the reason on failure)."""
    import torch

    fl = plan.flops(c)
    rows = {p: GpuRow(c.name, c.shape, name, p, fl[p]) for p in plan.PASSES}

    def na(reason: str) -> list[GpuRow]:
        for r in rows.values():
            if r.ms is None:
                r.status = f"n/a: {reason}"
        return list(rows.values())

    if time.monotonic() > deadline:
        return na("not run: the bench stage's time budget was spent"), None
    out = None
    try:
        t0 = time.monotonic()
        fwd, leaves = make_impl(name, c, x, cuda_problem)
        out = fwd()                          # first call: compiles / autotunes, outside the timing
        torch.autograd.grad(out, leaves, x.dout)
        if x.device == "cuda":
            torch.cuda.synchronize()
        first = time.monotonic() - t0
        note = f"first fwd+bwd call {first:.1f} s"
        if ref_out is not None and name != "peft":
            note += f"; max|out - peft| {float((out.detach().float() - ref_out.float()).abs().max()):.1e}"
        for r in rows.values():
            r.note, r.extra["first_call_s"] = note, first
        rows["fwd"].ms = do_bench(fwd, **bench_kw)
        rows["fwd+bwd"].ms = do_bench(lambda: torch.autograd.grad(fwd(), leaves, x.dout), **bench_kw)
        o = fwd()
        rows["bwd"].ms = do_bench(lambda: torch.autograd.grad(o, leaves, x.dout, retain_graph=True), **bench_kw)
        del o
    except _NA as e:
        return na(str(e).removeprefix("n/a: ")), None
    except torch.cuda.OutOfMemoryError as e:
        if x.device == "cuda":
            torch.cuda.empty_cache()
        return na(f"out of memory: {str(e)[:120]}"), None
    except Exception as e:  # noqa: BLE001 - a baseline that refuses the inputs is a row, not a crash
        msg = " ".join(str(e).split())[:200]
        return na(f"{type(e).__name__}: {msg}"), None
    return list(rows.values()), (out.detach() if name == "peft" and out is not None else None)


def run_bench(cases: list[plan.GpuCase], impls: list[str], *, quick: bool, budget_s: float,
              cuda_problem: Optional[str], device: str = "cuda", do_bench: Optional[Callable] = None,
              dtype=None, rows: Optional[list] = None) -> list[GpuRow]:
    """Every (case, implementation, pass) row.  ``device`` / ``do_bench`` / ``dtype`` exist for the CPU test
    of this loop (with a fake timer); the command itself always runs bf16 on CUDA with triton's do_bench."""
    import torch

    if do_bench is None:
        from triton.testing import do_bench

    kw = dict(plan.DO_BENCH_QUICK if quick else plan.DO_BENCH, return_mode="median")
    t_start = time.monotonic()
    deadline = t_start + budget_s
    flex_deadline = t_start + (plan.FLEX_BUDGET_QUICK_S if quick else plan.FLEX_BUDGET_S)
    flex_spent = 0.0
    # PEFT first: its output is the cross-check of every other implementation's forward
    order = (["peft"] if "peft" in impls else []) + [i for i in impls if i != "peft"]
    rows = [] if rows is None else rows      # filled in place: a crash keeps what was measured
    for n, c in enumerate(cases, 1):
        t_case = time.monotonic()
        mem = plan.memory_estimate_bytes(c)
        print(f"[{n}/{len(cases)}] {c.name}: {c.shape}, fwd {plan.flops(c)['fwd'] / 1e9:.1f} GFLOP, "
              f"memory estimate {mem / 2**30:.1f} GiB, {time.monotonic() - t_start:.0f} s into the stage", flush=True)
        x = Inputs(c, seed=n, device=device, dtype=dtype)
        ref = None
        for name in order:
            if name == "flex" and time.monotonic() > flex_deadline:
                rs = [GpuRow(c.name, c.shape, name, p, plan.flops(c)[p],
                             status=f"n/a: not run: FlexAttention compile budget ({flex_spent:.0f} s) spent")
                      for p in plan.PASSES]
            else:
                t0 = time.monotonic()
                rs, out = measure_impl(name, c, x, ref, cuda_problem=cuda_problem, do_bench=do_bench,
                                       bench_kw=kw, deadline=deadline)
                if name == "flex":
                    flex_spent += time.monotonic() - t0
                if out is not None:
                    ref = out
            rows += rs
            if all(r.ms is None for r in rs) and len({r.status for r in rs}) == 1:
                print(f"  {c.name:22} {name:15} {'all':8} {rs[0].status}", flush=True)
            else:
                for line in table_lines(rs)[2:]:
                    print("  " + line, flush=True)
        del x, ref
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"  ({time.monotonic() - t_case:.1f} s)", flush=True)
    return rows


# --------------------------------------------------------------------------- main
def _interpreter_flag_set() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def main(argv: Optional[list] = None) -> int:
    t_start = time.monotonic()
    args = _parser().parse_args(argv)
    cases = plan.grid(args.quick)
    if args.case:
        cases = [c for c in cases if any(s in c.name for s in args.case)]
    impls = [i for i in plan.IMPL_NAMES if not args.impl or i in args.impl]
    if args.no_cuda:
        impls = [i for i in impls if i != "ours-cuda"]
    print("softprompt-kernels bench --gpu" + (" --quick" if args.quick else "") + (" --dry-run" if args.dry_run else ""))
    print("\n".join(plan.plan_lines(cases, args.quick, impls)))
    print("  stage 1 commands:")
    for name, cmd in test_commands(args.quick):
        print(f"    {name}: {shlex.join(Path(a).name if a == sys.executable else a for a in cmd)}")
    print(f"  results: {os.path.join(args.out, 'gpu.json')}, {os.path.join(args.out, 'gpu.md')}")
    if args.dry_run:
        print("dry run: nothing was run on a GPU and no time was measured.")
        return 0

    import torch

    if not torch.cuda.is_available():
        why = ("torch is a CPU-only build" if torch.version.cuda is None
               else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no device")
        print(f"\nerror: no CUDA device ({why}); nothing was run and no time was measured. "
              "Run ./dev gpu on a machine with an NVIDIA GPU, or ./dev gpu --dry-run for the plan.", file=sys.stderr)
        return EXIT_NO_GPU
    if _interpreter_flag_set():
        if any(m.startswith("softprompt_kernels.triton.") for m in sys.modules):
            print("error: TRITON_INTERPRET is set and the Triton kernels are already imported (interpreted); "
                  "unset TRITON_INTERPRET and rerun", file=sys.stderr)
            return 2
        print("note: TRITON_INTERPRET was set; removed for this run (compiled kernels)")
    os.environ.pop("TRITON_INTERPRET", None)

    budgets = plan.stage_budgets(args.quick)
    env = environment()
    print(f"\ndevice: {env.get('device_name')} (sm_{env.get('capability')}, {env.get('device_memory_gib')} GiB), "
          f"driver {env.get('driver')}, CUDA {env.get('cuda')}, nvcc {env.get('nvcc')}, cuDNN {env.get('cudnn')}; "
          f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, peft {env['peft']}; "
          f"python {env['python']} ({sys.executable})")
    stages, rc = [], 0

    # stage 1: build + tests
    t1 = time.monotonic()
    print(f"\n=== stage 1: build + GPU tests (budget {budgets['tests']} s) ===")
    steps = [] if args.skip_tests else test_commands(args.quick)
    per_step = plan.TEST_STEP_RESERVE_QUICK_S if args.quick else plan.TEST_STEP_RESERVE_S
    # the build must leave each test step its reserve; a build that runs out of time is not a test
    # failure (the CUDA rows say why), a build that fails is
    cuda_problem, rec = build_cuda(max(budgets["tests"] - per_step * len(steps), 30),
                                   args.no_cuda or "ours-cuda" not in impls)
    tests = [rec]
    if rec.get("rc") == 124:
        rec["rc_counts"] = False
        print("warning: the CUDA extension build ran out of its time budget; ours-cuda rows will be n/a "
              "(the next run reuses whatever ninja finished; or run with --no-cuda)")
    for k, (name, cmd) in enumerate(steps):
        later = per_step * (len(steps) - k - 1)
        left = budgets["tests"] - (time.monotonic() - t1) - later
        why = ("the stage budget was spent" if left < 5 else
               f"CUDA backend {cuda_problem}" if cuda_problem and "cuda" in name else None)
        if why:
            print(f"\n--- {name}: not run: {why}")
            tests.append({"name": name, "cmd": cmd, "rc": None, "seconds": 0.0, "status": f"not run: {why}"})
            continue
        tests.append(_run(name, cmd, left, args.quick))
    failed = [t for t in tests if t.get("rc") not in (None, 0) and t.get("rc_counts", True)]
    t_status = "passed" if not failed else "FAILED: " + ", ".join(t["name"] for t in failed)
    if any(t.get("rc") is None and t["name"] != "build CUDA extension" for t in tests):
        t_status += " (some not run)"
    rc = 1 if failed else 0
    stages.append({"name": "tests", "status": t_status, "seconds": time.monotonic() - t1, "budget_s": budgets["tests"],
                   "steps": tests})
    print(f"=== stage 1: {t_status} in {time.monotonic() - t1:.0f} s (elapsed {time.monotonic() - t_start:.0f} s) ===")

    # stage 2: bench
    t2 = time.monotonic()
    # what stage 1 left over goes to the bench; the write stage and a margin stay reserved
    bench_s = max(budgets["bench"], sum(budgets.values()) - budgets["write"] - (t2 - t_start))
    print(f"\n=== stage 2: bench, {len(cases)} cases (budget {bench_s:.0f} s) ===")
    rows: list[GpuRow] = []
    b_status = "done"
    try:
        run_bench(cases, impls, quick=args.quick, budget_s=bench_s, cuda_problem=cuda_problem, rows=rows)
    except Exception as e:  # noqa: BLE001 - keep stage 1's record and the rows measured so far
        import traceback

        traceback.print_exc()
        b_status, rc = f"CRASHED: {type(e).__name__}: {str(e)[:200]}", 1
    stages.append({"name": "bench", "status": b_status, "seconds": time.monotonic() - t2, "budget_s": bench_s})
    print(f"=== stage 2: {b_status} in {time.monotonic() - t2:.0f} s (elapsed {time.monotonic() - t_start:.0f} s) ===")

    # stage 3: write
    t3 = time.monotonic()
    print("\n=== stage 3: results ===")
    print("\n".join(table_lines(rows)))
    verdicts = verdict_lines(rows)
    print("\nTargets (issue 12), fwd+bwd, baseline time / our time:")
    print("\n".join("  " + v for v in verdicts) or "  (nothing measured)")
    stages.append({"name": "write", "status": "done", "seconds": time.monotonic() - t3, "budget_s": budgets["write"]})
    meta = {"quick": args.quick, "argv": list(argv) if argv is not None else sys.argv[1:],
            "cases": [c.to_json() for c in cases], "impls": {n: d for n, d in plan.IMPLS if n in impls},
            "do_bench": plan.DO_BENCH_QUICK if args.quick else plan.DO_BENCH, "stages": stages,
            "elapsed_s": time.monotonic() - t_start,
            "flop_convention": "softprompt_kernels.report.attention_flops: fwd = 4*B*Hq*L*(P + S_eff)*D, "
                               "S_eff = S (S - L/2 causal), bwd = 2.5 x fwd"}
    jpath, mpath = os.path.join(args.out, "gpu.json"), os.path.join(args.out, "gpu.md")
    data = write_json(jpath, env, rows, meta)
    write_markdown(mpath, data)
    print(f"\nwrote {jpath} and {mpath}; total elapsed {time.monotonic() - t_start:.0f} s "
          f"(budget {plan.BUDGET_TOTAL_S} s)")
    if env.get("git_commit"):
        print("commit these results with the device and versions (see README, 'GPU check').")
    return rc
