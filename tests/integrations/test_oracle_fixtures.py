"""The stock-PEFT fixtures (fixtures/peft-5.23) and the deterministic init of families.py.

* every family x prefix_projection has a fixture, recorded with stock PEFT running;
* wherever stock PEFT runs on the installed transformers, its numbers equal the fixture
  (atol = rtol = 1e-5): this is what makes the fixture a valid oracle on other versions,
  and what shows that the init of families.py does not depend on the transformers version.
  Where stock PEFT raises (e.g. encoders on transformers 5.24) the case is skipped with the
  error; that is exactly where ``oracle.peft_oracle`` falls back to the fixture.
"""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import families as F  # noqa: E402
import oracle  # noqa: E402

CASES = [pytest.param(f, p, id=oracle.fixture_name(f, p)) for f in F.FAMILIES for p in (True, False)]


@pytest.mark.parametrize("family,proj", CASES)
def test_fixture_exists(family, proj):
    path = oracle.fixture_path(family, proj)
    assert path.is_file(), f"no fixture {path.name}: rerun record_fixtures.py under transformers 5.23"
    entry = oracle.manifest()["families"][oracle.fixture_name(family, proj)]
    assert entry["stock"] == "runs" and entry["file"] == path.name
    d = oracle.load_fixture(family, proj)
    assert d["logits"].dtype == torch.float32 and d["loss"].dim() == 0
    assert d["grads"] and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in d["grads"].values())
    assert any(n.startswith("prompt_encoder.") for n in d["grads"])
    assert torch.isfinite(d["logits"]).all()
    if F.task_of(family) == F.TaskType.CAUSAL_LM:
        assert d["generate_cache"] is not None  # cached generate ran under 5.23 for every causal LM
        assert d["generate_cache"].shape == (3, 7 + F.GEN_NEW)
        # under 5.23 stock cached generate == greedy decoding by full forwards (and so does
        # use_cache=False generate wherever it runs there; it raises for 11 families)
        assert torch.equal(d["generate_cache"], d["greedy_forward"])
        if d["generate_nocache"] is not None:
            assert torch.equal(d["generate_nocache"], d["greedy_forward"])

CAUSAL = [c for c in CASES if F.task_of(c.values[0]) == F.TaskType.CAUSAL_LM]


@pytest.mark.parametrize("family,proj", CAUSAL)
def test_live_greedy_forward_matches_fixture(family, proj):
    """The generate oracle (greedy by stock forwards) is reproducible on this transformers."""
    model = F.build(family, proj)
    assert torch.equal(F.greedy_forward(model, F.batch_for(model)), oracle.fixture_greedy(family, proj))


@pytest.mark.parametrize("family,proj", CASES)
def test_batch_matches_fixture(family, proj):
    oracle.check_batch(family, proj)


@pytest.mark.parametrize("family,proj", CASES)
def test_live_stock_peft_matches_fixture(family, proj):
    status, info = oracle.check_live_against_fixture(family, proj)
    if status == "live-fails":
        pytest.skip(f"stock PEFT raises on this transformers: {info[0]}")
    assert status == "agree", f"stock PEFT numbers changed vs fixtures/peft-5.23: {info}"


@pytest.mark.parametrize("family", ["bert-seq", "llama"])
def test_oracle_falls_back_or_runs_live(family):
    res = oracle.peft_oracle(family, True)
    logits, loss, grads = res
    assert res.source in ("live", "fixture")
    assert (res.live_error is None) == (res.source == "live")
    assert not oracle.compare(res, tuple(oracle.load_fixture(family, True)[k] for k in ("logits", "loss", "grads")))


def test_init_deterministic_and_ties_kept():
    a, b = F.build("gpt2", True), F.build("gpt2", True)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    base = a.get_base_model()
    assert base.lm_head.weight is base.transformer.wte.weight
    # every parameter was overwritten: norm weights are no longer exactly 1, biases no longer 0
    assert not torch.equal(base.transformer.ln_f.weight, torch.ones_like(base.transformer.ln_f.weight))
    assert base.transformer.h[0].attn.c_attn.bias.abs().sum() > 0


def test_fixture_dir_small():
    total = sum(p.stat().st_size for p in oracle.FIXTURE_DIR.iterdir())
    assert total < 3 * 2**20, total
