"""Stock-PEFT reference numbers for the families of ``families.py``.

``peft_oracle(family, prefix_projection)`` gives (logits, loss, grads) of stock PEFT: live on
the installed transformers when stock PEFT runs there without raising, else the fixture
recorded under transformers 5.23 (``fixtures/peft-5.23``, see ``record_fixtures.py``).  The
result unpacks as a 3-tuple (so it works with ``hf_tiny.assert_same``) and carries
``.source`` ("live" / "fixture") and ``.live_error`` (why live failed, or None).

``check_live_against_fixture`` tells whether the installed transformers still gives the
recorded numbers for stock PEFT (atol = rtol = 1e-5), and if not, which tensors differ.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

import families as F

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "peft-5.23"
ATOL = RTOL = 1e-5


def fixture_name(family: str, prefix_projection: bool) -> str:
    return f"{family}-{'proj' if prefix_projection else 'noproj'}"


def fixture_path(family: str, prefix_projection: bool) -> Path:
    return FIXTURE_DIR / f"{fixture_name(family, prefix_projection)}.pt"


@functools.lru_cache(maxsize=None)
def manifest() -> dict:
    return json.loads((FIXTURE_DIR / "manifest.json").read_text())


@functools.lru_cache(maxsize=None)
def _load(family: str, prefix_projection: bool) -> dict:
    return torch.load(fixture_path(family, prefix_projection), map_location="cpu", weights_only=True)


def load_fixture(family: str, prefix_projection: bool) -> dict:
    """The recorded payload: batch, logits, loss, grads (+ generate_cache / generate_nocache for
    causal LMs, None where stock PEFT raised under 5.23).  Tensors are cloned: callers may
    modify them."""
    d = _load(family, prefix_projection)
    return {k: (v.clone() if isinstance(v, torch.Tensor) else
                {n: g.clone() for n, g in v.items()} if isinstance(v, dict) else v) for k, v in d.items()}


class Oracle(tuple):
    """(logits, loss, grads) + ``source`` ("live" | "fixture") + ``live_error``."""

    def __new__(cls, logits, loss, grads, source, live_error=None):
        self = super().__new__(cls, (logits, loss, grads))
        self.source = source
        self.live_error = live_error
        return self

    logits = property(lambda self: self[0])
    loss = property(lambda self: self[1])
    grads = property(lambda self: self[2])


def live(family: str, prefix_projection: bool, attn: str = "sdpa"):
    """Stock PEFT on the installed transformers (raises where stock PEFT does)."""
    model = F.build(family, prefix_projection, attn=attn)
    return F.run(model, F.batch_for(model))


def _attn_recorded(family: str, attn: str) -> bool:
    return attn == "sdpa" or family == "gptj"  # gptj is always eager (see families.py)


def peft_oracle(family: str, prefix_projection: bool, attn: str = "sdpa") -> Oracle:
    try:
        return Oracle(*live(family, prefix_projection, attn), source="live")
    except Exception as e:  # noqa: BLE001 - any stock failure means: use the recording
        err = f"{type(e).__name__}: {e}"
    if not _attn_recorded(family, attn):
        raise RuntimeError(f"stock PEFT fails live for {family} ({err}) and fixtures exist for sdpa only")
    d = load_fixture(family, prefix_projection)
    check_batch(family, prefix_projection)
    return Oracle(d["logits"], d["loss"], d["grads"], source="fixture", live_error=err)


def fixture_generate(family: str, prefix_projection: bool, use_cache: bool = True):
    """Tokens of stock PEFT greedy generate recorded under 5.23 (None where it raised there)."""
    return load_fixture(family, prefix_projection)["generate_cache" if use_cache else "generate_nocache"]


def fixture_greedy(family: str, prefix_projection: bool):
    """Greedy tokens by full stock forwards (``families.greedy_forward``) recorded under 5.23;
    equal to 5.23's stock cached generate for every causal family."""
    return load_fixture(family, prefix_projection)["greedy_forward"]


def check_batch(family: str, prefix_projection: bool):
    """``families.batch_for`` still builds the recorded inputs."""
    rec = _load(family, prefix_projection)["batch"]
    model = F.build(family, prefix_projection)
    now = F.batch_for(model)
    assert rec.keys() == now.keys(), (rec.keys(), now.keys())
    for k in rec:
        assert torch.equal(rec[k], now[k]), f"{family}: batch_for()['{k}'] differs from the fixture"


def compare(a, b, atol: float = ATOL, rtol: float = RTOL) -> list[str]:
    """Mismatches between two (logits, loss, grads): [] when they agree."""
    out = []

    def one(name, x, y):
        if x.shape != y.shape:
            out.append(f"{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
        elif not torch.allclose(x, y, atol=atol, rtol=rtol):
            out.append(f"{name}: max abs diff {(x - y).abs().max().item():.3g}")

    one("logits", a[0], b[0])
    one("loss", a[1], b[1])
    ga, gb = a[2], b[2]
    if ga.keys() != gb.keys():
        out.append(f"grad names differ: only live {sorted(ga.keys() - gb.keys())}, "
                   f"only fixture {sorted(gb.keys() - ga.keys())}")
    for n in sorted(ga.keys() & gb.keys()):
        one(f"grad {n}", ga[n], gb[n])
    return out


def check_live_against_fixture(family: str, prefix_projection: bool, attn: str = "sdpa"):
    """("agree", []) | ("differ", [mismatch, ...]) | ("live-fails", [error message])."""
    try:
        got = live(family, prefix_projection, attn)
    except Exception as e:  # noqa: BLE001
        return "live-fails", [f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
    d = _load(family, prefix_projection)
    bad = compare(got, (d["logits"], d["loss"], d["grads"]))
    return ("differ" if bad else "agree"), bad


def _maxdiff(a, b) -> float:
    m = max((a[0] - b[0]).abs().max().item(), (a[1] - b[1]).abs().item())
    for n in a[2].keys() & b[2].keys():
        m = max(m, (a[2][n] - b[2][n]).abs().max().item())
    return m


def report():
    """One line per family x proj on the installed transformers: stock forward status, max abs
    diff vs the fixture, and live stock generate (cached / use_cache=False) vs the recorded
    greedy-by-forwards tokens (ok / WRONG / FAILS)."""
    import transformers

    print(f"transformers {transformers.__version__}  vs  {FIXTURE_DIR.name} ({manifest()['transformers']})")
    for family in F.FAMILIES:
        for proj in (True, False):
            name = fixture_name(family, proj)
            d = _load(family, proj)
            try:
                model = F.build(family, proj)
                batch = F.batch_for(model)
                got = F.run(model, batch)
            except Exception as e:  # noqa: BLE001
                print(f"{name:22s} stock FAILS: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            bad = compare(got, (d["logits"], d["loss"], d["grads"]))
            line = f"{name:22s} stock runs, {'AGREE' if not bad else 'DIFFER'} (max |diff| {_maxdiff(got, (d['logits'], d['loss'], d['grads'])):.2g})"
            if bad:
                line += f" {bad[:3]}"
            if F.task_of(family) == F.TaskType.CAUSAL_LM:
                for key, uc in (("generate_cache", True), ("generate_nocache", False)):
                    try:
                        tok = F.generate(model, batch, uc)
                    except Exception as e:  # noqa: BLE001
                        line += f" | {key}: FAILS ({type(e).__name__})"
                        continue
                    line += f" | {key}: {'ok' if torch.equal(tok, d['greedy_forward']) else 'WRONG'}"
            print(line, flush=True)


if __name__ == "__main__":
    import sys
    import warnings

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    warnings.simplefilter("ignore")
    report()
