"""One benchmark result row, the printed table, the JSON file and the PNG plot."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class Row:
    suite: str                      # "attention fwd", "attention fwd+bwd", "prefix_mlp fwd+bwd", "train step", ...
    case: str                       # short id
    shape: str
    ours_s: Optional[float]         # median seconds (None: not available / failed)
    baseline_s: Optional[float]
    baseline: str                   # what the baseline is
    ours_peak: Optional[int] = None       # bytes above the memory in use before the call
    baseline_peak: Optional[int] = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> Optional[float]:
        """Speed-up: baseline time / our time (> 1: ours is faster)."""
        if self.ours_s and self.baseline_s:
            return self.baseline_s / self.ours_s
        return None

    @property
    def mem_ratio(self) -> Optional[float]:
        """Our peak memory / the baseline's (< 1: ours uses less)."""
        if self.ours_peak is not None and self.baseline_peak:
            return self.ours_peak / self.baseline_peak
        return None

    def to_json(self) -> dict:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["mem_ratio"] = self.mem_ratio
        return d


def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "n/a"
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


def _fmt_mib(b: Optional[int]) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f}"


def table_lines(rows: list[Row]) -> list[str]:
    """case | ours | baseline | ratio | peak memory (MiB, ours / baseline)."""
    header = (f"{'suite':20} {'case':14} {'shape':44} {'ours':>10} {'baseline':>10} {'ratio':>7}  "
              f"{'peak MiB ours/base':>19}  note")
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = "n/a" if r.ratio is None else f"{r.ratio:.2f}x"
        mem = f"{_fmt_mib(r.ours_peak)}/{_fmt_mib(r.baseline_peak)}"
        if r.mem_ratio is not None:
            mem += f" ({r.mem_ratio:.2f})"
        lines.append(f"{r.suite:20} {r.case:14} {r.shape[:44]:44} {_fmt_time(r.ours_s):>10} "
                     f"{_fmt_time(r.baseline_s):>10} {ratio:>7}  {mem:>19}  {r.note}")
    return lines


def write_json(path: str, env: dict, rows: list[Row], meta: Optional[dict] = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "meta": meta or {}, "rows": [r.to_json() for r in rows]}, f, indent=2)


def write_plot(path: str, env: dict, rows: list[Row]) -> bool:
    """Bar chart of speed-up and memory ratio per case (matplotlib Agg); False if nothing to plot."""
    rows = [r for r in rows if r.ratio is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.suite}: {r.case}" for r in rows]
    n = len(rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.32 * n + 1.8), sharey=True)
    y = list(range(n))
    speed = [r.ratio for r in rows]
    axes[0].barh(y, speed, color=["tab:green" if s >= 1 else "tab:red" for s in speed])
    axes[0].axvline(1.0, color="black", lw=0.8)
    axes[0].set_xlabel("speed-up (baseline time / ours)")
    mem = [r.mem_ratio if r.mem_ratio is not None else 0.0 for r in rows]
    axes[1].barh(y, mem, color=["tab:green" if 0 < m <= 1 else ("tab:gray" if m == 0 else "tab:red") for m in mem])
    axes[1].axvline(1.0, color="black", lw=0.8)
    axes[1].set_xlabel("peak memory (ours / baseline; 0 = not measured)")
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(labels, fontsize=7)
    axes[0].invert_yaxis()
    for ax, vals in ((axes[0], speed), (axes[1], mem)):
        for yi, v in zip(y, vals):
            if v:
                ax.text(v, yi, f" {v:.2f}", va="center", fontsize=6)
    fig.suptitle(f"softprompt-kernels on {env.get('device_name', env.get('device'))}\n"
                 f"torch {env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}",
                 fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
