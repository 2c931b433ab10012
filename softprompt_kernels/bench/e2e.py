"""End-to-end prefix-tuning training step: stock PEFT vs ``softprompt_kernels.apply``.

Model: GPT-2-small-shaped ``GPT2LMHeadModel`` from a config (random init, nothing
downloaded): 12 layers, 768 hidden, 12 heads, vocabulary 50257 (as GPT-2), wrapped by
PEFT ``PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True,
encoder_hidden_size=mid)``.  One step = forward with labels, backward, AdamW step on
the trainable (prefix) parameters, ``zero_grad``.

Modes (all on the same model and weights, in one process):
  ``peft``       stock PEFT (transformers' SDPA attention on the concatenated cache);
  ``ours``       after ``apply(model, backend=...)``;
  ``peft+ckpt``  stock PEFT with gradient checkpointing (attempted; PEFT's prefix cache
                 breaks under recomputation, the error is recorded);
  ``ours+ckpt``  ``apply`` + gradient checkpointing (non-reentrant).
Timing: the modes take turns step by step (round robin), ``warmup`` untimed steps
each first; the median of ``steps`` timed steps is reported, so a change of machine
load hits every mode alike.
Peak memory (CPU): before each timed step freed heap memory is returned to the OS
(``malloc_trim``) and the resident-set high-water mark is reset (``/proc/self/clear_refs``);
"step peak" = high-water mark during the step minus the resident set before it
(weights, optimizer state, libraries), "process peak" = the high-water mark itself.
The worker runs in a fresh subprocess (``python -m softprompt_kernels.bench.e2e``);
with ``isolated=True`` every mode's memory is measured again in its own fresh process.
On CUDA the same code reports ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional

MODES = ("peft", "ours", "peft+ckpt", "ours+ckpt")


@dataclass
class E2EConfig:
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    vocab: int = 50257
    P: int = 100
    mid: int = 512
    B: int = 8
    L: int = 256
    steps: int = 3
    warmup: int = 1
    attn_dropout: float = 0.1      # GPT-2's default attn_pdrop (resid/embd dropout stay at 0.1 too)
    varlen: bool = False           # right-padded batch, lengths in [L/2, L]
    backend: str = "torch"         # apply(..., backend=)
    modes: tuple = MODES
    threads: int = 0               # torch.set_num_threads (0: leave torch's default)

    @property
    def shape(self) -> str:
        return (f"GPT-2 {self.n_layer}L/{self.n_embd}/{self.n_head}h V{self.vocab} P{self.P} mid{self.mid} "
                f"B{self.B} L{self.L}{' varlen' if self.varlen else ''} attn-drop{self.attn_dropout:g}")


QUICK = E2EConfig(B=2, L=128, steps=2)
FULL = E2EConfig()


@dataclass
class ModeResult:
    mode: str
    times: list = field(default_factory=list)
    step_peaks: list = field(default_factory=list)      # bytes
    process_peaks: list = field(default_factory=list)   # bytes
    losses: list = field(default_factory=list)
    error: Optional[str] = None
    isolated_step_peak: Optional[int] = None
    isolated_process_peak: Optional[int] = None

    @property
    def median_s(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None

    @property
    def step_peak(self) -> Optional[int]:
        return max(self.step_peaks) if self.step_peaks else None

    @property
    def process_peak(self) -> Optional[int]:
        return max(self.process_peaks) if self.process_peaks else None


# ------------------------------------------------------------------------- worker
def _quiet():
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.logging.set_verbosity_error()


def build(cfg: E2EConfig, device: str):
    import torch
    import transformers as T
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    gcfg = T.GPT2Config(vocab_size=cfg.vocab, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        n_positions=max(1024, cfg.L + cfg.P), attn_pdrop=cfg.attn_dropout,
                        attn_implementation="sdpa")
    model = T.GPT2LMHeadModel(gcfg)
    pcfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.P, prefix_projection=True,
                              encoder_hidden_size=cfg.mid)
    model = get_peft_model(model, pcfg).to(device)
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab, (cfg.B, cfg.L), generator=g)
    mask = torch.ones(cfg.B, cfg.L, dtype=torch.long)
    if cfg.varlen:
        lengths = torch.randint(cfg.L // 2, cfg.L + 1, (cfg.B,), generator=g)
        lengths[0] = cfg.L
        mask = (torch.arange(cfg.L)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, batch, opt


def _set_ckpt(model, on: bool) -> None:
    base = model.get_base_model()
    if on:
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        fn = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
        fn()


def configure(model, mode: str, cfg: E2EConfig) -> None:
    from ..integrations.peft import apply, remove

    remove(model)
    _set_ckpt(model, False)
    if mode.startswith("ours"):
        apply(model, backend=cfg.backend)
    if mode.endswith("+ckpt"):
        _set_ckpt(model, True)


def train_step(model, batch, opt) -> float:
    out = model(**batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def _measured_step(model, batch, opt, device: str):
    """(seconds, step peak bytes, process peak bytes, loss) of one step."""
    import torch

    from .measure import hwm_bytes, reset_hwm, rss_bytes, trim_heap

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = train_step(model, batch, opt)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated()
        return dt, peak - base, peak, loss
    trim_heap()
    ok = reset_hwm()
    base = rss_bytes()
    t0 = time.perf_counter()
    loss = train_step(model, batch, opt)
    dt = time.perf_counter() - t0
    peak = hwm_bytes() if ok else None
    return dt, (None if peak is None or base is None else peak - base), peak, loss


def worker(cfg: E2EConfig, device: str, profile_dir: Optional[str] = None, progress=None) -> dict:
    """Runs every mode of ``cfg`` in this process; returns {mode: ModeResult as dict}."""
    import torch

    _quiet()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, batch, opt = build(cfg, device)
    results = {m: ModeResult(m) for m in cfg.modes}
    live = []
    for mode in cfg.modes:  # warm-up; a mode that fails is recorded and dropped
        try:
            configure(model, mode, cfg)
            for _ in range(cfg.warmup):
                train_step(model, batch, opt)
            live.append(mode)
        except Exception as e:  # noqa: BLE001 - recorded in the report
            opt.zero_grad(set_to_none=True)
            results[mode].error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if progress:
            progress(1)
    for _ in range(cfg.steps):
        for mode in live:
            configure(model, mode, cfg)
            dt, step_peak, proc_peak, loss = _measured_step(model, batch, opt, device)
            r = results[mode]
            r.times.append(dt)
            r.step_peaks.append(step_peak)
            r.process_peaks.append(proc_peak)
            r.losses.append(loss)
            if progress:
                progress(1)
    if profile_dir:
        from torch.profiler import ProfilerActivity, profile

        os.makedirs(profile_dir, exist_ok=True)
        for mode in live:
            configure(model, mode, cfg)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                train_step(model, batch, opt)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            with open(os.path.join(profile_dir, f"profile_{mode.replace('+', '_')}.txt"), "w") as f:
                f.write(f"# {cfg.shape}, mode {mode}, one step under torch.profiler\n{table}\n")
    configure(model, "peft", cfg)
    return {m: asdict(r) for m, r in results.items()}


# ------------------------------------------------------------------------- driver
def run(cfg: E2EConfig, device: str = "cpu", *, isolated: bool = False, profile_dir: Optional[str] = None,
        progress=None, timeout: Optional[float] = None) -> dict[str, ModeResult]:
    """Run ``worker`` in a fresh subprocess (and, with ``isolated``, one more per mode for memory)."""
    res = _spawn(cfg, device, profile_dir, progress, timeout)
    if isolated and not device.startswith("cuda"):
        for mode, r in res.items():
            if r.error is None:
                one = E2EConfig(**{**asdict(cfg), "modes": (mode,), "steps": 1})
                iso = _spawn(one, device, None, None, timeout)[mode]
                r.isolated_step_peak, r.isolated_process_peak = iso.step_peak, iso.process_peak
    return res


def _spawn(cfg: E2EConfig, device: str, profile_dir, progress, timeout) -> dict[str, ModeResult]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "softprompt_kernels.bench.e2e", "--config", json.dumps(asdict(cfg)),
               "--device", device, "--out", out]
        if profile_dir:
            cmd += ["--profile", profile_dir]
        if progress:
            cmd += ["--progress"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
        t0 = time.time()
        for line in proc.stdout:  # one "." per finished step
            if progress:
                progress(line.count("."))
            if timeout and time.time() - t0 > timeout:
                proc.kill()
                break
        err = proc.stderr.read()
        rc = proc.wait()
        if rc != 0 or not os.path.exists(out):
            msg = f"end-to-end worker failed (rc {rc}): {err.strip().splitlines()[-1] if err.strip() else ''}"
            return {m: ModeResult(m, error=msg) for m in cfg.modes}
        with open(out) as f:
            data = json.load(f)
    return {m: ModeResult(**d) for m, d in data.items()}


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="one end-to-end benchmark worker (used by softprompt_kernels.bench)")
    ap.add_argument("--config", required=True, help="E2EConfig as JSON")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)
    d = json.loads(a.config)
    d["modes"] = tuple(d["modes"])
    cfg = E2EConfig(**d)

    def tick(n):
        print("." * n, flush=True)

    res = worker(cfg, a.device, a.profile, tick if a.progress else None)
    with open(a.out, "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
