"""``softprompt-kernels bench``: self-check, then the benchmark suites on the present device.

Prints a table (case, ours, baseline, ratio, peak memory), writes ``bench.json`` and
``bench.png`` into ``--out`` and checks the end-to-end targets of issue 6.  The quick
default finishes in a few minutes on a 2-core CPU; ``--full`` runs every shape and the
end-to-end step at the acceptance shape (GPT-2 small, B=8, L=256, P=100, mid 512).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, replace
from typing import Optional

import torch

from . import cases as cases_mod
from . import e2e
from .measure import environment
from .results import Row, table_lines, write_json, write_plot

SUITES = ("attention", "mlp", "e2e", "vpt")
TARGET_SPEEDUP = 1.10
TARGET_MEM = 0.85        # ours / PEFT peak without checkpointing
TARGET_CKPT_MEM = 0.50   # ours with checkpointing / PEFT peak


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softprompt-kernels bench", description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="every shape, more repeats, end-to-end at the acceptance shape")
    p.add_argument("--suite", action="append", choices=SUITES, help="run only this suite (repeatable)")
    p.add_argument("--no-selfcheck", action="store_true", help="skip the self-check that runs first")
    p.add_argument("--out", default="bench_results", help="directory for bench.json / bench.png (default %(default)s)")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per microbenchmark (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--e2e-steps", type=int, default=None, help="timed training steps per mode (median)")
    p.add_argument("--e2e-varlen", action="store_true", help="end-to-end step on a right-padded batch")
    p.add_argument("--e2e-attn-dropout", type=float, default=None,
                   help="end-to-end attention dropout (default: GPT-2's 0.1); 0 measures the fused CPU path")
    p.add_argument("--isolated", action="store_true", help="re-measure end-to-end memory in a fresh process per mode "
                   "(default with --full)")
    p.add_argument("--profile", action="store_true", help="write torch.profiler tables of one step per mode to --out")
    p.add_argument("--backend", default="auto", help="backend for our ops (auto: triton on CUDA, torch on CPU)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="microbenchmark dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--no-plot", action="store_true")
    return p


def _backend(name: str, device: str) -> str:
    if name != "auto":
        return name
    return "triton" if device.startswith("cuda") else "torch"


def e2e_rows(res: dict, cfg: e2e.E2EConfig) -> list[Row]:
    """Table rows of one end-to-end run (step peak memory; process peaks in ``extra``)."""
    def peak(r):
        return r.isolated_step_peak if r.isolated_step_peak is not None else r.step_peak

    def extra(*rs):
        return {r.mode: {"times": r.times, "step_peaks": r.step_peaks, "process_peaks": r.process_peaks,
                         "isolated_step_peak": r.isolated_step_peak, "isolated_process_peak": r.isolated_process_peak,
                         "losses": r.losses, "error": r.error} for r in rs if r is not None}

    peft, ours = res.get("peft"), res.get("ours")
    peft_ck, ours_ck = res.get("peft+ckpt"), res.get("ours+ckpt")
    rows = []
    if peft and ours:
        note = "; ".join(f"{r.mode} failed: {r.error}" for r in (peft, ours) if r.error)
        ex = extra(peft, ours)
        ex["round_speedups"] = round_speedups(peft, ours)
        rows.append(Row("train step", "no ckpt", cfg.shape, ours.median_s, peft.median_s, "PEFT",
                        peak(ours), peak(peft), note, ex))
    if ours_ck and peft:
        note = "baseline: PEFT without checkpointing"
        if peft_ck and peft_ck.error:
            note += f" (PEFT with checkpointing fails: {peft_ck.error})"
        rows.append(Row("train step", "ckpt", cfg.shape, ours_ck.median_s, peft.median_s, "PEFT (no ckpt)",
                        peak(ours_ck), peak(peft), note, extra(ours_ck, peft_ck)))
    return rows


def round_speedups(base, ours) -> list:
    """PEFT time / our time of each round (the two steps of a round ran back to back)."""
    return [b / o for b, o in zip(base.times, ours.times) if o]


def target_lines(rows: list[Row]) -> list[str]:
    """The issue's end-to-end targets, with the measured figures."""
    out = []
    by = {r.case: r for r in rows if r.suite == "train step"}
    r = by.get("no ckpt")
    if r is not None:
        sp, mr = r.ratio, r.mem_ratio
        out.append(f"  speed, no checkpointing: {'n/a' if sp is None else f'{sp:.2f}x'} "
                   f"(target >= {TARGET_SPEEDUP:.2f}x): {_verdict(sp is not None and sp >= TARGET_SPEEDUP)}")
        out.append(f"  step peak memory, no checkpointing: ours/PEFT = {'n/a' if mr is None else f'{mr:.2f}'} "
                   f"(target <= {TARGET_MEM:.2f}): {_verdict(mr is not None and mr <= TARGET_MEM)}")
    r = by.get("ckpt")
    if r is not None:
        mr = r.mem_ratio
        out.append(f"  step peak memory, ours with checkpointing / PEFT: {'n/a' if mr is None else f'{mr:.2f}'} "
                   f"(target <= {TARGET_CKPT_MEM:.2f}): {_verdict(mr is not None and mr <= TARGET_CKPT_MEM)}")
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(argv: Optional[list] = None) -> int:
    args = _parser().parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    suites = args.suite or list(SUITES)
    backend = _backend(args.backend, device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    repeat = args.repeat or (5 if args.full else 3)
    env = environment(device)
    print(f"softprompt-kernels bench on {env['device_name']}: torch {env['torch']}, triton {env['triton']}, "
          f"transformers {env['transformers']}, peft {env['peft']}; our backend {backend!r}, dtype "
          f"{str(dtype).replace('torch.', '')}")
    if device == "cpu":
        print("CPU run: ours = the PyTorch backend (the Triton interpreter is not a performance path); "
              "no GPU time is measured or implied.")
    rc = 0
    if not args.no_selfcheck:
        from .. import selfcheck

        rc = selfcheck.main([])
        print()

    att = cases_mod.attention_cases(args.full, device) if "attention" in suites else []
    mlp = cases_mod.mlp_cases(args.full, device) if "mlp" in suites else []
    cfg = None
    if "e2e" in suites:
        cfg = replace(e2e.FULL if args.full else e2e.QUICK, backend=backend,
                      varlen=args.e2e_varlen)
        if args.e2e_steps:
            cfg = replace(cfg, steps=args.e2e_steps)
        if args.e2e_attn_dropout is not None:
            cfg = replace(cfg, attn_dropout=args.e2e_attn_dropout)
    e2e_units = 0 if cfg is None else len(cfg.modes) * (cfg.warmup + cfg.steps)
    rows: list[Row] = []
    from tqdm import tqdm

    from . import micro

    with tqdm(total=len(att) + len(mlp) + e2e_units, desc="bench", unit="case", file=sys.stderr,
              disable=None) as bar:
        for c in att:
            bar.set_postfix_str(f"attention {c.name}")
            rows += micro.attention_rows(c, device=device, dtype=dtype, backend=backend,
                                         warmup=args.warmup, repeat=repeat)
            if device == "cpu" and c.causal and not c.padded and not c.dropout:
                rows.append(micro.floor_row(c, device=device, dtype=dtype, backend=backend,
                                            warmup=args.warmup, repeat=repeat))
            if device == "cuda":
                rows += micro.gpu_baseline_rows(c, device=device, dtype=dtype, backend=backend,
                                                warmup=args.warmup, repeat=repeat)
            bar.update(1)
        for c in mlp:
            bar.set_postfix_str(f"prefix_mlp {c.name}")
            rows += micro.mlp_rows(c, device=device, dtype=dtype, backend=backend,
                                   warmup=args.warmup, repeat=repeat)
            bar.update(1)
        if cfg is not None:
            bar.set_postfix_str("training step (subprocess)")
            res = e2e.run(cfg, device, isolated=args.isolated or args.full,
                          profile_dir=args.out if args.profile else None, progress=bar.update)
            rows += e2e_rows(res, cfg)
        if "vpt" in suites:
            from . import vpt

            bar.set_postfix_str("VPT-deep training step")
            rows += vpt.run(vpt.FULL if args.full else vpt.QUICK, device=device, dtype=dtype, backend=backend)
    reason = micro.flex_unavailable_reason(device)
    print()
    print("\n".join(table_lines(rows)))
    print("ratio = baseline time / our time (> 1: ours faster); peak MiB = memory above what was in use before "
          "the call (CPU: resident-set high-water mark, see softprompt_kernels/bench/measure.py); "
          "(x) = ours / baseline.")
    if reason and att:
        print(reason)
    if cfg is not None:
        for r in rows:
            if r.suite == "train step" and r.extra.get("round_speedups"):
                print(f"train step, PEFT/ours time per round (steps back to back): "
                      f"{', '.join(f'{x:.2f}' for x in r.extra['round_speedups'])}")
        scope = "" if args.full else " -- quick shape; the acceptance shape (B=8, L=256) runs with --full"
        print(f"\nEnd-to-end targets (issue 6) at {cfg.shape}{scope}:")
        print("\n".join(target_lines(rows)))
    vpt_rows = [r for r in rows if r.suite == "vpt-deep step"]
    if vpt_rows:
        from . import vpt

        print("\nVPT-deep targets (issue 13, N = 100 prompts):")
        print("\n".join(vpt.target_lines(vpt_rows)))
    os.makedirs(args.out, exist_ok=True)
    if vpt_rows and not args.no_plot:
        from . import vpt

        vpt.write_plot(os.path.join(args.out, "vpt.png"), vpt_rows)
    meta = {"full": args.full, "suites": suites, "repeat": repeat, "backend": backend,
            "dtype": str(dtype),
            "e2e_config": None if cfg is None else {**asdict(cfg), "modes": list(cfg.modes)},
            "targets": target_lines(rows), "flex": reason}
    try:
        env["loadavg_1m_end"] = os.getloadavg()[0]
    except OSError:
        pass
    write_json(os.path.join(args.out, "bench.json"), env, rows, meta)
    plotted = False if args.no_plot else write_plot(os.path.join(args.out, "bench.png"), env, rows)
    print(f"\nwrote {os.path.join(args.out, 'bench.json')}" +
          (f" and {os.path.join(args.out, 'bench.png')}" if plotted else ""))
    return rc
