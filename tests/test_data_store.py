"""The chunk store under concurrency: two processes generating one dataset at once both end with the dataset a
single process makes; a dead writer's claim is taken over; chunks are split between writers, not serialised."""
import multiprocessing as mp
import os
import time

import torch

from gradgraph.data import SirenFisher
from gradgraph.data.store import ChunkStore

SMALL = dict(num_models=12, num_points=8, num_fisher_points=64, chunk_size=2, progress=False)


def _generate_at_once(root, barrier, out, rank):
    torch.set_num_threads(1)
    barrier.wait()
    ds = SirenFisher(root, **SMALL)
    torch.save({"y": ds.y, "entry_x": ds.entry_x, "pid": os.getpid()}, os.path.join(out, f"rank{rank}.pt"))


def test_two_processes_generating_one_dataset_both_get_it(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_generate_at_once, args=(str(tmp_path / "shared"), barrier, str(tmp_path), r))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    alone = SirenFisher(tmp_path / "alone", **SMALL)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.equal(got["y"], alone.y) and torch.equal(got["entry_x"], alone.entry_x)
    leftovers = [p.name for p in (tmp_path / "shared").rglob("*") if p.is_file()]
    assert not [n for n in leftovers if n.endswith((".claim", ".tmp")) or n.startswith("chunk_")], leftovers


def test_claims_split_the_chunks_and_a_dead_writers_claim_is_taken_over(tmp_path):
    made = []

    def generate(i, bar):
        made.append(i)
        return {"i": torch.tensor(i)}

    store = ChunkStore(tmp_path, [1, 1, 1], generate, stale_s=0.5, poll_s=0.05)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "chunk_00001.claim").write_text("12345\n")  # another (live) writer holds chunk 1
    t0 = time.time()

    class Bar:
        def update(self, n):
            pass
    store.fill(Bar(), done=lambda: False)
    assert made[:2] == [0, 2] and made[2:] == [1]  # 0 and 2 first; 1 only once its claim went stale
    assert time.time() - t0 >= 0.5
    assert [int(store.read(i, Bar())["i"]) for i in range(3)] == [0, 1, 2]
    assert not list(tmp_path.glob("*.claim"))
