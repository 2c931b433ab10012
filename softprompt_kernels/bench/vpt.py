"""VPT-deep training step: prompts as a prefix (``add_visual_prompts``) vs the token formulation.

Model: a ViT-S-like ``ViTForImageClassification`` from a config with random init (hidden 384,
6 heads of 64, MLP 1536, 224 px, patch 16 -> 197 tokens, 100 classes; quick: 4 layers, batch 2;
full: 12 layers, batch 8).  VPT trains prompts + head: the base is frozen.  One step = forward with labels,
backward, SGD step.  Token formulation (what VPT's code does): the N prompts of layer i are
concatenated after CLS before layer i and dropped after it; the same model with
transformers' own SDPA attention.  Ours: ``add_visual_prompts(deep=True)`` (prompt K/V
computed once per step, the prefix read by ``prefix_attention``).  The two modes run
alternately, step by step; medians are reported, plus the peak memory of one step.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch

from . import measure
from .results import Row


@dataclass(frozen=True)
class VPTConfig:
    layers: int = 6
    batch: int = 4
    prompts: tuple = (0, 50, 100, 200)
    warmup: int = 1
    steps: int = 3
    hidden: int = 384
    heads: int = 6
    mlp: int = 1536
    image: int = 224
    patch: int = 16

    @property
    def tokens(self) -> int:
        return 1 + (self.image // self.patch) ** 2


QUICK = VPTConfig(layers=4, batch=2, steps=2)
FULL = VPTConfig(layers=12, batch=8, steps=5)


def build_vit(c: VPTConfig):
    import transformers as T

    cfg = T.ViTConfig(image_size=c.image, patch_size=c.patch, hidden_size=c.hidden, num_hidden_layers=c.layers,
                      num_attention_heads=c.heads, intermediate_size=c.mlp, num_labels=100,
                      attn_implementation="sdpa")
    model = T.ViTForImageClassification(cfg)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("classifier"))
    return model


def token_prompts(model, weight: torch.Tensor) -> list:
    """Hooks that run VPT-deep as tokens: layer i sees [CLS, prompts_i, patches]; returns handles."""
    n = weight.shape[1]
    layers = model.vit.encoder.layer if hasattr(model.vit, "encoder") else model.vit.layers
    handles = []
    for i, layer in enumerate(layers):
        def pre(_m, args, kwargs, i=i):
            x = args[0]
            keep = x[:, 1 + n:] if i > 0 else x[:, 1:]
            p = weight[i].unsqueeze(0).expand(x.shape[0], -1, -1)
            return (torch.cat((x[:, :1], p, keep), 1),) + tuple(args[1:]), kwargs
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    handles.append(model.vit.layernorm.register_forward_pre_hook(
        lambda _m, args: (torch.cat((args[0][:, :1], args[0][:, 1 + n:]), 1),)))
    return handles


def _step_fn(model, params, px, labels):
    opt = torch.optim.SGD(params, lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        model(pixel_values=px, labels=labels).loss.backward()
        opt.step()
    return step


def run(cfg: VPTConfig = QUICK, *, device: str = "cpu", dtype=torch.float32, backend: str = "torch") -> list[Row]:
    """One Row per prompt count N > 0 (ours vs token formulation); N = 0 is the plain model."""
    from ..integrations.vision import add_visual_prompts

    torch.manual_seed(0)
    px = torch.randn(cfg.batch, 3, cfg.image, cfg.image, device=device, dtype=dtype)
    labels = torch.randint(0, 100, (cfg.batch,), device=device)
    plain = build_vit(cfg).to(device=device, dtype=dtype)
    plain_step = _step_fn(plain, [p for p in plain.parameters() if p.requires_grad], px, labels)
    plain_times = measure.time_call(plain_step, warmup=cfg.warmup, repeat=cfg.steps, device=device)
    plain_peak = measure.peak_memory(plain_step, device)
    rows = []
    for n in [p for p in cfg.prompts if p > 0]:
        ours = build_vit(cfg).to(device=device, dtype=dtype)
        ours.load_state_dict(plain.state_dict())
        prompts = add_visual_prompts(ours, n, deep=True, backend=backend)
        ours_step = _step_fn(ours, [p for p in ours.parameters() if p.requires_grad], px, labels)
        tok = build_vit(cfg).to(device=device, dtype=dtype)
        tok.load_state_dict(plain.state_dict())
        weight = torch.nn.Parameter(prompts.weight.detach().clone())
        token_prompts(tok, weight)
        tok_step = _step_fn(tok, [p for p in tok.parameters() if p.requires_grad] + [weight], px, labels)
        t_ours, t_tok = [], []
        for i in range(cfg.warmup + cfg.steps):  # alternate, step by step
            for fn, acc in ((ours_step, t_ours), (tok_step, t_tok)):
                measure._sync(device)
                t0 = time.perf_counter()
                fn()
                measure._sync(device)
                if i >= cfg.warmup:
                    acc.append(time.perf_counter() - t0)
        rows.append(Row(
            suite="vpt-deep step", case=f"N={n}", shape=f"ViT {cfg.hidden}d x{cfg.layers} layers, B={cfg.batch}, {cfg.tokens} tok",
            ours_s=statistics.median(t_ours), baseline_s=statistics.median(t_tok),
            baseline="prompts as tokens (SDPA)", ours_peak=measure.peak_memory(ours_step, device),
            baseline_peak=measure.peak_memory(tok_step, device),
            extra={"prompts": n, "plain_s": statistics.median(plain_times), "plain_peak": plain_peak,
                   "ours_times": t_ours, "token_times": t_tok}))
    return rows


def target_lines(rows: list[Row]) -> list[str]:
    """Issue 13's CPU targets at N = 100: time <= 0.75x, peak memory <= 0.8x of the token formulation."""
    out = []
    for r in rows:
        if r.extra.get("prompts") != 100:
            continue
        t = r.ours_s / r.baseline_s if r.ours_s and r.baseline_s else None
        m = r.ours_peak / r.baseline_peak if r.ours_peak and r.baseline_peak else None
        out.append(f"VPT-deep N=100 step time ours/token = {t:.2f} (target <= 0.75): "
                   f"{'met' if t is not None and t <= 0.75 else 'NOT met'}" if t is not None else
                   "VPT-deep N=100 step time: n/a")
        out.append(f"VPT-deep N=100 step peak memory ours/token = {m:.2f} (target <= 0.8): "
                   f"{'met' if m is not None and m <= 0.8 else 'NOT met'}" if m is not None else
                   "VPT-deep N=100 peak memory: n/a")
    return out


def write_plot(path: str, rows: list[Row]) -> bool:
    """Step time and peak memory vs number of prompts, both formulations; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = sorted(rows, key=lambda r: r.extra["prompts"])
    if not rows:
        return False
    ns = [0] + [r.extra["prompts"] for r in rows]
    plain_s, plain_m = rows[0].extra["plain_s"], rows[0].extra["plain_peak"] or 0
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ns, [plain_s] + [r.ours_s for r in rows], "o-", label="prefix (ours)")
    a.plot(ns, [plain_s] + [r.baseline_s for r in rows], "s--", label="tokens (VPT)")
    a.set_xlabel("deep prompts per layer")
    a.set_ylabel("training step, s (median)")
    a.legend()
    mib = 1 / 2**20
    b.plot(ns, [plain_m * mib] + [(r.ours_peak or 0) * mib for r in rows], "o-", label="prefix (ours)")
    b.plot(ns, [plain_m * mib] + [(r.baseline_peak or 0) * mib for r in rows], "s--", label="tokens (VPT)")
    b.set_xlabel("deep prompts per layer")
    b.set_ylabel("step peak, MiB")
    b.legend()
    fig.suptitle(rows[0].shape)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Optional[list] = None) -> int:
    import argparse
    import os

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="12 layers, batch 8, 5 steps")
    p.add_argument("--out", default="bench_results")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = run(FULL if args.full else QUICK, device=device, dtype=dtype,
               backend="auto" if device == "cuda" else "torch")
    for r in rows:
        print(f"{r.case:6s} ours {r.ours_s:.3f} s  tokens {r.baseline_s:.3f} s  ratio {r.ratio:.2f}  "
              f"peak ours {(r.ours_peak or 0) / 2**20:.0f} MiB tokens {(r.baseline_peak or 0) / 2**20:.0f} MiB")
    print("\n".join(target_lines(rows)))
    os.makedirs(args.out, exist_ok=True)
    if write_plot(os.path.join(args.out, "vpt.png"), rows):
        print(f"wrote {os.path.join(args.out, 'vpt.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
