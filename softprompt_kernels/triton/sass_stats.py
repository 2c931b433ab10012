"""Static main-loop statistics from SASS (``cuobjdump -sass``), without a GPU (DESIGN §4).

For one kernel of a cubin's SASS text, every *main loop* is found: a backward branch (target
address <= its own) whose body [target, branch] holds a matrix instruction (HGMMA, HMMA, DMMA,
IMMA), contains no EXIT (that excludes the out-of-line barrier-retry blocks that jump back into
a loop) and contains no other such loop (the innermost ones; a kernel whose key loop is split
into unmasked and masked parts reports each part).  Per loop:

* ``instructions``: SASS instructions in the body (NOPs excluded), one per warp per iteration;
* ``mma``: matrix instructions by shape, e.g. ``{"m64n128k16": 8}``, and ``mma_flops`` per
  iteration (HGMMA: 2*m*n*k per warpgroup instruction x num_warps/4 warpgroups; HMMA / DMMA /
  IMMA: 2*m*n*k per warp instruction x num_warps);
* ``instr_per_score`` = instructions x num_warps x 32 / score elements per iteration, the
  score elements taken from the tile (``scores_per_iter``, e.g. BLOCK_M x BLOCK_N) or from the
  matrix work (``mma_flops / flops_per_score``: 4*D per score in the forward, 8*D in dK/dV, 6*D
  in dQ).  Lower is better; Triton's fused-attention tutorial forward gives ~7-8 on sm_90.

``loop_stats(sass_text, kernel_name, ...)`` works on text; ``spec_loop_stats(spec, arch)``
compiles a ``KernelSpec`` (``TRITON_INTERPRET`` unset) and returns the same list plus the
compile facts.  The AOT driver (``aot.compile_spec``) stores ``loop_stats`` of every compiled
spec in ``AotResult.extra["loops"]``.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from typing import Optional

_FUNC_RE = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
_INSTR_RE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_LABEL_RE = re.compile(r"^\s*(\.L_\w+):\s*$")
_PRED_RE = re.compile(r"^@!?U?P(?:\d+|T)\s+")
_MMA_OPS = ("HGMMA", "HMMA", "DMMA", "IMMA")
_HGMMA_SHAPE = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)")
_MMA_DOT_SHAPE = re.compile(r"^(?:HMMA|IMMA|DMMA)\.(\d+)x(\d+)x(\d+)")
_MMA_PACKED_SHAPE = re.compile(r"^(?:HMMA|IMMA|DMMA)\.(\d+)")


def _shape(opcode: str) -> Optional[tuple]:
    """(m, n, k, per) of a matrix opcode; per = "warpgroup" (HGMMA) or "warp".

    HGMMA.64x128x16 = m64n128k16; packed forms: HMMA.16816 = m16n8k16, HMMA.1688 = m16n8k8,
    IMMA.16832 = m16n8k32, DMMA.884 = m8n8k4."""
    m = _HGMMA_SHAPE.match(opcode)
    if m:
        return int(m.group(1)), int(m.group(2)), int(m.group(3)), "warpgroup"
    m = _MMA_DOT_SHAPE.match(opcode)
    if m:
        return int(m.group(1)), int(m.group(2)), int(m.group(3)), "warp"
    m = _MMA_PACKED_SHAPE.match(opcode)
    if m:
        d = m.group(1)
        mm, rest = (16, d[2:]) if d.startswith("16") else (int(d[0]), d[1:])
        if len(rest) >= 2:
            return mm, int(rest[0]), int(rest[1:]), "warp"
    return None


def parse_sass(text: str) -> dict:
    """``{function: [(addr, opcode, full_text), ...]}`` in address order; label branches resolved."""
    funcs: dict = {}
    cur = None
    labels: dict = {}
    pending: list = []
    for line in text.splitlines():
        fm = _FUNC_RE.match(line)
        if fm:
            cur = fm.group(1)
            funcs[cur] = []
            labels[cur] = {}
            pending = []
            continue
        if cur is None:
            continue
        lm = _LABEL_RE.match(line)
        if lm:
            pending.append(lm.group(1))
            continue
        im = _INSTR_RE.match(line)
        if not im:
            continue
        addr = int(im.group(1), 16)
        body = _PRED_RE.sub("", im.group(2).strip())
        for lab in pending:
            labels[cur][lab] = addr
        pending = []
        opcode = body.split()[0] if body else ""
        funcs[cur].append((addr, opcode, body))
    for name, instrs in funcs.items():
        labs = labels[name]
        if labs:
            funcs[name] = [(a, op, re.sub(r"`\((\.L_\w+)\)", lambda m: hex(labs.get(m.group(1), -1)), t))
                           for a, op, t in instrs]
    return funcs


def _branch_target(opcode: str, text: str) -> Optional[int]:
    if not (opcode == "BRA" or opcode.startswith("BRA.")):
        return None
    m = re.search(r"0x([0-9a-fA-F]+)\s*$", text)
    return int(m.group(1), 16) if m else None


def loop_stats(sass_text: str, kernel_name: Optional[str] = None, *, num_warps: int,
               scores_per_iter: Optional[int] = None, flops_per_score: Optional[float] = None) -> list[dict]:
    """Innermost matrix-instruction loops of ``kernel_name`` (the only function when None).

    Returns one dict per loop in address order: ``start``, ``end`` (byte addresses of the first
    instruction and of the backward branch), ``instructions``, ``mma`` ({shape: count}),
    ``mma_flops``, ``scores_per_iter`` (given, else ``mma_flops / flops_per_score``, else None),
    ``instr_per_score`` (None without a score count) and ``ops`` (instruction count per opcode
    family, e.g. ``{"FFMA": 64, "MUFU": 64, ...}``)."""
    funcs = parse_sass(sass_text)
    if kernel_name is None:
        if len(funcs) != 1:
            raise ValueError(f"SASS holds {len(funcs)} functions {sorted(funcs)}: name one")
        kernel_name = next(iter(funcs))
    if kernel_name not in funcs:
        raise KeyError(f"kernel {kernel_name!r} not in SASS (functions: {sorted(funcs)})")
    instrs = funcs[kernel_name]
    index = {a: i for i, (a, _, _) in enumerate(instrs)}
    loops = []
    for j, (addr, op, text) in enumerate(instrs):
        tgt = _branch_target(op, text)
        if tgt is None or tgt > addr or tgt not in index:
            continue
        body = instrs[index[tgt]:j + 1]
        ops = [o for _, o, _ in body]
        if any(o == "EXIT" for o in ops) or not any(o.split(".")[0] in _MMA_OPS for o in ops):
            continue
        loops.append((index[tgt], j))
    inner = [(i, j) for i, j in loops
             if not any((i2, j2) != (i, j) and i <= i2 and j2 <= j for i2, j2 in loops)]
    out = []
    for i, j in sorted(set(inner)):
        body = [(a, o, t) for a, o, t in instrs[i:j + 1] if o != "NOP"]
        fam = Counter(o.split(".")[0] for _, o, _ in body)
        shapes: Counter = Counter()
        flops = 0
        for _, o, _ in body:
            if o.split(".")[0] not in _MMA_OPS:
                continue
            sh = _shape(o)
            if sh is None:
                shapes[o] += 1
                continue
            m, n, k, per = sh
            shapes[f"m{m}n{n}k{k}"] += 1
            groups = max(num_warps // 4, 1) if per == "warpgroup" else num_warps
            flops += 2 * m * n * k * groups
        scores = scores_per_iter
        if scores is None and flops_per_score:
            scores = flops / flops_per_score
        n_instr = len(body)
        out.append({
            "start": instrs[i][0], "end": instrs[j][0], "instructions": n_instr,
            "mma": dict(shapes), "mma_flops": flops,
            "scores_per_iter": scores,
            "instr_per_score": None if not scores else n_instr * num_warps * 32 / scores,
            "ops": dict(fam.most_common()),
        })
    return out


def wgmma_n(loop: dict) -> list[int]:
    """N of every wgmma shape of a loop (``m64n128k16`` -> 128)."""
    return [int(re.match(r"m\d+n(\d+)k", s).group(1)) for s in loop["mma"] if re.match(r"m\d+n\d+k\d+", s)]


def sass_text(cubin: bytes, cuobjdump: Optional[str] = None) -> str:
    """``cuobjdump -sass`` of a cubin (cuobjdump from the triton wheel by default)."""
    from .aot import find_cuobjdump

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([cuobjdump or find_cuobjdump(), "-sass", f.name],
                              capture_output=True, text=True, check=True)
    return proc.stdout


def default_scores_per_iter(spec) -> Optional[int]:
    """BLOCK_M x BLOCK_N of a spec's constexprs (one score tile per loop iteration), else None."""
    c = spec.constexprs
    if "BLOCK_M" in c and "BLOCK_N" in c:
        return int(c["BLOCK_M"]) * int(c["BLOCK_N"])
    return None


def spec_loop_stats(spec, arch: int = 90, *, scores_per_iter: Optional[int] = None,
                    flops_per_score: Optional[float] = None, cuobjdump: Optional[str] = None) -> dict:
    """Compile ``spec`` for ``arch`` in this process (``TRITON_INTERPRET`` unset) and return
    ``{"name", "arch", "num_warps", "num_stages", "regs", "spills", "loops": loop_stats(...)}``;
    scores per iteration default to ``default_scores_per_iter(spec)``."""
    from . import aot

    res = aot.compile_spec(spec, arch, cuobjdump=cuobjdump, loop_scores=(scores_per_iter, flops_per_score))
    if res.error:
        raise RuntimeError(f"{spec.name} sm_{arch}: {res.error}")
    return {"name": spec.name, "arch": arch, "num_warps": spec.num_warps, "num_stages": spec.num_stages,
            "regs": res.regs, "spills": res.spills, "loops": res.extra.get("loops", [])}


__all__ = ["default_scores_per_iter", "loop_stats", "parse_sass", "sass_text", "spec_loop_stats", "wgmma_n"]
