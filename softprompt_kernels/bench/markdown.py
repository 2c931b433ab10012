"""Markdown tables from ``bench.json`` files (for docs/results.md and the README).

    python -m softprompt_kernels.bench.markdown bench_results/bench.json [more.json ...]
"""
from __future__ import annotations

import json
import sys


def _t(s) -> str:
    if s is None:
        return "n/a"
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f}"


def environment_line(env: dict) -> str:
    load = env.get("loadavg_1m_start"), env.get("loadavg_1m_end")
    load_s = "" if load[0] is None else f"; 1-min load average {load[0]:.1f} at start, {load[1] or 0:.1f} at end"
    return (f"Device: {env.get('device_name')}; torch {env.get('torch')}, triton {env.get('triton')}, "
            f"transformers {env.get('transformers')}, peft {env.get('peft')}, Python {env.get('python')}{load_s}.")


def rows_table(rows: list) -> str:
    out = ["| suite | case | shape | ours | baseline | speed-up | peak MiB ours / baseline |",
           "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = "n/a" if r.get("ratio") is None else f"{r['ratio']:.2f}x"
        mem = f"{_mib(r.get('ours_peak'))} / {_mib(r.get('baseline_peak'))}"
        if r.get("mem_ratio") is not None:
            mem += f" ({r['mem_ratio']:.2f})"
        out.append(f"| {r['suite']} | {r['case']} | {r['shape']} | {_t(r.get('ours_s'))} | "
                   f"{_t(r.get('baseline_s'))} | {ratio} | {mem} |")
    return "\n".join(out)


def render(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    parts = [environment_line(data["environment"]), "", rows_table(data["rows"])]
    targets = data.get("meta", {}).get("targets")
    if targets:
        cfg = data.get("meta", {}).get("e2e_config") or {}
        at = f" at B={cfg.get('B')}, L={cfg.get('L')}" if cfg else ""
        if cfg and not data.get("meta", {}).get("full"):
            at += " (quick shape, not the acceptance shape)"
        parts += ["", f"End-to-end targets{at}:", ""] + [f"- {t.strip()}" for t in targets]
    return "\n".join(parts)


def main(argv=None) -> int:
    for p in (argv if argv is not None else sys.argv[1:]):
        print(render(p))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
