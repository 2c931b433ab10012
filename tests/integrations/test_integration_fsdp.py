"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on an applied model: frozen base, trainable
prefix (``prefix_projection=True``: embedding + prefix_mlp), 2 processes on CPU with gloo.

Order: ``apply`` first, then ``fully_shard`` on every decoder / encoder layer, then on the
root PeftModel.  The root group holds what no layer group took: the frozen embeddings /
head and the trainable parameters, PEFT's ``prompt_encoder`` (plus, for SEQ_CLS, PEFT's
``modules_to_save`` copy of the classifier), so those are sharded (``Shard(0)``) like any
other parameter and reduce-scattered in backward.  FSDP2 copes
with the mixed requires_grad of that group (no ``use_orig_params``: that is FSDP1's knob).

Objective: the mean over the 4 rows of each row's loss (causal LM: the mean token loss of
the row).  Each rank takes the mean over its 2 rows; FSDP2 averages gradients over the 2
ranks, so the sharded gradients are those of the same mean over 4 rows, which the
reference computes in one process on the full batch.  (The models' own ``.loss`` would not
do for llama: a token mean over 2 rows, averaged over ranks, is not the token mean over 4.)
"""
import datetime
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from peft import TaskType

from hf_tiny import apply, batch_for, build

FAMILIES = ("llama", "bert-seq")
WORLD = 2
B = 4

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):  # FSDP2's public API since torch 2.6
    pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) needs torch>=2.6", allow_module_level=True)


def per_row_loss(model, batch, logits):
    """``[B]``: each row's loss, computed from the logits."""
    labels = batch["labels"]
    task = model.peft_config[model.active_adapter].task_type
    if task == TaskType.CAUSAL_LM:  # HF's shift, ignore_index=-100, mean over the row's tokens
        tok = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], reduction="none")
        valid = (labels[:, 1:] != -100).sum(1)
        return tok.sum(1) / valid, tok.sum(1), valid
    assert task == TaskType.SEQ_CLS
    return F.cross_entropy(logits.float(), labels, reduction="none"), None, None


def _layers(model):
    base = model.get_base_model()
    if hasattr(base, "model") and hasattr(base.model, "layers"):  # llama-style decoder
        return list(base.model.layers)
    return list(base.bert.encoder.layer)  # bert encoder


def _fsdp_worker(rank, world, port, out_file):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a dead peer fails the test, no hang
    try:
        mesh = init_device_mesh("cpu", (world,))
        results = {}
        for family in FAMILIES:
            model = build(family, prefix_projection=True)
            apply(model, backend="torch")  # before fully_shard
            for layer in _layers(model):
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)  # root: embeddings, head and the prompt_encoder
            batch = batch_for(model, B=B)
            rows = B // world
            half = {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}
            out = model(**half)
            loss = per_row_loss(model, half, out.logits)[0].mean()
            loss.backward()
            grads, local_shapes = {}, {}
            for n, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                g = p.grad
                assert isinstance(p, DTensor) and isinstance(g, DTensor), (n, type(p), type(g))
                assert g.placements == (Shard(0),), (n, g.placements)
                local_shapes[n] = tuple(g.to_local().shape)
                grads[n] = g.full_tensor().detach().clone()  # collective: every rank calls it
            total = loss.detach().clone()
            dist.all_reduce(total)
            results[family] = dict(grads=grads, loss=total / world, local_shapes=local_shapes)
        if rank == 0:
            torch.save(results, out_file)
        # both ranks reach teardown together: a rank tearing gloo down while its peer still has
        # a collective in flight aborted with "terminate called without an active exception"
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _reference(family):
    model = build(family, prefix_projection=True)
    apply(model, backend="torch")
    batch = batch_for(model, B=B)
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    rows, tok_sum, valid = per_row_loss(model, batch, out.logits)
    # per_row_loss agrees with the model's own loss (token mean for causal LM, row mean otherwise)
    own = tok_sum.sum() / valid.sum() if tok_sum is not None else rows.mean()
    torch.testing.assert_close(own, out.loss.float(), atol=1e-6, rtol=1e-5)
    loss = rows.mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    return loss.detach(), grads


def test_fsdp2_two_processes_same_grads(workdir):
    """spawn, not fork (see the DDP test); both families in one pair of workers (imports dominate)."""
    out_file = str(workdir / "grads.pt")
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_fsdp_worker, args=(WORLD, port, out_file), nprocs=WORLD, join=True, start_method="spawn")
    results = torch.load(out_file)
    for family in FAMILIES:
        got = results[family]
        loss, grads = _reference(family)
        assert got["grads"].keys() == grads.keys()
        # embedding + prefix_mlp's two linears; bert-seq: + PEFT's trainable classifier copy (modules_to_save)
        assert len(grads) == {"llama": 5, "bert-seq": 7}[family], sorted(grads)
        # sharded for real: rank 0 holds ceil(rows / 2) of each gradient
        for n, g in grads.items():
            assert got["local_shapes"][n] == (-(-g.shape[0] // WORLD), *g.shape[1:]), n
        torch.testing.assert_close(got["loss"], loss, atol=1e-6, rtol=1e-5)
        for n in grads:
            torch.testing.assert_close(got["grads"][n], grads[n], atol=1e-6, rtol=1e-5,
                                       msg=lambda m: f"{family} grad {n}: {m}")
