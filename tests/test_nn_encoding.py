"""RunningScale: no collective inside forward (ranks may run different numbers of forwards), explicit sync."""
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradgraph.nn.encoding import RunningScale, sync_scales


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
    scale = RunningScale(3).train()
    for _ in range(rank + 1):  # rank 0 runs one forward, rank 1 two: a collective in forward would hang here
        scale(torch.full((4, 3), float(rank + 1)))
    local = scale.mean_square.clone()
    assert sync_scales(scale) == 1  # explicit: both ranks call it once
    torch.save({"local": local, "synced": scale.mean_square.clone()}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_forward_has_no_collective_and_sync_is_explicit(tmp_path):
    out = str(tmp_path / "r")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert torch.equal(r0["local"], torch.ones(3)) and torch.equal(r1["local"], torch.full((3,), 4.0))  # per rank
    assert torch.equal(r0["synced"], torch.full((3,), 2.5)) and torch.equal(r1["synced"], r0["synced"])


def test_sync_without_a_process_group_is_a_no_op():
    scale = RunningScale(2).train()
    scale(torch.ones(3, 2) * 2)
    assert sync_scales(scale) == 0 and torch.equal(scale.mean_square, torch.full((2,), 4.0))
