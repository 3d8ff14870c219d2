"""Multi-process helpers on 2 CPU processes (gloo, 127.0.0.1): metrics reduced over the whole
validation set, DDP and FSDP2 equal to one process with the doubled batch, full state dicts that
load into the unsharded model and back into a sharded one, and the launch / option errors.

One `torch.multiprocessing.spawn` runs every multi-process check (torch starts in ~5 s per process).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import vitkit
from vitkit.train import parallel as D
from vitkit.train.distributed import get_rank, get_world_size, is_distributed, is_main, unwrap

WORLD = 2
BATCH = 2  # per process; the single-process reference uses WORLD * BATCH
STEPS = 3
EVAL_SAMPLES = 7  # odd: the second rank's share is padded by one repeated sample
CASES = {  # name -> (model, overrides): a depth-reduced ViT-H and Swin V2-G with tiny widths
    "vit_h": ("vit_huge_patch14_224", dict(depth=2, embed_dim=64, num_heads=4, img_size=28)),
    "swinv2_g": (
        "swinv2_giant_window12_192",
        dict(
            depths=(1, 1, 2, 1), embed_dim=16, num_heads=(1, 2, 4, 8), window_size=4, img_size=64,
            extra_norm_every_n_blocks=2, drop_path_rate=0.0,
        ),
    ),
}


def _model(case: str) -> torch.nn.Module:
    torch.manual_seed(0)
    name, overrides = CASES[case]
    return vitkit.create_model(name, num_classes=5, in_chans=1, **overrides)


def _data(case: str, n: int, seed: int) -> TensorDataset:
    size = CASES[case][1]["img_size"]
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, size, size, generator=gen), torch.randint(0, 5, (n,), generator=gen))


def _train(model: torch.nn.Module, case: str, batch: int) -> torch.optim.Optimizer:
    """STEPS AdamW steps with gradient clipping, on the shares `train_sampler` gives this process."""
    data = _data(case, 16, seed=1)
    sampler = D.train_sampler(data, seed=3)
    sampler.set_epoch(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for step, (x, y) in enumerate(DataLoader(data, batch_size=batch, sampler=sampler)):
        if step == STEPS:
            break
        F.cross_entropy(model(x), y).backward()
        D.clip_grad_norm(model, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def _evaluate(model: torch.nn.Module, data: TensorDataset) -> dict[str, float]:
    """Correct top-1 and count over the whole set: each rank keeps only its real rows."""
    loader = DataLoader(data, batch_size=2, sampler=D.ShardedEvalSampler(data))
    correct = count = seen = 0
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            keep = D.real_rows(loader, seen, len(y))
            seen += len(y)
            pred = model(x).argmax(dim=1)
            correct += int((pred[:keep] == y[:keep]).sum())
            count += keep
    return D.all_reduce_sums({"correct": correct, "count": count})


def _worker(rank: int, out: str, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    device = D.init_distributed("cpu")
    results: dict[str, object] = {"rank": get_rank(), "world": get_world_size()}
    try:
        # the sampler's shares: disjoint, covering the set
        data = _data("vit_h", 16, seed=1)
        sampler = D.train_sampler(data, seed=3)
        sampler.set_epoch(1)
        shares = [None] * WORLD
        torch.distributed.all_gather_object(shares, list(sampler))
        results["shares"] = shares
        # metrics over the whole validation set (the plain model: identical on every rank)
        results["eval"] = _evaluate(_model("vit_h"), _data("vit_h", EVAL_SAMPLES, seed=2))
        # DDP (the default strategy)
        ddp = D.wrap(_model("vit_h"), device)
        _train(ddp, "vit_h", BATCH)
        results["ddp"] = D.full_model_state(ddp)
        # FSDP2 per block with activation checkpointing, for both families
        for case in CASES:
            model = _model(case)
            if rank == 1:  # different local weights: wrap must broadcast rank 0's
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1.0)
            model = D.wrap(model, device, "fsdp")
            opt = _train(model, case, BATCH)
            state = D.full_model_state(model)
            optim_state = D.full_optimizer_state(model, opt)
            results[f"fsdp_{case}"] = state
            results[f"fsdp_{case}_optim"] = optim_state
            # resume: the full states load into a fresh sharded model (only rank 0 holds them)
            fresh = D.wrap(vitkit.create_model(CASES[case][0], num_classes=5, in_chans=1, **CASES[case][1]), device, "fsdp")
            fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3, weight_decay=0.05)
            D.load_full_state(fresh, state, fresh_opt, optim_state)
            results[f"fsdp_{case}_reloaded"] = D.full_model_state(fresh)
        results["checkpointing"] = model.layers[0].grad_checkpointing
        if is_main():
            torch.save(results, os.path.join(out, "rank0.pt"))
        else:
            torch.save({"rank": get_rank(), "state": results["ddp"]}, os.path.join(out, "rank1.pt"))
        torch.distributed.barrier()
    finally:
        D.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dist")
    torch.multiprocessing.spawn(_worker, args=(str(out), _free_port()), nprocs=WORLD, join=True)
    results = torch.load(out / "rank0.pt", weights_only=True)
    results["rank1"] = torch.load(out / "rank1.pt", weights_only=True)
    return results


def _reference(case: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """One process, batch WORLD * BATCH (the same samples per step as WORLD processes x BATCH)."""
    model = _model(case)
    opt = _train(model, case, WORLD * BATCH)
    return model, opt


def _assert_same(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        diff = (state[key].float() - value.float()).abs().max().item()
        assert diff <= tol, f"{key}: max abs diff {diff:.3g}"


def test_ranks_and_disjoint_shares(two_ranks):
    assert two_ranks["rank"] == 0 and two_ranks["world"] == WORLD
    assert two_ranks["rank1"]["rank"] == 1
    shares = two_ranks["shares"]
    assert set(shares[0]).isdisjoint(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(16))
    assert two_ranks["rank1"]["state"] == {}  # full states live on rank 0 only


def test_metrics_cover_the_whole_validation_set(two_ranks):
    model = _model("vit_h").eval()
    x, y = _data("vit_h", EVAL_SAMPLES, seed=2).tensors
    with torch.no_grad():
        correct = int((model(x).argmax(dim=1) == y).sum())
    assert two_ranks["eval"] == {"correct": correct, "count": EVAL_SAMPLES}


def test_ddp_equals_one_process_with_the_doubled_batch(two_ranks):
    reference, _ = _reference("vit_h")
    _assert_same(two_ranks["ddp"], reference.state_dict())


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_full_state_loads_unsharded_and_matches(two_ranks, case):
    assert two_ranks["checkpointing"] is True
    state = two_ranks[f"fsdp_{case}"]
    name, overrides = CASES[case]
    unsharded = vitkit.create_model(name, num_classes=5, in_chans=1, **overrides)
    unsharded.load_state_dict(state, strict=True)
    reference, opt = _reference(case)
    _assert_same(state, reference.state_dict())
    # the optimizer state is keyed by parameter names: it fits any process count
    optim = two_ranks[f"fsdp_{case}_optim"]
    names = [n for n, _ in reference.named_parameters()]
    for i, (n, p) in enumerate(reference.named_parameters()):
        assert optim["state"][n]["step"].item() == STEPS
        _assert_same({"m": optim["state"][n]["exp_avg"]}, {"m": opt.state[p]["exp_avg"]})
    assert len(optim["state"]) == len(names)
    # and sharded again: the reloaded model gathers to the same weights, bit for bit
    reloaded = two_ranks[f"fsdp_{case}_reloaded"]
    _assert_same(reloaded, state, tol=0.0)


def test_single_process_helpers_are_identities():
    assert not is_distributed() and is_main() and get_world_size() == 1
    assert D.all_reduce_sums({"a": 2, "b": 1.5}) == {"a": 2.0, "b": 1.5}
    model = torch.nn.Linear(2, 2)
    assert D.wrap(model, torch.device("cpu")) is model and unwrap(model) is model
    assert D.full_model_state(model).keys() == model.state_dict().keys()
    assert D.rank_seed(7) == 7 and D.rank_seed(7, rank=3) == 10
    sampler = D.ShardedEvalSampler(range(5), num_replicas=2, rank=1)
    assert list(sampler) == [1, 3, 0] and sampler.num_real == 2
    assert [D.real_rows(sampler, seen, 2) for seen in (0, 2)] == [2, 0]


def test_option_errors(monkeypatch):
    model = vitkit.create_model("vit_tiny_patch16_224", depth=1, img_size=32)
    with pytest.raises(ValueError, match="--fsdp-offload needs CUDA"):
        D.wrap(model, torch.device("cpu"), "fsdp", offload=True)
    with pytest.raises(ValueError, match="--fsdp-offload needs --fsdp"):
        D.wrap(model, torch.device("cpu"), "ddp", offload=True)
    with pytest.raises(RuntimeError, match="needs a process group"):
        D.wrap(model, torch.device("cpu"), "fsdp")
    with pytest.raises(ValueError, match="--nproc must be >= 1"):
        D.launch(0, ["train"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 must be in"):
        D.env_world()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP2's CPU offload needs CUDA; this machine has none")
def test_fsdp_offload_on_cuda():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    try:
        model = vitkit.create_model("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=3).cuda()
        model = D.wrap(model, torch.device("cuda"), "fsdp", offload=True)
        assert all(p.device.type == "cpu" for p in model.parameters())  # kept on the CPU between uses
        loss = model(torch.randn(2, 3, 32, 32, device="cuda")).float().sum()
        loss.backward()
        assert all(p.grad.device.type == "cpu" for p in model.parameters())
    finally:
        D.destroy()
