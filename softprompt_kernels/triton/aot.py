"""Ahead-of-time compile driver: every shipped Triton kernel configuration -> sm_80 / sm_90.

No GPU is needed.  For each ``KernelSpec`` (see ``kernel_spec.py``) returned by
``aot_specs()`` of the modules in ``KERNEL_MODULES`` and each target arch, the driver
runs ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, writes the
cubin to a temp file, reads ``cuobjdump --dump-resource-usage`` (REG, STACK, SHARED,
LOCAL), checks the PTX for ``wgmma`` and computes the theoretical occupancy on an A100
(sm_80) / H100 (sm_90).  One ``AotResult`` per (spec, arch).

CLI (must run with ``TRITON_INTERPRET`` unset; the CLI re-executes itself without it)::

    python -m softprompt_kernels.triton.aot [--arch 80 90] [--json out.json] [--jobs N]
        [--module pkg.mod[:func] ...] [--allow-missing] [--cache-dir DIR] [--no-align-hints]
        [--subset all|representative] [--filter REGEX] [--progress] [--quiet]

Exit status: 0 when every spec compiled, 1 when any compile failed / a module is missing,
2 on bad usage.  Spills and missing ``wgmma`` are *reported*, not turned into an exit
status (the test suite asserts on them).

Caching: compiles go through Triton's normal cache (``TRITON_CACHE_DIR``, default
``~/.triton/cache``), so a second run only reloads the binaries; ``compile_s`` then measures
the cache load.  ``--cache-dir`` points the workers at another cache directory (the tests
pass a fresh temp dir so that they measure cold compiles).

Alignment hints: a real launch with torch tensors specialises every pointer argument as
16-byte aligned (``tt.divisibility = 16``); the driver passes the same hint for every
pointer (``*`` type) argument so the compiled code matches what a GPU would run.  Integer
arguments are left unspecialised (the conservative choice) except those a spec lists in
``divisible`` (e.g. element strides, multiples of 16 in the launches the spec stands for).
``--no-align-hints`` drops both.

Archs: a spec is compiled for the archs in its ``archs`` only (the tables it comes from are per arch).

Main loops: every result carries ``extra["loops"]``, the SASS main-loop statistics of
``sass_stats.loop_stats`` (instructions per score element, wgmma shapes).

Parallelism: a ``ProcessPoolExecutor`` with the ``spawn`` start method; each worker
re-imports the kernel modules (JIT functions are not picklable) with ``TRITON_INTERPRET``
removed from its environment.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

KERNEL_MODULES = (
    "softprompt_kernels.triton.prefix_attention",
    "softprompt_kernels.triton.prefix_mlp",
)
ARCHS = (80, 90)


# ----------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class SMLimits:
    """Per-SM resource limits used for theoretical occupancy (CUDA occupancy-calculator rules)."""

    gpu: str
    regs: int = 65536              # 32-bit registers per SM
    regs_per_block: int = 65536
    reg_alloc_unit: int = 256      # registers per warp are allocated in units of 256
    sub_partitions: int = 4        # registers are split over 4 SM sub-partitions
    smem: int = 0                  # shared memory per SM (max carveout), bytes
    smem_per_block: int = 0        # max dynamic+static shared memory per block (opt-in), bytes
    smem_reserved: int = 1024      # reserved by CUDA per block (cc >= 8.0)
    smem_alloc_unit: int = 128
    threads: int = 2048
    blocks: int = 32
    max_regs_per_thread: int = 255

    @property
    def max_warps(self) -> int:
        return self.threads // 32


SM_LIMITS = {
    80: SMLimits(gpu="A100 (sm_80)", smem=164 * 1024, smem_per_block=163 * 1024),
    90: SMLimits(gpu="H100 (sm_90)", smem=228 * 1024, smem_per_block=227 * 1024),
}


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def theoretical_occupancy(arch: int, regs: int, num_warps: int, shared_bytes: int) -> dict:
    """Resident blocks / warps per SM and the limiting resource.

    regs: registers per thread; shared_bytes: static + dynamic shared memory per block.
    Returns ``{"blocks_per_sm", "warps_per_sm", "occupancy_pct", "limiter"}``; a kernel that
    cannot launch at all (too many registers or too much shared memory per block) gets 0
    blocks and the limiter says why.
    """
    lim = SM_LIMITS[arch]
    limits = {}
    limits["threads"] = lim.threads // (num_warps * 32)
    limits["blocks"] = lim.blocks
    regs_per_warp = _round_up(max(regs, 1) * 32, lim.reg_alloc_unit)
    if regs_per_warp * num_warps > lim.regs_per_block or regs > lim.max_regs_per_thread:
        limits["registers"] = 0
    else:
        warps_per_part = (lim.regs // lim.sub_partitions) // regs_per_warp
        limits["registers"] = (warps_per_part * lim.sub_partitions) // num_warps
    if shared_bytes > lim.smem_per_block:
        limits["shared memory"] = 0
    elif shared_bytes > 0:
        per_block = _round_up(shared_bytes + lim.smem_reserved, lim.smem_alloc_unit)
        limits["shared memory"] = lim.smem // per_block
    limiter = min(limits, key=lambda k: (limits[k], k != "shared memory"))
    blocks = limits[limiter]
    warps = blocks * num_warps
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": warps,
        "occupancy_pct": round(100.0 * warps / lim.max_warps, 1),
        "limiter": limiter,
    }


# ------------------------------------------------------------------------ cuobjdump text
_FUNC_RE = re.compile(r"^\s*Function\s+(\S+?)\s*:\s*$")
_FIELD_RE = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> dict:
    """Parse ``cuobjdump --dump-resource-usage`` output.

    Returns ``{function_name: {"REG": int, "STACK": int, "SHARED": int, "LOCAL": int, ...}}``.
    """
    out: dict = {}
    current = None
    for line in text.splitlines():
        m = _FUNC_RE.match(line)
        if m:
            current = m.group(1)
            out[current] = {}
            continue
        if current is not None and ":" in line:
            fields = dict((k, int(v)) for k, v in _FIELD_RE.findall(line))
            if fields:
                out[current].update(fields)
    return out


def find_cuobjdump() -> str:
    """cuobjdump shipped with the imported triton wheel (fallbacks: $TRITON_CUOBJDUMP_PATH, PATH)."""
    env = os.environ.get("TRITON_CUOBJDUMP_PATH")
    if env and os.path.exists(env):
        return env
    import triton

    cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cand):
        return cand
    found = shutil.which("cuobjdump")
    if found:
        return found
    raise FileNotFoundError("cuobjdump not found (looked in the triton wheel, $TRITON_CUOBJDUMP_PATH, PATH)")


def cubin_resource_usage(cubin: bytes, kernel_name: str, cuobjdump: Optional[str] = None) -> dict:
    """Write ``cubin`` to a temp file and return the resource fields of ``kernel_name``."""
    cuobjdump = cuobjdump or find_cuobjdump()
    with tempfile.TemporaryDirectory(prefix="spk_aot_") as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([cuobjdump, "--dump-resource-usage", path],
                              capture_output=True, text=True, check=True)
    usage = parse_resource_usage(proc.stdout)
    if kernel_name in usage:
        return usage[kernel_name]
    if len(usage) == 1:
        return next(iter(usage.values()))
    raise RuntimeError(f"kernel {kernel_name!r} not in cuobjdump output:\n{proc.stdout}")


# ------------------------------------------------------------------------------ results
@dataclass
class AotResult:
    """Static compile facts for one (spec, arch)."""

    module: str
    name: str
    arch: int
    kernel: str = ""
    num_warps: int = 0
    num_stages: int = 0
    expect_wgmma: bool = False
    regs: int = 0
    stack_bytes: int = 0
    local_bytes: int = 0
    spills: bool = False
    shared_static: int = 0
    shared_dynamic: int = 0
    shared_bytes: int = 0
    blocks_per_sm: int = 0
    warps_per_sm: int = 0
    occupancy_pct: float = 0.0
    occupancy_limiter: str = ""
    wgmma: bool = False
    compile_s: float = 0.0         # wall seconds of triton.compile (a cache hit: the load)
    compile_cpu_s: float = 0.0     # CPU seconds of it, ptxas included (independent of machine load)
    triton_version: str = ""
    error: Optional[str] = None
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def result_from_usage(base: AotResult, usage: dict, shared_dynamic: int, ptx: str) -> AotResult:
    """Fill ``base`` from parsed cuobjdump fields, Triton's dynamic shared size and the PTX."""
    base.regs = usage.get("REG", 0)
    base.stack_bytes = usage.get("STACK", 0)
    base.local_bytes = usage.get("LOCAL", 0)
    base.spills = base.stack_bytes > 0 or base.local_bytes > 0
    base.shared_static = usage.get("SHARED", 0)
    base.shared_dynamic = int(shared_dynamic or 0)
    base.shared_bytes = base.shared_static + base.shared_dynamic
    occ = theoretical_occupancy(base.arch, base.regs, base.num_warps, base.shared_bytes)
    base.blocks_per_sm = occ["blocks_per_sm"]
    base.warps_per_sm = occ["warps_per_sm"]
    base.occupancy_pct = occ["occupancy_pct"]
    base.occupancy_limiter = occ["limiter"]
    base.wgmma = "wgmma" in ptx
    return base


# ------------------------------------------------------------------------------ compile
def _check_not_interpreted(fn, name: str) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("AOT compile needs TRITON_INTERPRET unset (run `python -m "
                           "softprompt_kernels.triton.aot` or use run_subprocess())")
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        raise TypeError(f"spec {name!r}: fn must be a triton JITFunction, got {type(fn).__name__} "
                        "(was the module imported with TRITON_INTERPRET=1?)")


def full_signature(spec) -> dict:
    """Signature over every argument of ``spec.fn`` in order; constexprs typed ``"constexpr"``."""
    names = list(spec.fn.arg_names)
    unknown = (set(spec.signature) | set(spec.constexprs)) - set(names)
    if unknown:
        raise ValueError(f"spec {spec.name!r}: arguments {sorted(unknown)} are not parameters of "
                         f"{spec.fn.__name__}{tuple(names)}")
    both = set(spec.signature) & set(spec.constexprs)
    if both:
        raise ValueError(f"spec {spec.name!r}: {sorted(both)} given both a type and a constexpr value")
    sig = {}
    for a in names:
        if a in spec.constexprs:
            sig[a] = "constexpr"
        elif a in spec.signature:
            sig[a] = spec.signature[a]
        else:
            raise ValueError(f"spec {spec.name!r}: argument {a!r} of {spec.fn.__name__} has neither a "
                             "signature type nor a constexpr value")
    return sig


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (ptxas runs as a child)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def compile_spec(spec, arch: int, *, module: str = "", align_hints: bool = True,
                 cuobjdump: Optional[str] = None, loop_scores=(None, None)) -> AotResult:
    """Compile one spec for ``arch`` in this process (``TRITON_INTERPRET`` must be unset).

    ``extra["loops"]``: ``sass_stats.loop_stats`` of the kernel's main loops; ``loop_scores`` =
    (scores per iteration, FLOPs per score) for them, default BLOCK_M x BLOCK_N of the spec."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = AotResult(module=module, name=spec.name, arch=arch, num_warps=spec.num_warps,
                    num_stages=spec.num_stages, expect_wgmma=spec.expect_wgmma,
                    triton_version=triton.__version__)
    try:
        _check_not_interpreted(spec.fn, spec.name)
        res.kernel = spec.fn.__name__
        sig = full_signature(spec)
        attrs = {}
        if align_hints:
            divisible = set(getattr(spec, "divisible", ()))
            attrs = {(i,): [["tt.divisibility", 16]]
                     for i, (a, t) in enumerate(sig.items()) if t.startswith("*") or a in divisible}
        src = ASTSource(fn=spec.fn, signature=sig, constexprs=dict(spec.constexprs), attrs=attrs)
        t0, c0 = time.perf_counter(), _cpu_seconds()
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        res.compile_s = round(time.perf_counter() - t0, 3)
        res.compile_cpu_s = round(_cpu_seconds() - c0, 3)
        md = compiled.metadata
        name = getattr(md, "name", spec.fn.__name__)
        usage = cubin_resource_usage(compiled.asm["cubin"], name, cuobjdump)
        result_from_usage(res, usage, getattr(md, "shared", 0), compiled.asm.get("ptx", ""))
        from . import sass_stats

        scores, per_score = loop_scores
        if scores is None and per_score is None:
            scores = sass_stats.default_scores_per_iter(spec)
        res.extra["loops"] = sass_stats.loop_stats(
            sass_stats.sass_text(compiled.asm["cubin"], cuobjdump), name, num_warps=spec.num_warps,
            scores_per_iter=scores, flops_per_score=per_score)
        n_spills = getattr(md, "n_spills", None)   # only filled when a GPU loaded the binary
        if n_spills:
            res.spills = True
            res.extra["metadata_n_spills"] = int(n_spills)
    except Exception as e:  # noqa: BLE001 - recorded per spec, the run goes on
        msg = str(e).strip()
        res.error = f"{type(e).__name__}: {msg if len(msg) <= 2000 else '...' + msg[-2000:]}"
    return res


# ----------------------------------------------------------------------- spec discovery
def _split_module(entry: str) -> tuple[str, str]:
    mod, _, func = entry.partition(":")
    return mod, func or "aot_specs"


_SPEC_CACHE: dict = {}


def load_specs(entry: str) -> list:
    """``aot_specs()`` (or ``func`` in ``"module:func"``) of one module, cached per process."""
    if entry not in _SPEC_CACHE:
        mod, func = _split_module(entry)
        specs = list(getattr(importlib.import_module(mod), func)())
        names = [s.name for s in specs]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"{entry}: duplicate spec names {sorted(dup)}")
        _SPEC_CACHE[entry] = specs
    return _SPEC_CACHE[entry]


def representative(specs: list) -> list[int]:
    """Indices of a small subset that still compiles every kernel function in every mode.

    Per (kernel function, expect_wgmma, archs) group: its first and last spec (the launchers list
    configurations from small to large tiles / head dims, so that is the cheapest and the
    most register-hungry one)."""
    groups: dict = {}
    for i, s in enumerate(specs):
        key = (getattr(s.fn, "__name__", repr(s.fn)), s.expect_wgmma, tuple(getattr(s, "archs", ARCHS)))
        groups.setdefault(key, []).append(i)
    return sorted({i for idx in groups.values() for i in (idx[0], idx[-1])})


def _worker_init(cache_dir: Optional[str]) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir


def _worker(entry: str, index: int, arch: int, align_hints: bool) -> dict:
    spec = load_specs(entry)[index]
    return asdict(compile_spec(spec, arch, module=entry, align_hints=align_hints))


def run(modules: Iterable[str] = KERNEL_MODULES, archs: Iterable[int] = ARCHS, *, jobs: Optional[int] = None,
        cache_dir: Optional[str] = None, allow_missing: bool = False, align_hints: bool = True,
        subset: str = "all", name_filter: Optional[str] = None, progress=None) -> list[AotResult]:
    """Compile every spec of every module for every arch, in a spawn process pool.

    subset: ``"all"`` or ``"representative"`` (see ``representative()``); name_filter: a regex
    that spec names must match (``re.search``).  A missing module (ImportError) becomes one
    error result, or a warning with ``allow_missing=True``.  Results come back sorted by
    (module, spec order, arch).
    """
    if subset not in ("all", "representative"):
        raise ValueError(f"subset must be 'all' or 'representative', got {subset!r}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("aot.run() needs TRITON_INTERPRET unset in this process (workers inherit it); "
                           "use run_subprocess() from an interpreted process")
    archs = [int(a) for a in archs]
    for a in archs:
        if a not in SM_LIMITS:
            raise ValueError(f"arch must be one of {sorted(SM_LIMITS)}, got {a}")
    results: list[AotResult] = []
    tasks = []
    for entry in modules:
        try:
            specs = load_specs(entry)
        except ModuleNotFoundError as e:
            if allow_missing and e.name and _split_module(entry)[0].startswith(e.name):
                warnings.warn(f"kernel module {entry} not found, skipped")
                continue
            results.append(AotResult(module=entry, name="<module>", arch=0, error=f"{type(e).__name__}: {e}"))
            continue
        except Exception as e:  # noqa: BLE001
            results.append(AotResult(module=entry, name="<module>", arch=0, error=f"{type(e).__name__}: {e}"))
            continue
        if not specs:
            results.append(AotResult(module=entry, name="<module>", arch=0, error="aot_specs() returned no specs"))
        chosen = representative(specs) if subset == "representative" else range(len(specs))
        for i in chosen:
            if name_filter and not re.search(name_filter, specs[i].name):
                continue
            for a in archs:
                if a in getattr(specs[i], "archs", ARCHS):  # a spec compiles only for the archs it ships for
                    tasks.append((entry, i, a))
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks) or 1))
    order = {t: n for n, t in enumerate(tasks)}
    done: dict = {}
    if tasks:
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                                    initargs=(cache_dir,)) as pool:
            futs = {pool.submit(_worker, e, i, a, align_hints): (e, i, a) for e, i, a in tasks}
            for fut in cf.as_completed(futs):
                e, i, a = futs[fut]
                try:
                    r = AotResult(**fut.result())
                except Exception as exc:  # noqa: BLE001 - e.g. a worker crashed
                    r = AotResult(module=e, name=load_specs(e)[i].name, arch=a,
                                  error=f"{type(exc).__name__}: {exc}")
                done[(e, i, a)] = r
                if progress:
                    progress(r, len(done), len(tasks))
    results.extend(done[t] for t in sorted(done, key=order.get))
    return results


# ------------------------------------------------------------------------------ output
COLUMNS = ("arch", "name", "regs", "spills", "shared_KiB", "occ_warps", "occ_%", "limiter", "wgmma", "compile_s")


def format_table(results: Iterable) -> str:
    """Plain-text table of results (``AotResult`` or dicts)."""
    rows = []
    for r in results:
        d = r if isinstance(r, dict) else asdict(r)
        if d.get("error"):
            lines = [ln.strip() for ln in d["error"].splitlines() if ln.strip()]
            msg = lines[0] if len(lines) == 1 else f"{lines[0].split(':')[0]}: {lines[-1]}"
            rows.append([f"sm_{d['arch']}", d["name"], "ERROR", msg[:100], "", "", "", "", "", ""])
            continue
        spill = "none" if not d["spills"] else f"STACK {d['stack_bytes']} LOCAL {d['local_bytes']}"
        wg = "yes" if d["wgmma"] else ("MISSING" if d["expect_wgmma"] and d["arch"] == 90 else "no")
        rows.append([f"sm_{d['arch']}", d["name"], str(d["regs"]), spill, f"{d['shared_bytes'] / 1024:.1f}",
                     f"{d['warps_per_sm']}/{SM_LIMITS[d['arch']].max_warps}", f"{d['occupancy_pct']:.0f}",
                     d["occupancy_limiter"], wg, f"{d['compile_s']:.2f}"])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths])] + [line(r) for r in rows])


def run_subprocess(modules: Optional[Iterable[str]] = None, archs: Iterable[int] = ARCHS, *,
                   jobs: Optional[int] = None, cache_dir: Optional[str] = None, allow_missing: bool = False,
                   subset: str = "all", name_filter: Optional[str] = None,
                   pythonpath: Iterable[str] = (), python: Optional[str] = None,
                   timeout: Optional[float] = None) -> tuple[list[dict], subprocess.CompletedProcess]:
    """Run the CLI in a fresh interpreter without ``TRITON_INTERPRET``; returns (result dicts, process).

    ``pythonpath`` entries are prepended to ``PYTHONPATH`` (e.g. a side-by-side triton 3.6).
    """
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [*pythonpath, root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    with tempfile.TemporaryDirectory(prefix="spk_aot_json_") as d:
        out = os.path.join(d, "aot.json")
        cmd = [python or sys.executable, "-m", "softprompt_kernels.triton.aot", "--json", out,
               "--arch", *[str(a) for a in archs]]
        if jobs:
            cmd += ["--jobs", str(jobs)]
        if cache_dir:
            cmd += ["--cache-dir", cache_dir]
        if allow_missing:
            cmd += ["--allow-missing"]
        if subset != "all":
            cmd += ["--subset", subset]
        if name_filter:
            cmd += ["--filter", name_filter]
        for m in modules or ():
            cmd += ["--module", m]
        # own process group, so that a timeout also ends the pool's worker processes
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) as popen:
            try:
                stdout, stderr = popen.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.communicate()
                raise
        proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
        if not os.path.exists(out):
            raise RuntimeError(f"AOT driver wrote no results (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        with open(out) as f:
            data = json.load(f)
    return data["results"], proc


def _print_progress(r: AotResult, n: int, total: int) -> None:
    state = "ERROR" if r.error else ("SPILLS" if r.spills else "ok")
    print(f"[{n}/{total}] sm_{r.arch} {r.name}: {state} ({r.compile_s:.1f} s)", file=sys.stderr, flush=True)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m softprompt_kernels.triton.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="target archs (80, 90)")
    p.add_argument("--json", help="write results to this JSON file")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    p.add_argument("--module", action="append", default=None,
                   help="kernel module[:func] (repeatable; default: %s)" % ", ".join(KERNEL_MODULES))
    p.add_argument("--allow-missing", action="store_true", help="warn instead of failing on a missing module")
    p.add_argument("--cache-dir", help="TRITON_CACHE_DIR for the workers (default: Triton's cache)")
    p.add_argument("--no-align-hints", action="store_true", help="don't mark pointer args 16-byte aligned")
    p.add_argument("--subset", choices=("all", "representative"), default="all",
                   help="'representative': first and last spec per kernel function (quick check)")
    p.add_argument("--filter", help="only specs whose name matches this regex")
    p.add_argument("--progress", action="store_true", help="one line per finished compile on stderr")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        if "triton" in sys.modules:  # kernels may already be decorated for the interpreter: start afresh
            env = dict(os.environ)
            env.pop("TRITON_INTERPRET")
            cmd = [sys.executable, "-m", "softprompt_kernels.triton.aot", *(sys.argv[1:] if argv is None else argv)]
            return subprocess.run(cmd, env=env).returncode
        os.environ.pop("TRITON_INTERPRET")
    import triton

    t0 = time.perf_counter()
    results = run(args.module or KERNEL_MODULES, args.arch, jobs=args.jobs, cache_dir=args.cache_dir,
                  allow_missing=args.allow_missing, align_hints=not args.no_align_hints,
                  subset=args.subset, name_filter=args.filter, progress=_print_progress if args.progress else None)
    wall = round(time.perf_counter() - t0, 2)
    if not args.quiet:
        print(format_table(results))
        print(f"\n{len(results)} compiles, {sum(not r.ok for r in results)} errors, "
              f"{sum(r.spills for r in results)} with spills; wall {wall} s, compile CPU "
              f"{sum(r.compile_cpu_s for r in results):.1f} s; triton {triton.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton_version": triton.__version__, "wall_s": wall, "archs": args.arch,
                       "compile_cpu_s": round(sum(r.compile_cpu_s for r in results), 2),
                       "results": [asdict(r) for r in results]}, f, indent=1)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
