"""``softprompt-kernels report``: static GPU report, produced without a GPU.

Three parts:
1. every shipped Triton kernel configuration compiled ahead of time for sm_90 and sm_80
   (``softprompt_kernels.triton.aot`` in a subprocess): registers, spills, shared memory,
   theoretical occupancy, wgmma;
2. main-loop instructions per score element from the sm_90 SASS of those compiles
   (``softprompt_kernels.triton.sass_stats``): per main loop, its SASS instructions x warps x 32
   / score elements per iteration, and the wgmma shapes — a static count, not a timing — with a
   verdict per static target (``static_targets``);
3. for canonical prefix-tuning shapes, analytic FLOPs and minimum bytes moved by
   ``prefix_attention`` forward and forward+backward, and the H100 SXM roofline floor
   (989 TFLOP/s dense bf16, 3.35 TB/s).  The floor is a lower bound computed from those two
   numbers, NOT a measurement; nothing here was run on a GPU.

Usage: ``softprompt-kernels report [--json out.json] [--arch 90 80] [--jobs N] [--no-compile]``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from typing import Optional

H100_SXM = {"name": "H100 SXM", "flops": 989e12, "bytes_per_s": 3.35e12,
            "note": "dense bf16 tensor-core peak and HBM3 bandwidth from NVIDIA's datasheet"}
FLOOR_LABEL = "roofline floor, not a measurement"
BWD_FLOP_FACTOR = 2.5   # backward = 2.5 x forward FLOPs (FlashAttention convention: 5 vs 2 GEMMs)


@dataclass(frozen=True)
class Shape:
    """One attention layer call: q [B, Hq, L, D], k/v [B, Hkv, S, D], shared prefix [Hkv, P, D]."""

    case: str
    B: int
    Hq: int
    Hkv: int
    L: int
    S: int
    P: int
    D: int
    causal: bool
    model: str
    elem_bytes: int = 2  # bf16


# B and heads: the model family each task is usually trained with (one layer's call, S = L).
CANONICAL_SHAPES = (
    Shape("table-to-text", B=8, Hq=16, Hkv=16, L=128, S=128, P=10, D=64, causal=True,
          model="GPT-2 medium (16 heads x 64)"),
    Shape("summarization", B=8, Hq=16, Hkv=16, L=512, S=512, P=200, D=64, causal=False,
          model="BART-large encoder (16 heads x 64)"),
    Shape("p-tuning-v2 cls", B=32, Hq=16, Hkv=16, L=128, S=128, P=20, D=64, causal=False,
          model="RoBERTa-large (16 heads x 64)"),
    Shape("seq labelling", B=16, Hq=16, Hkv=16, L=256, S=256, P=100, D=64, causal=False,
          model="RoBERTa-large (16 heads x 64)"),
    Shape("LLM GQA", B=4, Hq=32, Hkv=8, L=2048, S=2048, P=64, D=128, causal=True,
          model="Llama-3-8B-like (32 q / 8 kv heads x 128)"),
)


def effective_keys(s: Shape) -> float:
    """Keys each query sees on average: all P prefix keys plus S (non-causal) or S - L/2 (causal).

    With S = L the causal sequence part is halved (the usual convention; it ignores the +1/2 of
    the diagonal)."""
    return s.P + (s.S - s.L / 2 if s.causal else s.S)


def attention_flops(s: Shape) -> dict:
    """fwd = 4 B Hq L (P + S_eff) D (QK^T and PV, 2 FLOPs per MAC); bwd = 2.5 x fwd."""
    fwd = 4.0 * s.B * s.Hq * s.L * effective_keys(s) * s.D
    return {"fwd": fwd, "bwd": BWD_FLOP_FACTOR * fwd, "fwd+bwd": (1 + BWD_FLOP_FACTOR) * fwd}


def attention_min_bytes(s: Shape) -> dict:
    """Compulsory HBM traffic: each input read once, each output written once, no intermediates.

    fwd reads q, k, v, prefix_k, prefix_v (the prefix once: no batch copy) and writes out and the
    float32 lse.  bwd reads q, k, v, prefix_k/v, out, dout, lse and writes dq, dk, dv, dprefix_k/v.
    fwd+bwd is the sum of the two separate passes."""
    e = s.elem_bytes
    q = s.B * s.Hq * s.L * s.D
    kv = 2 * s.B * s.Hkv * s.S * s.D
    pkv = 2 * s.Hkv * s.P * s.D
    lse = s.B * s.Hq * s.L * 4
    fwd = e * (q + kv + pkv + q) + lse
    bwd = e * (q + kv + pkv + 2 * q) + lse + e * (q + kv + pkv)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def roofline_floor_s(flops: float, nbytes: float, hw: dict = H100_SXM) -> float:
    """max(FLOPs / peak FLOP/s, bytes / bandwidth): no kernel can be faster.  Not a measurement."""
    return max(flops / hw["flops"], nbytes / hw["bytes_per_s"])


def analytic_rows(shapes=CANONICAL_SHAPES, hw: dict = H100_SXM) -> list[dict]:
    rows = []
    for s in shapes:
        fl, by = attention_flops(s), attention_min_bytes(s)
        for pas in ("fwd", "fwd+bwd"):
            floor = roofline_floor_s(fl[pas], by[pas], hw)
            rows.append({
                "case": s.case, "pass": pas, "shape": asdict(s),
                "flops": fl[pas], "min_bytes": by[pas], "intensity_flop_per_byte": fl[pas] / by[pas],
                "bound": "compute" if fl[pas] / hw["flops"] >= by[pas] / hw["bytes_per_s"] else "memory",
                "h100_floor_us": floor * 1e6,
            })
    return rows


def format_analytic(rows: list[dict], hw: dict = H100_SXM) -> str:
    head = ("case", "pass", "B", "Hq/Hkv", "L", "P", "D", "causal", "GFLOP", "min MB", "FLOP/B", "bound",
            "H100 floor us")
    out = []
    for r in rows:
        s = r["shape"]
        out.append((r["case"], r["pass"], str(s["B"]), f"{s['Hq']}/{s['Hkv']}", str(s["L"]), str(s["P"]),
                    str(s["D"]), "yes" if s["causal"] else "no", f"{r['flops'] / 1e9:.2f}",
                    f"{r['min_bytes'] / 1e6:.2f}", f"{r['intensity_flop_per_byte']:.0f}", r["bound"],
                    f"{r['h100_floor_us']:.2f}"))
    w = [max(len(h), *(len(o[i]) for o in out)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(n) for c, n in zip(cells, w)).rstrip()  # noqa: E731
    lines = [f"prefix_attention, one layer call, bf16 (S = L, shared prefix); "
             f"{hw['name']}: {hw['flops'] / 1e12:.0f} TFLOP/s, {hw['bytes_per_s'] / 1e12:.2f} TB/s",
             f"'H100 floor us' = max(FLOPs/peak, bytes/bandwidth): {FLOOR_LABEL}.",
             "FLOPs: fwd = 4*B*Hq*L*(P + S_eff)*D, S_eff = S (S - L/2 causal); bwd = 2.5 x fwd. "
             "Min bytes: inputs read once, outputs written once.",
             fmt(head), fmt(["-" * n for n in w])]
    lines += [fmt(o) for o in out]
    models = {r["case"]: r["shape"]["model"] for r in rows}
    lines.append("Models: " + "; ".join(f"{c}: {m}" for c, m in models.items()))
    return "\n".join(lines)


def compile_results(archs=(90, 80), jobs: Optional[int] = None, cache_dir: Optional[str] = None) -> list[dict]:
    """AOT-compile every shipped spec (subprocess without TRITON_INTERPRET); result dicts."""
    from .triton import aot

    results, _ = aot.run_subprocess(aot.KERNEL_MODULES, archs, jobs=jobs, cache_dir=cache_dir)
    return results


LOOP_SECTION = "main-loop instructions per score element (sm_90 SASS)"


def loop_rows(compiled: list[dict], arch: int = 90, name_prefix: str = "prefix_attn") -> list[dict]:
    """One row per main loop of every compiled ``arch`` attention kernel (name starting with
    ``name_prefix``: their loops run over score tiles) that has ``extra["loops"]``."""
    rows = []
    for r in compiled:
        if r.get("error") or r.get("arch") != arch or not r["name"].startswith(name_prefix):
            continue
        for i, lp in enumerate((r.get("extra") or {}).get("loops") or []):
            rows.append({"name": r["name"], "loop": i, "instructions": lp["instructions"],
                         "num_warps": r["num_warps"], "num_stages": r["num_stages"],
                         "scores_per_iter": lp["scores_per_iter"], "instr_per_score": lp["instr_per_score"],
                         "mma": lp["mma"], "regs": r["regs"], "spills": r["spills"]})
    return rows


def format_loops(rows: list[dict]) -> str:
    head = ("name", "loop", "instr", "warps", "stages", "scores/iter", "instr/score", "mma shapes", "regs", "spills")
    out = []
    for r in rows:
        ips = "-" if r["instr_per_score"] is None else f"{r['instr_per_score']:.1f}"
        sc = "-" if r["scores_per_iter"] is None else f"{r['scores_per_iter']:.0f}"
        mma = " ".join(f"{k}x{v}" for k, v in r["mma"].items())
        out.append((r["name"], str(r["loop"]), str(r["instructions"]), str(r["num_warps"]), str(r["num_stages"]),
                    sc, ips, mma, str(r["regs"]), "yes" if r["spills"] else "none"))
    w = [max(len(h), *(len(o[i]) for o in out)) if out else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(n) for c, n in zip(cells, w)).rstrip()  # noqa: E731
    lines = ["instr/score = loop SASS instructions x warps x 32 / score elements per iteration (BLOCK_M x BLOCK_N); "
             "loops in address order (forward: prefix, prefix tail, sequence, masked sequence); static count, "
             "no GPU used. Triton's fused-attention tutorial forward: ~7-8.",
             fmt(head), fmt(["-" * n for n in w])]
    return "\n".join(lines + [fmt(o) for o in out])


TARGET_SECTION = "static targets (sm_90 SASS, 16-bit, D = 64 and 128, the \"plain\" launch)"
FWD_TARGET, BWD_TARGET, MIN_WGMMA_N = 12.0, 25.0, 64
_D_16BIT = re.compile(r"d=(64|128),(bf16|fp16)")


def _target_loops(compiled: list[dict], kernel: re.Pattern) -> list[tuple[str, dict]]:
    """(name, loop) of every sm_90 16-bit D = 64 / 128 "plain" spec whose name matches ``kernel``."""
    out = []
    for r in compiled:
        if (r.get("error") or r.get("arch") != 90 or not kernel.match(r["name"]) or not _D_16BIT.search(r["name"])
                or not r["name"].endswith(",plain]")):
            continue
        out.extend((r["name"], lp) for lp in (r.get("extra") or {}).get("loops") or [])
    return out


def static_targets(compiled: list[dict]) -> list[tuple[str, str, str]]:
    """(target, verdict "met" / "NOT met" / "not compiled", worst figure) for the Triton static targets:
    forward <= 12 thread-instructions per score element in its unmasked loops (no FSEL), dQ / row
    statistics / sequence dK/dV (deterministic) <= 25 in every loop, wgmma N >= 64 for every forward
    GEMM and for the dK / dV GEMMs of the dK/dV loop (their N is D; the loop's K Q^T GEMM has N =
    BLOCK_M), and zero spills on every compile."""
    from .triton.sass_stats import wgmma_n

    fwd_all = _target_loops(compiled, re.compile(r"prefix_attn_fwd\["))
    fwd = [(n, lp) for n, lp in fwd_all if "FSEL" not in lp["ops"]]
    dq = _target_loops(compiled, re.compile(r"prefix_attn_bwd_(dq|stats)\["))
    dkdv = _target_loops(compiled, re.compile(r"prefix_attn_bwd_dkdv\["))

    def worst_ips(loops, limit):
        if not loops:
            return "not compiled", "-"
        name, lp = max(loops, key=lambda x: x[1]["instr_per_score"] or 0.0)
        w = lp["instr_per_score"] or 0.0
        return ("met" if w <= limit else "NOT met"), f"{w:.1f} ({name})"

    def min_n(loops, per_loop=min):
        if not loops:
            return "not compiled", "-"
        ns = [(per_loop(wgmma_n(lp) or [0]), name) for name, lp in loops]
        w, name = min(ns)
        return ("met" if w >= MIN_WGMMA_N else "NOT met"), f"N = {w} ({name})"

    spilled = [r["name"] + f" sm_{r['arch']}" for r in compiled if not r.get("error") and r.get("spills")]
    rows = [(f"forward unmasked loops <= {FWD_TARGET:g} instr/score", *worst_ips(fwd, FWD_TARGET)),
            (f"dQ and row-statistics loops <= {BWD_TARGET:g} instr/score", *worst_ips(dq, BWD_TARGET)),
            (f"sequence dK/dV loop (deterministic) <= {BWD_TARGET:g} instr/score", *worst_ips(dkdv, BWD_TARGET)),
            (f"forward wgmma N >= {MIN_WGMMA_N}", *min_n(fwd_all)),
            (f"dK/dV GEMMs (N = D) wgmma N >= {MIN_WGMMA_N}", *min_n(dkdv, max)),
            ("zero spills on every compile", "met" if compiled and not spilled else
             ("not compiled" if not compiled else "NOT met"), ", ".join(spilled[:3]) or "-")]
    return rows


def format_targets(rows: list[tuple[str, str, str]]) -> str:
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{t.ljust(w)}  {v.ljust(12)}  {fig}" for t, v, fig in rows)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="softprompt-kernels report", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="also write the report as JSON")
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compile targets (default: 90 80)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile processes")
    p.add_argument("--cache-dir", help="TRITON_CACHE_DIR for the compiles (default: Triton's cache)")
    p.add_argument("--no-compile", action="store_true", help="analytic part only")
    args = p.parse_args(argv)
    from .triton import aot

    rc = 0
    compiled: list[dict] = []
    if not args.no_compile:
        compiled = compile_results(args.arch, jobs=args.jobs, cache_dir=args.cache_dir)
        for arch in args.arch:
            mine = [r for r in compiled if r["arch"] in (arch, 0)]
            print(f"== shipped Triton kernel configurations compiled for sm_{arch} "
                  f"({aot.SM_LIMITS[arch].gpu}; theoretical occupancy; no GPU used) ==")
            print(aot.format_table(mine))
            print()
        errors = [r for r in compiled if r["error"]]
        spills = [r for r in compiled if not r["error"] and r["spills"]]
        print(f"{len(compiled)} compiles: {len(errors)} errors, {len(spills)} with spills, "
              f"triton {compiled[0]['triton_version'] if compiled else '?'}; "
              "compile_s = seconds the compile took on this host (no GPU involved).\n")
        rc = 1 if errors else 0
        if 90 in args.arch:
            print(f"== {LOOP_SECTION} ==")
            print(format_loops(loop_rows(compiled, 90)))
            print()
            print(f"== {TARGET_SECTION} ==")
            print(format_targets(static_targets(compiled)))
            print()
    rows = analytic_rows()
    print("== analytic FLOPs / minimum bytes per canonical shape ==")
    print(format_analytic(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"note": f"static report; no GPU was used; h100_floor_us is a {FLOOR_LABEL}",
                       "hardware_for_floor": H100_SXM, "compiled": compiled,
                       "main_loops_sm90": loop_rows(compiled, 90),
                       "static_targets": [dict(zip(("target", "verdict", "worst"), t)) for t in static_targets(compiled)],
                       "analytic": rows}, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
