"""Training-side behaviour after apply: gradient checkpointing, attention dropout routing,
transformers.Trainer, 2-process DDP (gloo, CPU) and PEFT save/load in both directions."""
import datetime
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from peft import PeftModel

from hf_tiny import FAMILIES, apply, assert_same, batch_for, build, remove, run, stock_or_none


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert-seq", "bart"])
def test_gradient_checkpointing_same_grads(family, spy):
    model = build(family, prefix_projection=False)
    if family == "bart":
        cfg = model.get_base_model().config
        for m in model.modules():
            if hasattr(m, "dropout") and isinstance(m.dropout, float):
                m.dropout = 0.0
            if hasattr(m, "activation_dropout") and isinstance(m.activation_dropout, float):
                m.activation_dropout = 0.0
        cfg.dropout = cfg.attention_dropout = cfg.activation_dropout = 0.0
    batch = batch_for(model)
    stock = stock_or_none(model, batch)  # eval mode, no checkpointing
    apply(model, backend="torch")
    no_dropout(model).train()
    spy.calls.clear()  # apply's probe forward
    plain = run(model, batch)
    n_plain = len([c for c in spy.calls if c["prefix_k"] is not None])
    model.gradient_checkpointing_enable()
    spy.calls.clear()
    ckpt = run(model, batch)
    n_ckpt = len([c for c in spy.calls if c["prefix_k"] is not None])
    model.gradient_checkpointing_disable()
    assert n_ckpt == 2 * n_plain  # every layer recomputed in backward, prefix still there
    assert_same(plain, ckpt, atol=0, rtol=0) if family != "bart" else assert_same(plain, ckpt)
    if stock is not None:
        assert_same(stock, ckpt)


@pytest.mark.parametrize("family,expected", [("gpt2", 0.1), ("bert-seq", 0.1)])
def test_attention_dropout_goes_through_the_op(family, expected, spy):
    model = build(family, prefix_projection=False)
    batch = batch_for(model)
    apply(model, backend="torch")
    spy.calls.clear()  # apply's probe forward (eval mode)
    # keep only the attention-probability dropout (the one the op must apply)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Dropout) and not name.endswith((".attn_dropout", ".attention.self.dropout")):
            m.p = 0.0
    model.train()
    torch.manual_seed(3)
    a = model(**batch).logits
    assert spy.calls and all(c["dropout_p"] == pytest.approx(expected) for c in spy.calls)
    torch.manual_seed(3)
    b = model(**batch).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # reproducible from torch's seed
    spy.calls.clear()
    model.eval()
    with torch.no_grad():
        ev = model(**batch).logits
    assert spy.calls and all(c["dropout_p"] == 0.0 for c in spy.calls)
    assert (a - ev).abs().max() > 1e-3  # the op's dropout acted in training mode


def _trainer_losses(patched: bool, gradient_checkpointing: bool, workdir):
    from transformers import Trainer, TrainingArguments

    model = no_dropout(build("gpt2", prefix_projection=False, seed=5))
    if patched:
        apply(model, backend="torch")
    rows = []
    for i in range(8):
        b = batch_for(model, B=1, L=6, seed=100 + i)
        rows.append({k: v[0] for k, v in b.items()})
    args = TrainingArguments(
        output_dir=str(workdir / f"out{patched}{gradient_checkpointing}"), per_device_train_batch_size=4,
        max_steps=4, learning_rate=5e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        remove_unused_columns=False, gradient_checkpointing=gradient_checkpointing, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_loss_curve_equals_stock(workdir):
    stock = _trainer_losses(False, False, workdir)
    patched = _trainer_losses(True, False, workdir)
    patched_ckpt = _trainer_losses(True, True, workdir)
    assert len(stock) == 4 and len(set(stock)) > 1  # it trained
    assert patched == pytest.approx(stock, rel=1e-5, abs=1e-6)
    assert patched_ckpt == pytest.approx(stock, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank, world, port, out_file, prefix_projection):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a dead peer fails the test, no hang
    try:
        model = build("bert-seq", prefix_projection=prefix_projection)
        apply(model, backend="torch")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        batch = batch_for(model, B=4)
        half = {k: v[rank * 2:(rank + 1) * 2] for k, v in batch.items()}
        ddp(**half).loss.backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, out_file)
        # both ranks reach teardown together: a rank tearing gloo down while its peer still has
        # a collective in flight aborted with "terminate called without an active exception"
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_same_grads(workdir):
    """prefix_projection=True (prefix_mlp + prefix_attention grads through DDP's all-reduce).
    spawn, not fork: a forked child can hang in OpenMP initialised by the parent (~20-30 s of imports)."""
    prefix_projection = True
    out_file = str(workdir / "grads.pt")
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, out_file, prefix_projection), nprocs=2,
                       join=True, start_method="spawn")
    ddp_grads = torch.load(out_file)
    model = build("bert-seq", prefix_projection=prefix_projection)
    apply(model, backend="torch")
    _, _, grads = run(model, batch_for(model, B=4))
    assert ddp_grads.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(ddp_grads[n], grads[n], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------ save/load
@pytest.mark.parametrize("prefix_projection", [True, False], ids=["prefix-tuning", "p-tuning-v2"])
@pytest.mark.parametrize("family", ["llama", "bert-seq"])
def test_save_load_keeps_peft_format(family, prefix_projection, workdir):
    model = build(family, prefix_projection=prefix_projection)
    batch = batch_for(model)
    stock_runs = stock_or_none(model, batch) is not None
    model.save_pretrained(workdir / "stock")
    apply(model, backend="torch")
    with torch.no_grad():
        want = model(**batch).logits  # = stock PEFT's (test_integration_equivalence / _matrix)
    model.save_pretrained(workdir / "patched")
    a = dict(_load_state(workdir / "stock"))
    b = dict(_load_state(workdir / "patched"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k])

    # saved by stock PEFT -> loaded and patched; saved while patched -> loaded by stock PEFT
    for src, patch in (("stock", True), ("patched", False)):
        if not patch and not stock_runs:
            continue  # stock PEFT cannot run this model on this transformers
        torch.manual_seed(0)  # same base weights as build()
        base, _ = FAMILIES[family]("sdpa")
        loaded = PeftModel.from_pretrained(base, workdir / src).eval()
        if patch:
            apply(loaded, backend="torch")
        with torch.no_grad():
            got = loaded(**batch).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    remove(model)


def _load_state(path):
    from safetensors.torch import load_file

    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert files
    return load_file(os.path.join(path, files[0])).items()
