"""Record stock-PEFT reference numbers for every family of ``families.py`` (a script, not a test).

    PYTHONPATH=/tmp/tf5.23.0 /work/main/.venv/bin/python tests/integrations/record_fixtures.py

writes ``tests/integrations/fixtures/peft-<transformers major.minor>/<family>-<proj|noproj>.pt``
(``torch.save`` of plain fp32 / int64 tensors) and ``manifest.json`` beside them.  Nothing from
softprompt_kernels is imported: these are stock PEFT's numbers.

Each ``.pt`` holds: ``batch`` (the inputs of ``families.batch_for``), ``logits``, ``loss``,
``grads`` ({trainable parameter name: grad}) of one forward + backward in eval mode, and for
causal LMs ``generate_cache`` / ``generate_nocache`` (greedy, ``GEN_NEW`` new tokens, left
padding; ``None`` where stock PEFT raises — the message is in the manifest) and
``greedy_forward`` (the same greedy decode by full forwards, ``families.greedy_forward``: an
independent check of both generate paths).
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import families as F  # noqa: E402


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def record_one(family: str, proj: bool):
    """(payload for torch.save or None, manifest entry)."""
    entry = {"task": str(F.task_of(family).value)}
    try:
        model = F.build(family, proj)
        batch = F.batch_for(model)
        logits, loss, grads = F.run(model, batch)
    except Exception as e:  # stock PEFT cannot run this family
        entry["stock"] = "fails: " + _err(e)
        return None, entry
    entry["stock"] = "runs"
    payload = {"batch": {k: v.clone() for k, v in batch.items()}, "logits": logits, "loss": loss, "grads": grads}
    if F.task_of(family) == F.TaskType.CAUSAL_LM:
        for key, use_cache in (("generate_cache", True), ("generate_nocache", False)):
            try:
                payload[key] = F.generate(model, batch, use_cache)
                entry[key] = "runs"
            except Exception as e:
                payload[key] = None
                entry[key] = "fails: " + _err(e)
        a, b = payload["generate_cache"], payload["generate_nocache"]
        entry["generate_agree"] = None if a is None or b is None else bool(torch.equal(a, b))
        payload["greedy_forward"] = g = F.greedy_forward(model, batch)
        entry["generate_cache_eq_greedy_forward"] = None if a is None else bool(torch.equal(a, g))
        entry["generate_nocache_eq_greedy_forward"] = None if b is None else bool(torch.equal(b, g))
    return payload, entry


def main(out_dir: Path | None = None):
    ver = ".".join(transformers.__version__.split(".")[:2])
    out_dir = out_dir or HERE / "fixtures" / f"peft-{ver}"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    fams = {}
    for family in F.FAMILIES:
        for proj in (True, False):
            name = f"{family}-{'proj' if proj else 'noproj'}"
            try:
                payload, entry = record_one(family, proj)
            except Exception:  # a bug here, not a stock-PEFT failure: stop loudly
                traceback.print_exc()
                raise
            if payload is not None:
                torch.save(payload, out_dir / f"{name}.pt")
                entry["file"] = f"{name}.pt"
            else:
                stale = out_dir / f"{name}.pt"
                if stale.exists():
                    stale.unlink()
            fams[name] = entry
            print(f"{name:22s} {json.dumps({k: v for k, v in entry.items() if k != 'task'})}", flush=True)
    manifest = {
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"PYTHONPATH={os.environ.get('PYTHONPATH', '')} {sys.executable} tests/integrations/record_fixtures.py",
        "seed": F.SEED,
        "num_virtual_tokens": F.P,
        "encoder_hidden_size": F.ENCODER_HIDDEN,
        "generate_new_tokens": F.GEN_NEW,
        "attn_implementation": "sdpa (gptj: eager)",
        "dropped_families": F.DROPPED,
        "families": fams,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    total = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"wrote {len(list(out_dir.glob('*.pt')))} fixtures to {out_dir} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
