"""Rows, verdicts, JSON and markdown of ``softprompt-kernels bench --gpu``.

A row is one (case, implementation, pass): the ``do_bench`` median in milliseconds, or ``None``
with ``status = "n/a: reason"``.  TFLOP/s is derived from the case's analytic FLOP count, which
is stored (and printed) next to every row.  Nothing here measures; on a machine without a GPU
these functions only ever see rows that came from a GPU run (or tests' synthetic rows).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

from .gpu_plan import OURS, TARGETS


@dataclass
class GpuRow:
    case: str
    shape: str
    impl: str
    pass_: str
    flops: float
    ms: Optional[float] = None        # do_bench median, milliseconds (None: not measured)
    status: str = "ok"                # "ok" or "n/a: reason"
    note: str = ""                    # e.g. max|diff| of the forward against the PEFT path
    extra: dict = field(default_factory=dict)

    @property
    def tflops(self) -> Optional[float]:
        if self.ms is None or self.ms <= 0:
            return None
        return self.flops / (self.ms * 1e-3) / 1e12

    def to_json(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        d["tflops"] = self.tflops
        return d

    @classmethod
    def from_json(cls, d: dict) -> "GpuRow":
        d = dict(d)
        d.pop("tflops", None)
        d["pass_"] = d.pop("pass")
        return cls(**d)


def _index(rows: list[GpuRow]) -> dict:
    return {(r.case, r.impl, r.pass_): r for r in rows}


def speedups(rows: list[GpuRow], ours: str, baseline: str, pass_: str = "fwd+bwd") -> list[tuple[str, float]]:
    """(case, baseline ms / ours ms) for every case where both were measured."""
    idx = _index(rows)
    out = []
    for r in rows:
        if r.impl != ours or r.pass_ != pass_ or r.ms is None:
            continue
        b = idx.get((r.case, baseline, pass_))
        if b is not None and b.ms is not None:
            out.append((r.case, b.ms / r.ms))
    return out


def verdict_lines(rows: list[GpuRow]) -> list[str]:
    """One line per (target, our backend): met / NOT met / not measured, with the worst and geomean ratios."""
    lines = []
    cases = sorted({r.case for r in rows})
    for baseline, target, text in TARGETS:
        for ours in OURS:
            if not any(r.impl == ours for r in rows):
                continue
            sp = speedups(rows, ours, baseline)
            if not sp:
                lines.append(f"{text} [{ours}]: not measured (no case with both {ours} and {baseline} timed)")
                continue
            worst_case, worst = min(sp, key=lambda t: t[1])
            geo = math.exp(sum(math.log(x) for _, x in sp) / len(sp))
            n_ok = sum(1 for _, x in sp if x >= target)
            ok = n_ok == len(sp)
            scope = f"{len(sp)}/{len(cases)} cases measured"
            lines.append(f"{text} [{ours}]: {'met' if ok else 'NOT met'} -- {n_ok}/{len(sp)} cases >= {target:.1f}x, "
                         f"worst {worst:.2f}x ({worst_case}), geomean {geo:.2f}x; {scope}")
    return lines


def _fmt_ms(ms: Optional[float]) -> str:
    return "n/a" if ms is None else f"{ms:.3f}"


def _fmt_tf(tf: Optional[float]) -> str:
    return "n/a" if tf is None else f"{tf:.1f}"


def table_lines(rows: list[GpuRow]) -> list[str]:
    """Printed table: case, impl, pass, median ms, TFLOP/s, GFLOP (the count the TFLOP/s uses), status."""
    hdr = f"{'case':22} {'impl':15} {'pass':8} {'median ms':>10} {'TFLOP/s':>8} {'GFLOP':>9}  status / note"
    out = [hdr, "-" * len(hdr)]
    for r in rows:
        tail = r.status if r.status != "ok" else r.note
        out.append(f"{r.case:22} {r.impl:15} {r.pass_:8} {_fmt_ms(r.ms):>10} {_fmt_tf(r.tflops):>8} "
                   f"{r.flops / 1e9:9.1f}  {tail}")
    return out


def write_json(path: str, env: dict, rows: list[GpuRow], meta: Optional[dict] = None) -> dict:
    data = {"environment": env, "meta": dict(meta or {}), "verdicts": verdict_lines(rows),
            "rows": [r.to_json() for r in rows]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return data


def read_json(path: str) -> tuple[dict, list[GpuRow]]:
    with open(path) as f:
        data = json.load(f)
    return data, [GpuRow.from_json(r) for r in data["rows"]]


def environment_line(env: dict) -> str:
    keys = ("device_name", "driver", "cuda", "cudnn", "torch", "triton", "transformers", "peft", "python", "date")
    return "; ".join(f"{k}: {env.get(k)}" for k in keys if k in env)


def render_markdown(data: dict) -> str:
    """Markdown: environment, verdicts, stage summary, and one table per pass (TFLOP/s per implementation)."""
    env, meta = data.get("environment", {}), data.get("meta", {})
    rows = [GpuRow.from_json(r) for r in data.get("rows", [])]
    parts = ["# softprompt-kernels bench --gpu", "", environment_line(env), ""]
    if meta.get("stages"):
        parts += ["Stages: " + "; ".join(f"{s['name']} {s['status']} ({s['seconds']:.0f} s)" for s in meta["stages"]),
                  ""]
    parts += ["## Verdicts", ""] + [f"- {v}" for v in data.get("verdicts", [])] + [""]
    parts.append("TFLOP/s = analytic FLOPs (fwd = 4*B*H*L*(P + S_eff)*D, S_eff = L or L/2 causal; bwd = 2.5x fwd) "
                 "/ do_bench median; the same FLOP count for every implementation of a case.")
    impls = []
    for r in rows:
        if r.impl not in impls:
            impls.append(r.impl)
    idx = _index(rows)
    for pass_ in ("fwd", "bwd", "fwd+bwd"):
        cases = []
        for r in rows:
            if r.pass_ == pass_ and r.case not in cases:
                cases.append(r.case)
        if not cases:
            continue
        parts += ["", f"## {pass_}: median ms / TFLOP/s", "",
                  "| case | shape | GFLOP | " + " | ".join(impls) + " |",
                  "|---|---|---:|" + "---:|" * len(impls)]
        notes = []
        for c in cases:
            any_r = next(r for r in rows if r.case == c and r.pass_ == pass_)
            cells = []
            for i in impls:
                r = idx.get((c, i, pass_))
                if r is None:
                    cells.append("")
                elif r.ms is None:
                    cells.append("n/a")
                    notes.append(f"{c} {i} {pass_}: {r.status}")
                else:
                    cells.append(f"{r.ms:.3f} / {r.tflops:.0f}")
            parts.append(f"| {c} | {any_r.shape} | {any_r.flops / 1e9:.1f} | " + " | ".join(cells) + " |")
        if notes:
            parts += ["", "Not measured:", ""] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


def write_markdown(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(render_markdown(data))
