"""``softprompt-kernels bench --gpu`` / ``./dev gpu``: the CPU-side parts, and one GPU test.

CPU (no GPU needed): the shape grid (sizes, count, memory estimate), the FLOP convention against a
brute-force count, the baselines' mask definitions against a dense reference (and the baselines
themselves on a tiny CPU case against the float64 reference), the JSON / markdown writer and the
verdict lines, ``./dev gpu --dry-run``, and the refusal without a CUDA device.

GPU (``-m gpu``, run by ``./dev gpu``): the compiled Triton backend against the float64 reference
on the CUDA backend's test cases (odd sizes, GQA, every prefix form, non-contiguous, empty rows).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softprompt_kernels.bench import gpu, gpu_plan as plan
from softprompt_kernels.bench.gpu_results import (GpuRow, read_json, render_markdown, speedups, table_lines,
                                                  verdict_lines, write_json, write_markdown)
from softprompt_kernels.reference import prefix_attention_reference

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- grid
def test_full_grid_is_the_issue_grid():
    cases = plan.grid()
    assert len(cases) == 36 == len({c.name for c in cases})
    assert {(c.L, c.P, c.D, c.causal) for c in cases} == {
        (L, P, D, cz) for L in (512, 2048, 8192) for P in (16, 128, 512) for D in (64, 128) for cz in (True, False)}
    for c in cases:
        assert c.B * c.L == 16384 and c.H * c.D == 2048 and c.S == c.L
        assert c.H == {64: 32, 128: 16}[c.D]
        assert plan.memory_estimate_bytes(c) < plan.MEMORY_LIMIT_BYTES <= 40 * 2**30
    assert cases[0].name == "L2048-P128-D128-causal"      # the target class runs first
    worst = max(cases, key=plan.memory_estimate_bytes)
    assert (worst.L, worst.P, worst.D) == (8192, 512, 64)
    assert 15 * 2**30 < plan.memory_estimate_bytes(worst) < 25 * 2**30


def test_quick_grid_and_budgets():
    q = plan.grid(quick=True)
    assert [c.name for c in q] == ["L2048-P128-D128-causal", "L2048-P128-D128"]
    assert sum(plan.stage_budgets(False).values()) <= plan.BUDGET_TOTAL_S <= 8 * 60
    assert sum(plan.stage_budgets(True).values()) <= 150
    assert plan.FLEX_BUDGET_S < plan.BUDGETS_S["bench"] and plan.FLEX_BUDGET_QUICK_S < plan.BUDGETS_QUICK_S["bench"]


def test_memory_estimate_counts_the_big_tensors():
    c = plan.make_case(8192, 512, 64, True)
    scores = c.B * c.H * c.L * (c.P + c.L) * 4
    assert plan.memory_estimate_bytes(c) > scores + 8 * c.B * c.H * c.L * c.D * 2


# --------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("causal", [False, True])
def test_flops_follow_report_convention_and_brute_force(causal):
    from softprompt_kernels.report import attention_flops

    B, H, L, P, D = 3, 2, 7, 5, 4
    c = plan.GpuCase(B, H, L, P, D, causal)
    f = plan.flops(c)
    s_eff = L - L / 2 if causal else L
    assert f["fwd"] == 4 * B * H * L * (P + s_eff) * D
    assert f["bwd"] == pytest.approx(2.5 * f["fwd"]) and f["fwd+bwd"] == pytest.approx(3.5 * f["fwd"])
    assert f == attention_flops(c.report_shape())
    # brute force: 4*D FLOPs (QK^T and PV, 2 per MAC) per visible (query, key) pair
    visible = sum(1 for i in range(L) for j in range(P + L) if j < P or not causal or j - P <= i)
    assert plan.brute_force_flops(B, H, L, P, D, causal) == 4 * D * B * H * visible
    # the convention drops the diagonal's +1/2 per query when causal (L/2 pairs per (b, h))
    diff = 4 * D * B * H * (L / 2 if causal else 0)
    assert plan.brute_force_flops(B, H, L, P, D, causal) == pytest.approx(f["fwd"] + diff)


def test_tflops_of_a_row():
    r = GpuRow("c", "s", "ours-triton", "fwd", flops=2e12, ms=4.0)
    assert r.tflops == pytest.approx(500.0)
    assert GpuRow("c", "s", "x", "fwd", 1e9, None, "n/a: why").tflops is None


# --------------------------------------------------------------------------- masks
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,P", [(5, 3), (8, 0), (6, 11)])
def test_mask_definitions_match_the_dense_reference(L, P, causal):
    dense = plan.dense_visibility(L, P, causal)
    i, c = torch.arange(L)[:, None], torch.arange(P + L)[None, :]
    expect = torch.tensor([[j < P or not causal or j - P <= qi for j in range(P + L)] for qi in range(L)])
    assert torch.equal(dense, expect)
    # FlexAttention mask_mod, evaluated on index grids as flex does
    mm = plan.flex_mask_mod(P, causal, L)
    assert torch.equal(mm(torch.tensor(0), torch.tensor(0), i, c).expand(L, P + L), dense)
    from torch.nn.attention.flex_attention import create_mask

    assert torch.equal(create_mask(mm, 2, 1, L, P + L, device="cpu")[1, 0], dense)
    # PEFT path's mask [B, 1, L, P+L] (None when nothing is masked)
    pm = plan.peft_mask(3, L, P, causal)
    if causal:
        assert pm.shape == (3, 1, L, P + L) and all(torch.equal(pm[b, 0], dense) for b in range(3))
        # SDPA flash / efficient: causal_lower_right over the concatenated keys
        assert torch.equal(plan.sdpa_causal_bias(L, P)._materialize("cpu"), dense)
    else:
        assert pm is None and bool(dense.all())


def _reference(x, c):
    leaves = [t.double().requires_grad_() for t in (x.q, x.k, x.v, x.pk, x.pv)]
    q, k, v, pk, pv = leaves
    out, _ = prefix_attention_reference(q, k, v, pk[None], pv[None], torch.zeros(c.B, dtype=torch.long), None,
                                        causal=c.causal)
    return out, leaves


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["peft", "sdpa-flash", "flex"])
def test_baselines_compute_prefix_attention_on_cpu(impl, causal):
    """The baseline callables themselves (CPU kernels; flex uncompiled, forward only: no CPU backward)
    against the float64 reference.  sdpa-cudnn / sdpa-efficient have no CPU kernel; their masks are
    the ones checked above (dense visibility, causal_lower_right)."""
    c = plan.GpuCase(B=2, H=3, L=9, P=4, D=8, causal=causal)
    x = gpu.Inputs(c, seed=3, device="cpu", dtype=torch.float32)
    try:
        fwd, leaves = gpu.make_impl(impl, c, x, None, compile_flex=False)
        if impl == "flex":
            for t in leaves:
                t.requires_grad_(False)
        out = fwd()
    except RuntimeError as e:  # a CPU build without that SDPA backend
        pytest.skip(f"{impl} does not run on this CPU: {e}")
    ref, ref_leaves = _reference(x, c)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    if impl == "peft":  # gradients through expand + cat reach the shared prefix
        g = torch.autograd.grad(out, leaves, x.dout)
        gr = torch.autograd.grad(ref, ref_leaves, x.dout.double())
        for a, b in zip(g, gr):
            assert a.shape == b.shape and torch.allclose(a.double(), b, atol=1e-4)


def test_ours_cuda_is_na_with_the_reason():
    c = plan.GpuCase(1, 1, 4, 2, 8, False)
    x = gpu.Inputs(c, device="cpu", dtype=torch.float32)
    with pytest.raises(gpu._NA, match="nvcc missing"):
        gpu.make_impl("ours-cuda", c, x, "n/a: nvcc missing")


# --------------------------------------------------------------------------- writer
def _rows(flash_ms=2.0, peft_ms=3.0, ours_ms=1.5):
    rows = []
    for case in ("L2048-P128-D128-causal", "L2048-P128-D128"):
        for impl, ms in (("ours-triton", ours_ms), ("sdpa-flash", flash_ms), ("peft", peft_ms)):
            for p in plan.PASSES:
                rows.append(GpuRow(case, "B8 H16 L2048 P128 D128 bf16", impl, p, 1e12, ms, note="n"))
        rows.append(GpuRow(case, "B8 H16 L2048 P128 D128 bf16", "ours-cuda", "fwd+bwd", 1e12, None,
                           "n/a: CUDA extension build timed out"))
    return rows


def test_json_and_markdown_round_trip(tmp_path):
    rows = _rows()
    env = {"device_name": "NVIDIA H200", "driver": "570.1", "cuda": "13.0", "torch": "2.11.0", "triton": "3.6.0",
           "transformers": "5.17.0", "peft": "0.18", "date": "2026-01-01T00:00:00+00:00"}
    meta = {"quick": True, "stages": [{"name": "tests", "status": "passed", "seconds": 30.0}]}
    p = tmp_path / "r" / "gpu.json"
    data = write_json(str(p), env, rows, meta)
    data2, rows2 = read_json(str(p))
    assert data2 == json.loads(json.dumps(data)) and data2["environment"] == env
    assert [r.to_json() for r in rows2] == [r.to_json() for r in rows]
    assert data2["rows"][0]["tflops"] == pytest.approx(1e12 / 1.5e-3 / 1e12)
    md = render_markdown(data2)
    write_markdown(str(tmp_path / "gpu.md"), data2)
    assert (tmp_path / "gpu.md").read_text() == md
    assert "NVIDIA H200" in md and "driver: 570.1" in md and "triton: 3.6.0" in md
    assert "| case | shape | GFLOP | ours-triton | sdpa-flash | peft | ours-cuda |" in md
    assert "1.500 / 667" in md                       # ms / TFLOP/s
    assert "CUDA extension build timed out" in md     # n/a reasons listed
    assert all(f"## {p}: median ms / TFLOP/s" in md for p in plan.PASSES)
    assert "tests passed (30 s)" in md
    assert table_lines(rows)[2].split()[:3] == ["L2048-P128-D128-causal", "ours-triton", "fwd"]


def test_verdict_lines():
    v = verdict_lines(_rows(flash_ms=2.0, peft_ms=3.0, ours_ms=1.5))   # 1.33x flash, 2.0x PEFT
    flash = [x for x in v if "SDPA-flash" in x and "[ours-triton]" in x][0]
    peft = [x for x in v if "PEFT" in x and "[ours-triton]" in x][0]
    assert " met -- 2/2 cases >= 1.0x" in flash and "geomean 1.33x" in flash
    assert " met -- 2/2 cases >= 1.5x" in peft and "worst 2.00x" in peft
    cuda = [x for x in v if "[ours-cuda]" in x]
    assert len(cuda) == 2 and all("not measured" in x for x in cuda)
    v = verdict_lines(_rows(flash_ms=2.0, peft_ms=2.0, ours_ms=1.5))   # 1.33x PEFT < 1.5x
    assert any("PEFT" in x and "NOT met -- 0/2" in x and "[ours-triton]" in x for x in v)
    assert speedups(_rows(), "ours-triton", "sdpa-flash")[0][1] == pytest.approx(2.0 / 1.5)
    assert verdict_lines([]) == []


# --------------------------------------------------------------------------- the command
def test_gpu_test_files_carry_the_marker():
    files = gpu.gpu_test_files()
    assert "tests/test_bench_gpu.py" in files and "tests/test_prefix_mlp.py" in files
    names = [n for n, _ in gpu.test_commands(False)]
    assert names == ["pytest -m gpu", "pytest tests/test_cuda_gpu.py"]
    quick = dict(gpu.test_commands(True))
    assert "-k" in quick["pytest tests/test_cuda_gpu.py"]


def _dev(*args, timeout=120):
    env = dict(os.environ, SOFTPROMPT_PY=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([str(REPO / "dev"), "gpu", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dev_gpu_dry_run_prints_the_plan():
    r = _dev("--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "36 cases x 7 implementations x 3 passes" in out
    assert "L8192-P512-D64-causal" in out and "sdpa-flash" in out and "flex" in out and "peft" in out
    assert "pytest -q -rs -p no:cacheprovider -m gpu" in out
    assert "dry run: nothing was run on a GPU" in out
    assert " ms " not in out.replace("(warmup", "")  # no timing printed
    r = _dev("--dry-run", "--quick")
    assert r.returncode == 0 and "2 cases x 7 implementations" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_refuses_without_cuda_device(tmp_path):
    r = _dev("--quick", "--out", str(tmp_path / "res"))
    assert r.returncode == gpu.EXIT_NO_GPU, r.stdout + r.stderr
    assert "error: no CUDA device" in r.stderr and "no time was measured" in r.stderr
    assert "=== stage" not in r.stdout and "TFLOP/s " not in r.stdout.replace("-> TFLOP/s", "")
    assert not (tmp_path / "res").exists()
    assert gpu.main(["--quick", "--out", str(tmp_path / "res2")]) == gpu.EXIT_NO_GPU


# --------------------------------------------------------------------------- GPU
_TRITON_GPU_SCRIPT = r"""
import os, sys, torch
assert "TRITON_INTERPRET" not in os.environ
from softprompt_kernels import prefix_attention
from softprompt_kernels.cuda._testing import CASES, check_attention

quick = os.environ.get("SOFTPROMPT_GPU_QUICK") == "1"
dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16]
_stash = {}

def _poison():
    blocks = [torch.full((1 << 22,), float("nan"), device="cuda") for _ in range(8)]
    del blocks

def fwd(q, k, v, pk, pv, idx, kpm, causal, scale, dropout_p, dseed):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    pre = [t.detach().requires_grad_() for t in (pk, pv)] if pk is not None else [None, None]
    _poison()
    out, lse = prefix_attention(*leaves, *pre, prefix_index=idx if pk is not None else None, causal=causal,
                                key_padding_mask=kpm, softmax_scale=scale, return_lse=True, backend="triton")
    _stash.update(out=out, leaves=leaves + [t for t in pre if t is not None])
    return out.detach().contiguous(), lse

def bwd(dout, q, k, v, pk, pv, idx, kpm, out, lse, causal, scale, dropout_p, dseed, deterministic):
    _poison()
    g = list(torch.autograd.grad(_stash["out"], _stash["leaves"], dout))
    return tuple(g + [None] * (5 - len(g)))

n = 0
for dt in dtypes:
    for case in CASES:
        check_attention(fwd, bwd, case, dt, "cuda", seed=n)
        n += 1
torch.cuda.synchronize()
print(f"TRITON-GPU-OK {n} cases")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
def test_triton_attention_on_gpu_matches_reference():
    """The compiled (not interpreted) Triton prefix attention, in a subprocess without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-c", _TRITON_GPU_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "TRITON-GPU-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]


def test_triton_gpu_script_compiles():
    compile(_TRITON_GPU_SCRIPT, "<triton-gpu>", "exec")
    assert math.isfinite(plan.flops(plan.grid(True)[0])["fwd"])


def test_bench_loop_on_cpu_with_a_fake_timer(capsys):
    """The measuring loop's bookkeeping (rows per pass, n/a reasons, cross-check notes, budget cut-off),
    run on CPU with a timer that returns a constant: no time is measured here."""
    cases = [plan.GpuCase(2, 2, 8, 3, 8, True), plan.GpuCase(2, 2, 8, 3, 8, False)]
    calls = []

    def fake_do_bench(fn, **kw):
        fn()
        calls.append(kw)
        return 1.0

    rows = gpu.run_bench(cases[:1], ["peft", "sdpa-flash", "ours-cuda"], quick=True,
                         budget_s=60, cuda_problem="n/a: no nvcc here", device="cpu", do_bench=fake_do_bench,
                         dtype=torch.float32)
    assert len(rows) == 3 * 3 and {r.pass_ for r in rows} == set(plan.PASSES)
    by = {(r.impl, r.pass_): r for r in rows}
    assert by[("peft", "fwd+bwd")].ms == 1.0 and by[("peft", "fwd")].flops == plan.flops(cases[0])["fwd"]
    flash = by[("sdpa-flash", "fwd")]
    if flash.ms is not None:
        assert "max|out - peft|" in flash.note
        assert float(flash.note.split("max|out - peft| ")[1]) < 1e-5
    assert all(by[("ours-cuda", p)].status == "n/a: no nvcc here" and by[("ours-cuda", p)].ms is None
               for p in plan.PASSES)
    assert calls and calls[0]["return_mode"] == "median"
    # an exhausted budget: every row says so, nothing is timed
    calls.clear()
    rows = gpu.run_bench(cases, ["peft"], quick=True, budget_s=-1, cuda_problem=None, device="cpu",
                         do_bench=fake_do_bench, dtype=torch.float32)
    assert len(rows) == 6 and not calls and all(r.ms is None and "budget" in r.status for r in rows)


def test_step_runner_times_out_the_whole_process_group(tmp_path):
    marker = tmp_path / "grandchild-survived"
    grandchild = tmp_path / "grandchild.py"
    grandchild.write_text(f"import time\ntime.sleep(4)\nopen({str(marker)!r}, 'w').close()\n")
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(grandchild)!r}]); time.sleep(30)"
    rec = gpu._run("sleeper", [sys.executable, "-c", code], timeout=1.5)
    assert rec["rc"] == 124 and rec["status"] == "timed out" and rec["seconds"] < 10
    import time

    time.sleep(5)
    assert not marker.exists()          # the grandchild (think: nvcc under ninja) was killed too
    ok = gpu._run("true", [sys.executable, "-c", "print('hi')"], timeout=30)
    assert ok["rc"] == 0 and ok["tail"] == ["hi"]
    assert gpu._error_line(["a", "nvcc fatal   : Unsupported gpu architecture 'compute_100a'", "b"]).startswith(
        "nvcc fatal")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_build_is_skipped_with_the_reason_on_cpu():
    problem, rec = gpu.build_cuda(10, no_cuda=False)
    assert problem.startswith("n/a: ") and "CPU-only build" in problem and rec["status"].startswith("skipped")
    problem, rec = gpu.build_cuda(10, no_cuda=True)
    assert problem == "n/a: --no-cuda"


def test_main_flow_with_the_gpu_parts_faked(tmp_path, monkeypatch, capsys):
    """main() past the device check (stages, budgets, JSON + markdown, exit code) with the device, the
    build, the test steps and the timer replaced by fakes; the bench loop itself runs on CPU."""
    real_run_bench = gpu.run_bench
    # tests/conftest.py sets TRITON_INTERPRET for the whole session; main() refuses it once any Triton kernel
    # module is imported (as in a full run) and pops it otherwise: take it out here so neither happens
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu, "environment", lambda: {"device_name": "FAKE (test)", "torch": torch.__version__,
                                                      "triton": None, "transformers": None, "peft": None,
                                                      "python": "3", "driver": "0", "cuda": None})
    monkeypatch.setattr(gpu, "build_cuda", lambda timeout, no_cuda: (
        "n/a: fake build skipped", {"name": "build CUDA extension", "status": "skipped", "seconds": 0.0}))
    monkeypatch.setattr(gpu, "test_commands", lambda quick, python=sys.executable: [
        ("pytest -m gpu", [sys.executable, "-c", "print('1 passed')"]),
        ("pytest tests/test_cuda_gpu.py", [sys.executable, "-c", "raise SystemExit(3)"])])
    tiny = [plan.GpuCase(2, 2, 8, 3, 8, True)]
    monkeypatch.setattr(plan, "grid", lambda quick=False: tiny)
    monkeypatch.setattr(gpu, "run_bench", lambda cases, impls, **kw: real_run_bench(
        cases, impls, **kw, device="cpu", dtype=torch.float32, do_bench=lambda fn, **k: (fn(), 2.0)[1]))
    out = tmp_path / "res"
    rc = gpu.main(["--quick", "--impl", "peft", "--impl", "ours-cuda", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text          # the CUDA test step is not run: the (fake) build gave a reason
    assert "--- pytest tests/test_cuda_gpu.py: not run: CUDA backend n/a: fake build skipped" in text
    assert "=== stage 1: passed" in text and "=== stage 2: done" in text
    data, rows = read_json(str(out / "gpu.json"))
    assert {r.impl for r in rows} == {"peft", "ours-cuda"} and len(rows) == 6
    assert [s["name"] for s in data["meta"]["stages"]] == ["tests", "bench", "write"]
    assert any("not measured" in v for v in data["verdicts"])
    md = (out / "gpu.md").read_text()
    assert "FAKE (test)" in md and "fake build skipped" in md
    # a failing GPU test step makes the exit code 1 (the bench still runs and writes)
    monkeypatch.setattr(gpu, "test_commands", lambda quick, python=sys.executable: [
        ("pytest -m gpu", [sys.executable, "-c", "raise SystemExit(1)"])])
    assert gpu.main(["--quick", "--impl", "peft", "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "=== stage 1: FAILED: pytest -m gpu" in text and (out / "gpu.json").exists()


def test_main_refuses_an_interpreted_triton_import(monkeypatch, capsys):
    """With TRITON_INTERPRET set and a Triton kernel module already imported, main() exits 2 before any
    stage (the kernels would run interpreted); the variable is left as it was."""
    import softprompt_kernels.triton.prefix_attention  # noqa: F401  (imported: the refusal applies)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu.main(["--quick", "--impl", "peft", "--out", "unused"]) == 2
    assert "TRITON_INTERPRET is set" in capsys.readouterr().err
    assert os.environ["TRITON_INTERPRET"] == "1"
