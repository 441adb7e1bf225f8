"""models/distributed.py: a lone process, and two Gloo processes on CPU as torchrun starts them."""
import gc
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from models.distributed import (DistInfo, all_reduce_mean, barrier, cleanup, init_distributed,
                                is_main, shard_batch, unwrap, wrap_ddp)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_without_torchrun_a_single_process(monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo(0, 1, 0, torch.device("cpu"), None)
    assert is_main(info) and not torch.distributed.is_initialized()
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
    assert os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    barrier(info)
    model = nn.Linear(2, 2)
    assert wrap_ddp(model, info) is model and unwrap(model) is model
    assert torch.equal(all_reduce_mean(torch.tensor([1, 2]), info), torch.tensor([1.0, 2.0]))
    assert shard_batch([5, 6, 7], info) == [5, 6, 7]


def test_shard_batch_splits_contiguously():
    infos = [DistInfo(r, 4, r, torch.device("cpu"), "gloo") for r in range(4)]
    shards = [shard_batch(list(range(100, 108)), info) for info in infos]
    assert shards == [[100, 101], [102, 103], [104, 105], [106, 107]]
    with pytest.raises(ValueError, match="batch = 6 does not divide by world_size = 4"):
        shard_batch(list(range(6)), infos[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One process as torchrun would start it; assertion errors surface in the parent."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed("cpu")
    try:
        assert (info.rank, info.world_size, info.backend) == (rank, world_size, "gloo")
        mean = all_reduce_mean(torch.tensor([rank + 1.0, 10.0 * rank]), info)
        mine = shard_batch(list(range(8)), info)

        torch.manual_seed(0)  # same initial weights everywhere; DDP also broadcasts rank 0's
        model = wrap_ddp(nn.Linear(3, 1), info)
        assert isinstance(model, nn.parallel.DistributedDataParallel)
        assert isinstance(unwrap(model), nn.Linear)
        x = torch.arange(24.0).reshape(8, 3)[mine]  # each rank's own samples
        model(x).square().mean().backward()
        grad = unwrap(model).weight.grad
        # DDP averaged the gradients: every rank holds the same, equal to their mean
        assert torch.allclose(all_reduce_mean(grad, info), grad)
        barrier(info)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"mean": mean.tolist(), "shard": mine, "main": is_main(info),
                       "grad": grad.flatten().tolist()}, f)
        # release DDP (its reducer holds the process group) and meet once more before the
        # group goes: a rank tearing gloo down while the other still talks to it aborted
        # once under a loaded CI machine ("terminate called without an active exception")
        del model
        gc.collect()
        barrier(info)
    finally:
        cleanup()


def test_two_gloo_processes(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["mean"] for r in results] == [[1.5, 5.0], [1.5, 5.0]]
    assert [r["shard"] for r in results] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [r["main"] for r in results] == [True, False]
    assert results[0]["grad"] == results[1]["grad"]
