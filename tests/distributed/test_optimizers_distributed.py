"""effllm's optimizers with 2 processes (gloo, CPU): DDP gives the single-process full-batch result, and under
FSDP2 (``fully_shard``, DTensor parameters) each rank keeps only its shard of the quantized state; Frugal under
FSDP2 follows the one-process Frugal, with its inner state sharded too, and its state dict resumes a run.

One ``torch.multiprocessing`` spawn runs every scenario (starting processes is the slow part); each rank saves
what it saw, and the tests compare that with single-process runs made here.
"""

from __future__ import annotations

import datetime
import io
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from effllm.optim import AdamW8bit, Frugal

WORLD_SIZE = 2
STEPS = 5
LR = 1e-2
BATCH = 128  # split evenly between the ranks; more rows than any layer is wide, so gradients have full rank
LOW_RANK_BATCH = 8  # fewer rows than Frugal's subspace rank: the SVD sees rank-deficient gradients
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)  # a broken scenario fails instead of hanging

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # 33 rows: FSDP2 shards it unevenly (17 + 16), so quantization blocks do not line up with a full tensor.
    return nn.Sequential(nn.Linear(16, 33), nn.Tanh(), nn.Linear(33, 64), nn.Tanh(), nn.Linear(64, 8))


def make_batch(size: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, 16, generator=generator), torch.randn(size, 8, generator=generator)


# Each scenario: the optimizer built from a model; 8-bit states on every weight (min_8bit_size=0).
OPTIMIZERS = {
    "adamw8bit": lambda model: AdamW8bit(model.parameters(), lr=LR, min_8bit_size=0, blocksize=64),
    "adamw32": lambda model: AdamW8bit(model.parameters(), lr=LR, state_bits=32),
    "frugal_svd": lambda model: Frugal(model, lr=LR, density=0.25, projection="svd", update_gap=2),
    "frugal_svd_low_rank": lambda model: Frugal(model, lr=LR, density=0.25, projection="svd", update_gap=2),
    "frugal_random_8bit": lambda model: Frugal(model, lr=LR, density=0.25, projection="random", update_gap=2,
                                               inner="adamw8bit", inner_kwargs={"min_8bit_size": 0}),
}
OPTIMIZERS.update({
    # 8-bit under FSDP2 without the state-free part: signSGD would turn the quantization differences (blocks
    # are cut per rank) into whole steps wherever a residual element is near zero.
    "frugal_svd_8bit": lambda model: Frugal(model, lr=LR, density=0.25, projection="svd", update_gap=2,
                                            state_free="none", inner="adamw8bit", inner_kwargs={"min_8bit_size": 0}),
    "frugal_columns_8bit": lambda model: Frugal(model, lr=LR, density=0.25, projection="columns", update_gap=2,
                                                state_free="none", inner="adamw8bit",
                                                inner_kwargs={"min_8bit_size": 0}),
    "frugal_random": lambda model: Frugal(model, lr=LR, density=0.25, projection="random", update_gap=2),
    "frugal_columns_sgd": lambda model: Frugal(model, lr=LR, density=0.25, projection="columns", update_gap=2,
                                               state_free="sgd", weight_decay=0.1),
    "frugal_blocks": lambda model: Frugal(model, lr=LR, density=0.25, projection="blocks", update_gap=2),
})
DDP_SCENARIOS = ("adamw8bit", "adamw32", "frugal_svd", "frugal_svd_low_rank", "frugal_random_8bit")
BATCH_OF = {"frugal_svd_low_rank": LOW_RANK_BATCH}
FSDP_SCENARIOS = ("adamw8bit", "adamw32")
# Every layer of make_model is projected: Linear(16, 33) and Linear(33, 64) are tall (sharded along the long
# side), Linear(64, 8) is wide (sharded along the projected side: coordinates summed over ranks).
FSDP_FRUGAL_SCENARIOS = ("frugal_svd", "frugal_random", "frugal_columns_sgd", "frugal_blocks", "frugal_svd_8bit",
                         "frugal_columns_8bit")
RARE_FLIPS = 0.01  # share of elements allowed to differ by a flipped step
RESUME_AFTER = 3  # steps before the state dict is taken (a refresh falls due after it, at step 5)


def train(model, optimizer, inputs, targets) -> None:
    for _ in range(STEPS):
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad()


def single_process(name: str) -> list[torch.Tensor]:
    model = make_model()
    train(model, OPTIMIZERS[name](model), *make_batch(BATCH_OF.get(name, BATCH)))
    return [p.detach().clone() for p in model.parameters()]


# --- what each rank runs -------------------------------------------------------------------------------
def rank_batch(rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = make_batch(size)
    shard = slice(rank * size // WORLD_SIZE, (rank + 1) * size // WORLD_SIZE)
    return inputs[shard], targets[shard]


def _ddp(name, rank) -> dict:
    inputs, targets = rank_batch(rank, BATCH_OF.get(name, BATCH))
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    train(ddp, OPTIMIZERS[name](model), inputs, targets)
    return {"params": [p.detach().clone() for p in model.parameters()]}


def _fsdp2(name, rank, inputs, targets) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = OPTIMIZERS[name](model)
    train(model, optimizer, inputs, targets)
    local_numels = [p.to_local().numel() for p in model.parameters()]
    state_numels = [optimizer.state[p]["state1"].numel() for p in model.parameters()]
    bits = [optimizer.state[p]["state_bits"] for p in model.parameters()]
    full = [p.full_tensor().detach().clone() for p in model.parameters()]
    return {"params": full, "local_numels": local_numels, "state_numels": state_numels, "bits": bits}


def inner_state_numels(optimizer, model) -> list[int]:
    """Elements of the inner optimizer's first moment per parameter (0 where it keeps none)."""
    return [optimizer.state[p]["inner"]["state1"].numel() if "state1" in optimizer.state[p].get("inner", {})
            else 0 for p in model.parameters()]


def _fsdp2_sharded_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp2_frugal(name, rank, inputs, targets) -> dict:
    model = _fsdp2_sharded_model()
    optimizer = OPTIMIZERS[name](model)
    train(model, optimizer, inputs, targets)
    return {"params": [p.full_tensor().detach().clone() for p in model.parameters()],
            "inner_numels": inner_state_numels(optimizer, model)}


def _fsdp2_frugal_resume(name, rank, inputs, targets) -> dict:
    """A state dict taken mid-run (through torch.save / weights_only load) resumes the same trajectory."""

    def steps(model, optimizer, count):
        for _ in range(count):
            nn.functional.mse_loss(model(inputs), targets).backward()
            optimizer.step()
            optimizer.zero_grad()

    model = _fsdp2_sharded_model()
    optimizer = OPTIMIZERS[name](model)
    steps(model, optimizer, RESUME_AFTER)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    saved_params = [p.to_local().detach().clone() for p in model.parameters()]
    steps(model, optimizer, STEPS - RESUME_AFTER)
    uninterrupted = [p.to_local().detach().clone() for p in model.parameters()]

    resumed_model = _fsdp2_sharded_model()
    with torch.no_grad():
        for param, saved in zip(resumed_model.parameters(), saved_params, strict=True):
            param.to_local().copy_(saved)
    resumed = OPTIMIZERS[name](resumed_model)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    steps(resumed_model, resumed, STEPS - RESUME_AFTER)
    return {"same": all(torch.equal(p.to_local(), q) for p, q in zip(resumed_model.parameters(), uninterrupted))}


def _fsdp2_frugal_built_before_sharding(name, rank, inputs, targets) -> dict:
    """Frugal built on the plain model, its groups then pointed at the sharded parameters, as accelerate's FSDP2
    path does (``fsdp2_switch_optimizer_parameters``)."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    optimizer = OPTIMIZERS[name](model)
    names = {id(param): name for name, param in model.named_parameters()}
    old_groups = [[names[id(param)] for param in group["params"]] for group in optimizer.param_groups]
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    sharded = dict(model.named_parameters())
    for group, group_names in zip(optimizer.param_groups, old_groups, strict=True):
        group["params"] = [sharded[name] for name in group_names]
    train(model, optimizer, inputs, targets)
    return {"params": [p.full_tensor().detach().clone() for p in model.parameters()]}


def _unsupported_layout(rank) -> dict:
    """A weight sharded on dim 1 (not FSDP2's layout) is refused with a message naming the way out."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    weight = nn.Parameter(distribute_tensor(torch.zeros(4, 6), mesh, [Shard(1)]))
    try:
        Frugal([weight], lr=LR)
    except NotImplementedError as error:
        return {"error": str(error)}
    return {"error": None}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=COLLECTIVE_TIMEOUT)
    inputs, targets = rank_batch(rank, BATCH)
    jobs = {f"ddp/{name}": (lambda n=name: _ddp(n, rank)) for name in DDP_SCENARIOS}
    jobs.update({f"fsdp2/{name}": (lambda n=name: _fsdp2(n, rank, inputs, targets)) for name in FSDP_SCENARIOS})
    jobs.update({f"fsdp2/{name}": (lambda n=name: _fsdp2_frugal(n, rank, inputs, targets))
                 for name in FSDP_FRUGAL_SCENARIOS})
    jobs.update({f"fsdp2_resume/{name}": (lambda n=name: _fsdp2_frugal_resume(n, rank, inputs, targets))
                 for name in ("frugal_svd", "frugal_columns_sgd", "frugal_random_8bit")})
    jobs["fsdp2_swapped/frugal_svd"] = lambda: _fsdp2_frugal_built_before_sharding("frugal_svd", rank, inputs,
                                                                                   targets)
    jobs["fsdp2/unsupported_layout"] = lambda: _unsupported_layout(rank)
    results = {}
    for key, job in jobs.items():
        try:
            results[key] = job()
        except Exception:  # recorded, so one broken scenario does not hide the others
            results[key] = {"failure": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def result(ranks, rank, key) -> dict:
    outcome = ranks[rank][key]
    assert "failure" not in outcome, outcome.get("failure")
    return outcome


# --- DDP -----------------------------------------------------------------------------------------------
# An all-reduced gradient differs from the full-batch one by float rounding; at 8 bits that can move a state
# value across a code boundary, changing that element's steps by about one code (~1% of lr per step).
ATOL_32BIT = 1e-5
ATOL_8BIT = 0.05 * LR
MEAN_ERROR = 1e-6  # whatever the width, disagreements are rare: the mean stays at float rounding


@pytest.mark.parametrize("name", DDP_SCENARIOS)
def test_ddp_matches_one_process_on_the_full_batch(ranks, name):
    reference = single_process(name)
    atol = ATOL_8BIT if "8bit" in name else ATOL_32BIT
    for rank in range(WORLD_SIZE):
        params = result(ranks, rank, f"ddp/{name}")["params"]
        for mine, theirs in zip(params, reference, strict=True):
            torch.testing.assert_close(mine, theirs, atol=atol, rtol=0)
            assert (mine - theirs).abs().mean() <= MEAN_ERROR
    # The ranks never drift apart: they see the same all-reduced gradient.
    for first, second in zip(result(ranks, 0, f"ddp/{name}")["params"], result(ranks, 1, f"ddp/{name}")["params"]):
        assert torch.equal(first, second)


# --- FSDP2 ---------------------------------------------------------------------------------------------
def test_fsdp2_keeps_only_the_local_shard_of_the_quantized_state(ranks):
    total_numels = [p.numel() for p in make_model().parameters()]
    for rank in range(WORLD_SIZE):
        outcome = result(ranks, rank, "fsdp2/adamw8bit")
        assert outcome["state_numels"] == outcome["local_numels"]
        assert all(bits == 8 for bits in outcome["bits"])
    assert [a + b for a, b in zip(result(ranks, 0, "fsdp2/adamw8bit")["local_numels"],
                                  result(ranks, 1, "fsdp2/adamw8bit")["local_numels"])] == total_numels


def test_fsdp2_32bit_matches_one_process(ranks):
    reference = single_process("adamw32")
    for mine, theirs in zip(result(ranks, 0, "fsdp2/adamw32")["params"], reference, strict=True):
        torch.testing.assert_close(mine, theirs, atol=ATOL_32BIT, rtol=0)


def test_fsdp2_8bit_follows_the_one_process_32bit_trajectory(ranks):
    """Quantization blocks are per local shard, so 8-bit states differ from one process's; the parameters
    stay within 8-bit error of the 32-bit trajectory."""
    reference = single_process("adamw32")
    moved = [(p - start).abs().max() for p, start in zip(reference, [p.detach() for p in make_model().parameters()])]
    for mine, theirs, move in zip(result(ranks, 0, "fsdp2/adamw8bit")["params"], reference, moved, strict=True):
        torch.testing.assert_close(mine, theirs, atol=0.05 * float(move), rtol=0)


def one_process_frugal(name) -> tuple[list[torch.Tensor], list[int]]:
    model = make_model()
    optimizer = OPTIMIZERS[name](model)
    train(model, optimizer, *make_batch())
    return [p.detach().clone() for p in model.parameters()], inner_state_numels(optimizer, model)


@pytest.mark.parametrize("name", [n for n in FSDP_FRUGAL_SCENARIOS if "8bit" not in n])
def test_fsdp2_frugal_matches_one_process(ranks, name):
    reference, reference_numels = one_process_frugal(name)
    for rank in range(WORLD_SIZE):
        for mine, theirs in zip(result(ranks, rank, f"fsdp2/{name}")["params"], reference, strict=True):
            torch.testing.assert_close(mine, theirs, atol=ATOL_32BIT, rtol=0)
    # Each rank keeps the inner state of its own part of the coordinates only: together, one process's.
    numels = [result(ranks, rank, f"fsdp2/{name}")["inner_numels"] for rank in range(WORLD_SIZE)]
    assert [a + b for a, b in zip(*numels)] == reference_numels
    assert all(0 < a < total for a, total in zip(numels[0], reference_numels) if total)


@pytest.mark.parametrize("name", [n for n in FSDP_FRUGAL_SCENARIOS if "8bit" in n])
def test_fsdp2_frugal_8bit_follows_the_one_process_run(ranks, name):
    """8-bit blocks are cut per rank's part of the coordinates, so the states differ from one process's by
    quantization error: the parameters stay within 5% of the largest move of the one-process run, but for rare
    elements whose gradient is near zero, where Adam's step on a fresh state (about lr * sign) may flip."""
    reference, reference_numels = one_process_frugal(name)
    start = [p.detach() for p in make_model().parameters()]
    for rank in range(WORLD_SIZE):
        for mine, theirs, begin in zip(result(ranks, rank, f"fsdp2/{name}")["params"], reference, start,
                                       strict=True):
            difference = (mine - theirs).abs()
            assert (difference > 0.05 * (theirs - begin).abs().max()).float().mean() <= RARE_FLIPS
            assert difference.max() <= 2 * LR * STEPS
    numels = [result(ranks, rank, f"fsdp2/{name}")["inner_numels"] for rank in range(WORLD_SIZE)]
    assert [a + b for a, b in zip(*numels)] == reference_numels


@pytest.mark.parametrize("name", ["frugal_svd", "frugal_columns_sgd", "frugal_random_8bit"])
def test_fsdp2_frugal_state_dict_resumes_the_same_trajectory(ranks, name):
    for rank in range(WORLD_SIZE):
        assert result(ranks, rank, f"fsdp2_resume/{name}")["same"]


def test_fsdp2_frugal_built_before_sharding_follows_its_swapped_parameters(ranks):
    reference, _ = one_process_frugal("frugal_svd")
    for rank in range(WORLD_SIZE):
        for mine, theirs in zip(result(ranks, rank, "fsdp2_swapped/frugal_svd")["params"], reference, strict=True):
            torch.testing.assert_close(mine, theirs, atol=ATOL_32BIT, rtol=0)


def test_frugal_refuses_other_dtensor_layouts(ranks):
    for rank in range(WORLD_SIZE):
        error = result(ranks, rank, "fsdp2/unsupported_layout")["error"]
        assert error is not None and "Shard(dim=1)" in error and "fully_shard" in error
