"""Two gloo processes on CPU give the same loss and gradients as one process on the concatenated batch.

Gradient bookkeeping being checked: with ``gather_with_grad`` the all_gather backward *sums* every rank's
loss gradient into the local rows, and DDP then *averages* parameter gradients over ranks. Without
local_loss every rank computes the full global loss (sum = W x global gradient, average = global gradient);
with local_loss rank r computes its rows only and the global loss is the mean of the rank losses.
"""

from __future__ import annotations

import datetime
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ehrclip_kit.distributed import DistInfo, epoch_batches, gather_features, init_distributed
from ehrclip_kit.losses import ClipLoss, SigLipLoss
from ehrclip_kit.models import ContrastiveModel, HeadSpec, SpaceSpec, pair_model

torch.set_num_threads(1)
WORLD, B, D_A, D_B = 2, 4, 6, 5


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * B, D_A, generator=g), torch.randn(WORLD * B, D_B, generator=g)


def _towers():
    torch.manual_seed(0)
    return nn.Linear(D_A, 3), nn.Linear(D_B, 3)


def _pair_loss(towers, xa, xb, loss, log_scale, bias):
    a = F.normalize(towers[0](xa), dim=-1)
    b = F.normalize(towers[1](xb), dim=-1)
    return loss(a, b, log_scale.exp(), bias)["contrastive_loss"]


CASES = {
    "clip_global": lambda r, w: ClipLoss(local_loss=False, rank=r, world_size=w),
    "clip_local": lambda r, w: ClipLoss(local_loss=True, rank=r, world_size=w),
    "siglip": lambda r, w: SigLipLoss(rank=r, world_size=w),
}


def _toy_model():
    torch.manual_seed(0)
    return pair_model(
        nn.Linear(D_A, 4), nn.Linear(D_B, 4), names=("ecg", "codes"), dims=(4, 4), proj_dim=3, dropout=0.0
    )


def _run_case(make_loss, rank, world, xa, xb):
    """Loss and DDP-averaged gradients of this rank (or of the single process when world == 1)."""
    towers = _towers()
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)
    loss = _pair_loss(towers, xa, xb, make_loss(rank, world), log_scale, bias)
    loss.backward()
    params = [*towers[0].parameters(), *towers[1].parameters(), log_scale, bias]
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    if world > 1:
        import torch.distributed as dist

        for g in grads:  # what DDP does
            dist.all_reduce(g)
            g /= world
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        loss = mean_loss / world
    return float(loss.detach()), grads


def _worker(rank, store_path, out_path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A file store needs no TCP port, so nothing else on the machine can take the rendezvous from us.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(minutes=5),
    )
    xa, xb = _data()
    mine = slice(rank * B, (rank + 1) * B)
    results = {name: _run_case(make, rank, WORLD, xa[mine], xb[mine]) for name, make in CASES.items()}
    # Forward value without gradient gathering: same loss (gradients differ by design).
    with torch.no_grad():
        results["nograd_loss"] = float(
            _pair_loss(
                _towers(),
                xa[mine],
                xb[mine],
                ClipLoss(gather_with_grad=False, rank=rank, world_size=WORLD),
                torch.tensor(2.0),
                None,
            )
        )
    # The real thing: a ContrastiveModel under DistributedDataParallel.
    model = _toy_model()
    model.configure_distributed(rank, WORLD, local_loss=True)
    ddp = nn.parallel.DistributedDataParallel(model)
    out = ddp({"ecg": xa[mine], "codes": xb[mine]})
    out["loss"].backward()
    loss = out["loss"].detach().clone()
    dist.all_reduce(loss)
    results["ddp_model"] = (float(loss) / WORLD, [p.grad.clone() for p in model.parameters()])
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    out = folder / "results.pt"
    torch.multiprocessing.spawn(_worker, args=(str(folder / "store"), str(out)), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_gloo_processes_match_one_process(two_process_results, case):
    xa, xb = _data()
    ref_loss, ref_grads = _run_case(CASES[case], 0, 1, xa, xb)
    loss, grads = two_process_results[case]
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    assert len(grads) == len(ref_grads)
    assert all(r.abs().sum() > 0 for r in ref_grads[:-1])  # every tower weight and the scale get gradient
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_ddp_contrastive_model_matches_one_process(two_process_results):
    xa, xb = _data()
    model = _toy_model()
    out = model({"ecg": xa, "codes": xb})
    out["loss"].backward()
    loss, grads = two_process_results["ddp_model"]
    assert loss == pytest.approx(out["loss"].item(), abs=1e-5)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-5)


def test_gather_without_grad_gives_the_same_loss_value(two_process_results):
    xa, xb = _data()
    with torch.no_grad():
        ref = _pair_loss(_towers(), xa, xb, ClipLoss(), torch.tensor(2.0), None)
    assert two_process_results["nograd_loss"] == pytest.approx(float(ref), abs=1e-5)


def test_init_distributed_without_torchrun_is_single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.is_main, info.device.type) == (0, 1, True, "cpu")
    a = torch.randn(3, 2)
    assert gather_features(a, a, 0, 1)[0] is a
    assert DistInfo(rank=1, world_size=2).is_main is False


def test_epoch_batches_shard_the_global_batches():
    n, b, w = 23, 3, 2
    single = epoch_batches(n, b * w, epoch=4, seed=7)
    shards = [epoch_batches(n, b, epoch=4, seed=7, rank=r, world_size=w) for r in range(w)]
    assert len(single) == len(shards[0]) == len(shards[1]) == n // (b * w)
    for k, batch in enumerate(single):
        assert shards[0][k] + shards[1][k] == batch
    # Order depends on (seed, epoch) only, and changes with the epoch.
    assert epoch_batches(n, b, 4, 7) == epoch_batches(n, b, 4, 7)
    assert epoch_batches(n, b, 5, 7) != epoch_batches(n, b, 4, 7)
    # Without drop_last every example is seen and every rank has the same number and sizes of batches.
    padded = [epoch_batches(n, b, 0, 7, r, w, drop_last=False) for r in range(w)]
    assert [len(x) for x in padded[0]] == [len(x) for x in padded[1]]
    assert set(i for r in padded for batch in r for i in batch) == set(range(n))


def test_spaces_keep_heads_in_a_model_module():
    # A guard for the DDP test: every parameter lives in the model (DDP only syncs registered ones).
    model = ContrastiveModel(
        {"x": nn.Linear(2, 2), "y": nn.Linear(2, 2)},
        {"hx": HeadSpec("x", nn.Linear(2, 2))},
        [SpaceSpec("s", "hx", "y", "clip")],
    )
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"encoders", "heads", "logit_scales"}
    assert os.environ.get("WORLD_SIZE") in (None, "1")
