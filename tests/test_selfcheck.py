"""The self-check the main job (`./dev bench`) runs first: it must pass on the CPU path and fail on a wrong op."""
import torch

from softprompt_kernels import selfcheck


def test_selfcheck_passes_on_the_cpu_path():
    rows = selfcheck.run_checks("torch", "cpu")
    assert {r.op for r in rows} == {"prefix_attention", "prefix_mlp"}
    bad = [(r.op, r.case, r.worst) for r in rows if not r.ok]
    assert not bad, bad


def test_selfcheck_flags_a_slightly_wrong_attention(monkeypatch):
    real = selfcheck.prefix_attention

    def off_by_a_little(*args, **kwargs):
        out = real(*args, **kwargs)
        return out + 1e-4 * out.detach().abs().amax()

    monkeypatch.setattr(selfcheck, "prefix_attention", off_by_a_little)
    rows = [selfcheck._attention_case(c, torch.float32, "cpu", "torch") for c in selfcheck.ATTENTION_CASES]
    assert all(not r.ok for r in rows), [(r.case, r.worst) for r in rows]
