"""``softprompt-kernels report``: analytic FLOP / byte formulas and output labelling (compiles mocked)."""
import json
import re

import pytest

from softprompt_kernels import report
from softprompt_kernels.report import Shape


def test_flops_non_causal_hand_computed():
    s = Shape("x", B=2, Hq=4, Hkv=2, L=8, S=8, P=3, D=16, causal=False, model="m")
    fwd = 4 * 2 * 4 * 8 * (3 + 8) * 16          # 45056
    assert fwd == 45056
    fl = report.attention_flops(s)
    assert fl["fwd"] == 45056 and fl["bwd"] == 112640 and fl["fwd+bwd"] == 157696


def test_flops_causal_halves_sequence_part_only():
    s = Shape("x", B=1, Hq=2, Hkv=1, L=10, S=10, P=4, D=8, causal=True, model="m")
    # keys per query: 4 prefix (never masked) + 10 / 2 sequence
    assert report.effective_keys(s) == 9
    assert report.attention_flops(s)["fwd"] == 4 * 1 * 2 * 10 * 9 * 8 == 5760
    # decoding-style S > L: causal sees S - L/2 sequence keys on average
    s2 = Shape("x", B=1, Hq=1, Hkv=1, L=4, S=12, P=0, D=8, causal=True, model="m")
    assert report.effective_keys(s2) == 10
    # the continuous approximation vs the exact visible count (L(S-L) + L(L+1)/2 = 42 -> 10.5 per row)
    assert abs(report.effective_keys(s2) - (4 * 8 + 4 * 5 / 2) / 4) == 0.5


def test_min_bytes_hand_computed():
    s = Shape("x", B=2, Hq=4, Hkv=2, L=8, S=16, P=3, D=16, causal=False, model="m")
    q = 2 * 4 * 8 * 16            # 1024 elements
    kv = 2 * 2 * 2 * 16 * 16      # 2048 (k and v)
    pkv = 2 * 2 * 3 * 16          # 192  (prefix k and v, no batch dimension)
    lse = 2 * 4 * 8 * 4           # 256 bytes
    fwd = 2 * (q + kv + pkv + q) + lse                   # read q,k,v,prefix; write out; write lse
    bwd = 2 * (q + kv + pkv + q + q) + lse + 2 * (q + kv + pkv)  # + out, dout; write dq,dk,dv,dprefix
    assert (fwd, bwd) == (2 * 4288 + 256, 2 * 5312 + 256 + 2 * 3264) == (8832, 17408)
    by = report.attention_min_bytes(s)
    assert by == {"fwd": 8832, "bwd": 17408, "fwd+bwd": 8832 + 17408}


def test_prefix_bytes_do_not_scale_with_batch():
    a = Shape("x", B=1, Hq=4, Hkv=4, L=8, S=8, P=100, D=64, causal=False, model="m")
    b = Shape("x", B=2, Hq=4, Hkv=4, L=8, S=8, P=100, D=64, causal=False, model="m")
    per_row = report.attention_min_bytes(b)["fwd"] - report.attention_min_bytes(a)["fwd"]
    prefix = 2 * 2 * 4 * 100 * 64
    assert report.attention_min_bytes(a)["fwd"] - per_row == prefix


def test_roofline_floor_picks_the_binding_limit():
    hw = report.H100_SXM
    assert report.roofline_floor_s(989e12, 1.0, hw) == pytest.approx(1.0)           # compute bound
    assert report.roofline_floor_s(1.0, 3.35e12, hw) == pytest.approx(1.0)          # memory bound
    assert report.roofline_floor_s(989e9, 3.35e12, hw) == pytest.approx(1.0)
    rows = report.analytic_rows()
    assert len(rows) == 2 * len(report.CANONICAL_SHAPES)
    for r in rows:
        expect = max(r["flops"] / 989e12, r["min_bytes"] / 3.35e12) * 1e6
        assert r["h100_floor_us"] == pytest.approx(expect)
        assert r["bound"] == ("compute" if r["flops"] / 989e12 >= r["min_bytes"] / 3.35e12 else "memory")


def test_canonical_shapes_match_issue():
    by = {s.case: s for s in report.CANONICAL_SHAPES}
    assert (by["table-to-text"].P, by["table-to-text"].L) == (10, 128)
    assert (by["summarization"].P, by["summarization"].L) == (200, 512)
    assert (by["p-tuning-v2 cls"].P, by["p-tuning-v2 cls"].L) == (20, 128)
    assert (by["seq labelling"].P, by["seq labelling"].L) == (100, 256)
    llm = by["LLM GQA"]
    assert (llm.P, llm.L, llm.Hq, llm.Hkv, llm.D, llm.causal) == (64, 2048, 32, 8, 128, True)
    # LLM fwd by hand: 4 * 4 * 32 * 2048 * (64 + 1024) * 128
    assert report.attention_flops(llm)["fwd"] == 4 * 4 * 32 * 2048 * 1088 * 128


FAKE = [
    dict(module="softprompt_kernels.triton.prefix_attention", name="prefix_attn_fwd[d=64,bf16]", arch=arch,
         kernel="k", num_warps=4, num_stages=3, expect_wgmma=True, regs=168, stack_bytes=0, local_bytes=0,
         spills=False, shared_static=0, shared_dynamic=49152, shared_bytes=49152, blocks_per_sm=3, warps_per_sm=12,
         occupancy_pct=18.8, occupancy_limiter="registers", wgmma=arch == 90, compile_s=1.5,
         triton_version="3.9.0", error=None,
         extra={"loops": [{"start": 0x1a60, "end": 0x2f50, "instructions": 467, "mma": {"m64n128k16": 4, "m64n64k16": 8},
                           "mma_flops": 2 ** 22, "scores_per_iter": 8192, "instr_per_score": 467 * 4 * 32 / 8192,
                           "ops": {"FFMA": 66}},
                          {"start": 0x3000, "end": 0x4000, "instructions": 670, "mma": {"m64n128k16": 4},
                           "mma_flops": 2 ** 22, "scores_per_iter": 8192, "instr_per_score": 670 * 4 * 32 / 8192,
                           "ops": {"FSEL": 64}}]} if arch == 90 else {})
    for arch in (90, 80)
]


def _run(monkeypatch, capsys, argv, fake=FAKE):
    calls = []

    def fake_compile(archs, jobs=None, cache_dir=None):
        calls.append(list(archs))
        return [dict(r) for r in fake]

    monkeypatch.setattr(report, "compile_results", fake_compile)
    rc = report.main(argv)
    return rc, capsys.readouterr().out, calls


def test_report_output_labels_floor_and_has_no_measured_time(monkeypatch, capsys, tmp_path):
    out_json = tmp_path / "r.json"
    rc, out, calls = _run(monkeypatch, capsys, ["--json", str(out_json)])
    assert rc == 0 and calls == [[90, 80]]
    assert "roofline floor, not a measurement" in out
    assert "sm_90" in out and "sm_80" in out and "prefix_attn_fwd[d=64,bf16]" in out
    assert out.index("compiled for sm_90") < out.index("compiled for sm_80")
    for case in ("table-to-text", "summarization", "p-tuning-v2 cls", "seq labelling", "LLM GQA"):
        assert case in out
    # Nothing that reads like a measured GPU time: every time unit sits in the floor column,
    # whose header says 'floor', and no measurement vocabulary appears.
    assert not re.search(r"\b(median|mean|measured|latency|elapsed|it/s|ms/iter)\b", out, re.I)
    assert not re.search(r"\d\s*(ms|µs|us|ns)\b", out)
    header = next(line for line in out.splitlines() if line.startswith("case "))
    assert header.rstrip().endswith("H100 floor us")
    data = json.loads(out_json.read_text())
    assert "not a measurement" in data["note"]
    assert len(data["compiled"]) == 2 and len(data["analytic"]) == 10
    assert all("h100_floor_us" in r and not any("time" in k for k in r) for r in data["analytic"])


def test_report_exit_status_on_compile_error(monkeypatch, capsys):
    bad = [dict(FAKE[0], error="CompilationError: boom")]
    rc, out, _ = _run(monkeypatch, capsys, ["--arch", "90"], fake=bad)
    assert rc == 1 and "CompilationError: boom" in out
    assert "roofline floor, not a measurement" in out      # analytic part still printed


def test_report_no_compile(monkeypatch, capsys):
    rc, out, calls = _run(monkeypatch, capsys, ["--no-compile"])
    assert rc == 0 and calls == [] and "roofline floor, not a measurement" in out


def test_report_main_loop_section(monkeypatch, capsys, tmp_path):
    out_json = tmp_path / "r.json"
    rc, out, _ = _run(monkeypatch, capsys, ["--json", str(out_json)])
    assert rc == 0
    assert "== main-loop instructions per score element (sm_90 SASS) ==" in out
    sec = out[out.index("main-loop instructions per score element (sm_90 SASS) =="):out.index("== analytic")]
    rows = [ln for ln in sec.splitlines() if ln.startswith("prefix_attn_fwd[d=64,bf16]")]
    assert len(rows) == 2                                   # one per loop, sm_90 only
    assert rows[0].split()[1:4] == ["0", "467", "4"] and "7.3" in rows[0].split() and "m64n128k16x4" in rows[0]
    assert "10.5" in rows[1].split()
    data = json.loads(out_json.read_text())
    assert [r["instructions"] for r in data["main_loops_sm90"]] == [467, 670]
    rc, out, _ = _run(monkeypatch, capsys, ["--arch", "80"])
    assert "main-loop instructions" not in out


def _loop(ips, mma, ops=None):
    return {"instructions": 1, "mma": mma, "mma_flops": 1, "scores_per_iter": 1, "instr_per_score": ips,
            "ops": ops or {}}


def _compiled(name, loops, arch=90, spills=False):
    return dict(FAKE[0], name=name, arch=arch, spills=spills, extra={"loops": loops})


def test_static_targets_verdicts():
    """Met, NOT met and not compiled, from compiled rows: the forward counts only its unmasked loops
    (no FSEL), the dK/dV wgmma target reads the largest N of the loop (the dK / dV GEMMs)."""
    good = [
        _compiled("prefix_attn_fwd[d=64,bf16,sm90,plain]", [_loop(7.3, {"m64n128k16": 4}),
                                                           _loop(30.0, {"m64n64k16": 4}, {"FSEL": 8})]),
        _compiled("prefix_attn_fwd[d=128,fp16,sm90,full]", [_loop(80.0, {"m64n32k16": 4})]),  # not "plain"
        _compiled("prefix_attn_bwd_dq[sm90,d=128,bf16,plain]", [_loop(18.4, {"m64n128k16": 2, "m64n32k16": 2})]),
        _compiled("prefix_attn_bwd_dkdv[sm90,d=128,bf16,plain]", [_loop(19.1, {"m64n128k16": 4, "m64n32k16": 2})]),
        _compiled("prefix_attn_bwd_dkdv[sm90,d=128,fp32,plain]", [_loop(99.0, {})]),         # fp32: no target
        _compiled("prefix_attn_bwd_dkdv[sm80,d=64,bf16,plain]", [_loop(99.0, {})], arch=80),
    ]
    verdicts = [v for _, v, _ in report.static_targets(good)]
    assert verdicts == ["met"] * 6, report.static_targets(good)
    bad = good[:2] + [
        _compiled("prefix_attn_bwd_stats[sm90,d=64,fp16,plain]", [_loop(25.5, {"m64n64k16": 2})]),
        _compiled("prefix_attn_bwd_dkdv[sm90,d=64,fp16,plain]", [_loop(12.5, {"m64n32k16": 4})]),
        _compiled("prefix_attn_bwd_dkdv[sm80,d=64,fp32,plain]", [], arch=80, spills=True),
    ]
    rows = {t: (v, w) for t, v, w in report.static_targets(bad)}
    assert rows["dQ and row-statistics loops <= 25 instr/score"] == (
        "NOT met", "25.5 (prefix_attn_bwd_stats[sm90,d=64,fp16,plain])")
    assert rows["sequence dK/dV loop (deterministic) <= 25 instr/score"][0] == "met"
    assert rows["dK/dV GEMMs (N = D) wgmma N >= 64"][0] == "NOT met"
    assert rows["zero spills on every compile"] == ("NOT met", "prefix_attn_bwd_dkdv[sm80,d=64,fp32,plain] sm_80")
    rows = {t: v for t, v, _ in report.static_targets(good[:1])}
    assert rows["dQ and row-statistics loops <= 25 instr/score"] == "not compiled"


def test_report_prints_the_static_targets(monkeypatch, capsys, tmp_path):
    out_json = tmp_path / "r.json"
    rc, out, _ = _run(monkeypatch, capsys, ["--json", str(out_json)])
    assert rc == 0 and f"== {report.TARGET_SECTION} ==" in out
    assert "zero spills on every compile" in out
    data = json.loads(out_json.read_text())
    assert [t["target"] for t in data["static_targets"]][0].startswith("forward unmasked loops")
