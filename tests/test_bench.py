"""Smoke tests of the benchmark machinery (softprompt_kernels.bench): measurement, baselines,
table/JSON/PNG output, target verdicts, the runner."""
import json
import os

import pytest
import torch

from softprompt_kernels.bench import cases, e2e, micro, runner
from softprompt_kernels.bench.measure import peak_memory, time_call
from softprompt_kernels.bench.results import Row, table_lines, write_json, write_plot
from softprompt_kernels.ops.prefix_attention import prefix_attention

TINY_ATT = cases.AttentionCase("tiny", "tiny", 3, 4, 2, 19, 7, 16, True, padded=True)
TINY_MLP = cases.MlpCase("tiny", "tiny", 3, 5, 24, 16, 2, 3, 8)


def test_time_call_counts_and_peak_memory_sees_allocations():
    calls = []
    times = time_call(lambda: calls.append(1), warmup=2, repeat=3)
    assert len(times) == 3 and len(calls) == 5 and all(t >= 0 for t in times)
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("no /proc/self/clear_refs: CPU peak memory is not measured here")
    big = peak_memory(lambda: torch.ones(64 * 2**20 // 4).sum())  # 64 MiB, touched
    small = peak_memory(lambda: torch.ones(16).sum())
    assert big >= 56 * 2**20, big
    assert small < 16 * 2**20, small


def test_baselines_compute_the_same_numbers():
    assert micro.check_attention_equal(TINY_ATT, "cpu", torch.float32, "torch") < 1e-5
    gqa_nc = cases.AttentionCase("t", "t", 2, 6, 3, 13, 4, 8, False, padded=True)
    assert micro.check_attention_equal(gqa_nc, "cpu", torch.float32, "torch") < 1e-5
    assert micro.check_mlp_equal(TINY_MLP, "cpu", torch.float32, "torch") < 1e-5


@pytest.mark.parametrize("backward", [False, True])
def test_micro_rows(backward):
    ours, base = micro.attention_callables(TINY_ATT, "cpu", torch.float32, "torch", backward)
    row = micro.measure_pair("attention", "tiny", TINY_ATT.shape, "sdpa", ours, base, device="cpu", warmup=1, repeat=2)
    assert row.ours_s > 0 and row.baseline_s > 0 and row.ratio == pytest.approx(row.baseline_s / row.ours_s)
    rows = micro.mlp_rows(TINY_MLP, device="cpu", dtype=torch.float32, backend="torch", warmup=0, repeat=1)
    assert [r.suite for r in rows] == ["prefix_mlp fwd", "prefix_mlp fwd+bwd"]


def _mode(mode, t, peak, error=None):
    return e2e.ModeResult(mode, times=[t, t], step_peaks=[peak, peak], process_peaks=[peak + 10, peak + 10],
                          error=error)


def test_e2e_rows_and_target_verdicts():
    cfg = e2e.QUICK
    res = {"peft": _mode("peft", 2.0, 1000), "ours": _mode("ours", 1.6, 800),
           "peft+ckpt": e2e.ModeResult("peft+ckpt", error="RuntimeError: size mismatch"),
           "ours+ckpt": _mode("ours+ckpt", 2.2, 450)}
    rows = runner.e2e_rows(res, cfg)
    assert [r.case for r in rows] == ["no ckpt", "ckpt"]
    assert rows[0].ratio == pytest.approx(1.25) and rows[0].mem_ratio == pytest.approx(0.8)
    assert "PEFT with checkpointing fails" in rows[1].note
    lines = runner.target_lines(rows)
    assert "met" in lines[0] and "NOT" not in lines[0]
    assert "NOT" not in lines[1] and "NOT" not in lines[2]
    res["ours"] = _mode("ours", 1.9, 900)  # 1.05x and 0.90: both missed
    res["ours+ckpt"] = _mode("ours+ckpt", 2.2, 600)
    lines = runner.target_lines(runner.e2e_rows(res, cfg))
    assert all("NOT met" in line for line in lines)


def test_table_json_and_png(tmp_path):
    rows = [Row("attention fwd", "a", "B1", 0.5, 1.0, "sdpa", 10 * 2**20, 20 * 2**20),
            Row("train step", "ckpt", "B2", 2.0, 1.0, "PEFT", None, 5 * 2**20, note="x"),
            Row("prefix_mlp fwd", "m", "B3", None, 1.0, "peft", note="ours n/a")]
    text = "\n".join(table_lines(rows))
    for col in ("case", "ours", "baseline", "ratio", "peak MiB"):
        assert col in text
    assert "2.00x" in text and "0.50x" in text and "n/a" in text
    env = {"device": "cpu", "device_name": "test CPU", "torch": torch.__version__}
    write_json(str(tmp_path / "b.json"), env, rows, {"k": 1})
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["rows"][0]["ratio"] == pytest.approx(2.0) and data["rows"][2]["ratio"] is None
    from softprompt_kernels.bench.markdown import render

    md = render(str(tmp_path / "b.json"))
    assert "test CPU" in md and "| suite | case |" in md and "| 2.00x |" in md
    assert write_plot(str(tmp_path / "b.png"), env, rows)
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runner_main_end_to_end(tmp_path, monkeypatch, capsys):
    """The bench main job on tiny shapes: table, targets, JSON, PNG (the e2e worker runs in a subprocess)."""
    monkeypatch.setattr(cases, "attention_cases", lambda full, device: [TINY_ATT])
    monkeypatch.setattr(cases, "mlp_cases", lambda full, device: [TINY_MLP])
    tiny = e2e.E2EConfig(n_layer=2, n_embd=32, n_head=4, vocab=64, P=3, mid=8, B=2, L=8, steps=1)
    monkeypatch.setattr(e2e, "QUICK", tiny)
    from softprompt_kernels.bench import vpt

    monkeypatch.setattr(vpt, "QUICK", TINY_VPT)
    rc = runner.main(["--no-selfcheck", "--out", str(tmp_path), "--repeat", "1", "--backend", "torch"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "train step" in out and "End-to-end targets" in out and "PEFT with checkpointing fails" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    suites = {r["suite"] for r in data["rows"]}
    assert {"attention fwd", "attention fwd+bwd", "prefix_mlp fwd", "prefix_mlp fwd+bwd", "train step"} <= suites
    step = next(r for r in data["rows"] if r["case"] == "no ckpt")
    assert step["ours_s"] > 0 and step["baseline_s"] > 0
    assert (tmp_path / "bench.png").exists()
    assert "vpt-deep step" in suites and "VPT-deep targets" in out and (tmp_path / "vpt.png").exists()


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
@pytest.mark.parametrize("causal,padded,Hkv", [(True, True, 2), (False, True, 4), (True, False, 4)])
def test_flex_baseline_mask_is_prefix_attention(causal, padded, Hkv):
    """The (GPU-only, compiled) FlexAttention baseline's mask, run uncompiled here, equals the op."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    c = cases.AttentionCase("t", "t", 3, 4, Hkv, 19, 7, 16, causal, padded=padded)
    t = micro.attention_inputs(c, "cpu", torch.float32)
    leaves = [t[n] for n in ("q", "k", "v", "pk", "pv")]
    res = []
    with torch.no_grad():
        micro._flex_callable(c, t, leaves, False, compiled=False, result=res)()
        ours = prefix_attention(*leaves, causal=causal, key_padding_mask=t["mask"], backend="torch")
    torch.testing.assert_close(res[0], ours, atol=1e-5, rtol=1e-5)


def _tiny_vpt():
    from softprompt_kernels.bench import vpt

    return vpt.VPTConfig(layers=2, batch=2, prompts=(0, 3, 100), warmup=0, steps=1, hidden=32, heads=4, mlp=48,
                         image=32, patch=8)


TINY_VPT = _tiny_vpt()


def test_vpt_rows_targets_and_plot(tmp_path):
    """VPT bench on a tiny ViT: one row per N > 0, both formulations timed, targets stated for N = 100."""
    from softprompt_kernels.bench import vpt

    rows = vpt.run(TINY_VPT, backend="torch")
    assert [r.extra["prompts"] for r in rows] == [3, 100]
    assert all(r.ours_s > 0 and r.baseline_s > 0 and len(r.extra["token_times"]) == 1 for r in rows)
    lines = vpt.target_lines(rows)
    assert len(lines) == 2 and "target <= 0.75" in lines[0] and "target <= 0.8" in lines[1]
    assert vpt.write_plot(str(tmp_path / "vpt.png"), rows) and (tmp_path / "vpt.png").stat().st_size > 1000


def test_vpt_token_hooks_change_the_sequence_like_vpt():
    """The baseline really runs the prompts as tokens: layer i sees 1 + N + patches tokens."""
    from softprompt_kernels.bench import vpt

    model = vpt.build_vit(TINY_VPT)
    weight = torch.zeros(TINY_VPT.layers, 3, TINY_VPT.hidden)
    vpt.token_prompts(model, weight)
    seen = []
    layers = model.vit.encoder.layer if hasattr(model.vit, "encoder") else model.vit.layers
    for layer in layers:  # runs after the VPT hooks
        layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    out = model(pixel_values=torch.randn(1, 3, 32, 32), output_hidden_states=False)
    assert seen == [TINY_VPT.tokens + 3] * TINY_VPT.layers and out.logits.shape == (1, 100)


def test_floor_row_scales_the_no_prefix_floor_by_the_extra_keys():
    c = cases.AttentionCase("tiny-causal", "tiny", 2, 4, 2, 15, 6, 16, True)
    assert micro.floor_factor(c) == pytest.approx((6 + 8) / 8)
    assert micro.floor_factor(cases.AttentionCase("nc", "nc", 1, 2, 2, 10, 5, 8, False)) == pytest.approx(1.5)
    row = micro.floor_row(c, device="cpu", dtype=torch.float32, backend="torch", warmup=0, repeat=1)
    assert row.suite == "attention floor" and row.ours_s > 0
    assert row.baseline_s == pytest.approx(row.extra["floor_s"] * micro.floor_factor(c))
    assert "x 1.75" in row.baseline


def test_runner_e2e_attn_dropout_flag(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cfg, device, **kw):
        seen["cfg"] = cfg
        return {}
    monkeypatch.setattr(e2e, "run", fake_run)
    runner.main(["--no-selfcheck", "--suite", "e2e", "--e2e-attn-dropout", "0", "--out", str(tmp_path), "--no-plot"])
    assert seen["cfg"].attn_dropout == 0.0
