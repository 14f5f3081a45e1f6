"""SirenFisher: seeded, resumable, atomic, and its targets are the Fisher diagonal by torch.func."""
import pytest
import torch

from gradgraph import oracle
from gradgraph.data import SirenFisher
from gradgraph.data.siren_fisher import make_model

SMALL = dict(num_models=12, num_points=8, num_fisher_points=64, chunk_size=5, progress=False)


def _tensors(ds):
    return ds.entry_x, ds.y, ds.std_est, ds.p


def test_same_seed_same_dataset_whatever_the_chunking(tmp_path):
    a = SirenFisher(tmp_path / "a", **SMALL)
    b = SirenFisher(tmp_path / "b", **{**SMALL, "chunk_size": 7})
    for x, y in zip(_tensors(a), _tensors(b)):
        assert torch.equal(x, y)
    c = SirenFisher(tmp_path / "c", **{**SMALL, "seed": 1})
    assert not torch.equal(a.y, c.y)


def _crash_in_second_chunk(root, monkeypatch, **settings):
    """Generate until the second chunk, then crash (the first chunk is on disk); restore the generator."""
    calls = {"n": 0}
    original = SirenFisher.generate_chunk

    def crashing(self, indices, bar):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return original(self, indices, bar)

    monkeypatch.setattr(SirenFisher, "generate_chunk", crashing)
    with pytest.raises(KeyboardInterrupt):
        SirenFisher(root, **{**SMALL, **settings})
    monkeypatch.setattr(SirenFisher, "generate_chunk", original)


def test_generation_resumes_after_a_crash(tmp_path, monkeypatch):
    _crash_in_second_chunk(tmp_path / "r", monkeypatch)
    raw = sorted((tmp_path / "r" / "raw").rglob("chunk_*.pt"))
    assert len(raw) == 1 and not list((tmp_path / "r").rglob("*.tmp"))  # one finished chunk, no half files
    assert not (tmp_path / "r" / "processed").exists() or not list((tmp_path / "r" / "processed").glob("siren*"))
    resumed = SirenFisher(tmp_path / "r", **SMALL)
    fresh = SirenFisher(tmp_path / "f", **SMALL)
    for x, y in zip(_tensors(resumed), _tensors(fresh)):
        assert torch.equal(x, y)
    assert (tmp_path / "r" / "README.md").exists()
    assert not list((tmp_path / "r" / "raw").rglob("chunk_*.pt"))  # merged into the processed file
    again = SirenFisher(tmp_path / "r", **SMALL)  # loads, does not regenerate
    assert torch.equal(again.y, fresh.y)


def _torch_func_fisher(model, x):
    """The regression Fisher diagonal of the model output, flattened in parameter order: [P]."""
    return torch.cat([f.reshape(-1) for f in oracle.fisher_diagonal(model, x).values()])


@pytest.mark.parametrize("index", [0, 5, 11])
def test_targets_are_the_fisher_diagonal(tmp_path, index):
    ds = SirenFisher(tmp_path / "t", **SMALL)
    model, p, x, x_fisher = make_model(index, 0, (32, 32), 30.0, SMALL["num_points"], SMALL["num_fisher_points"])
    assert abs(float(ds.p[index]) - p) < 1e-6
    torch.testing.assert_close(ds.y[index], _torch_func_fisher(model, x_fisher).float(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ds.std_est[index], _torch_func_fisher(model, x).float(), rtol=1e-4, atol=1e-3)
    graph = ds[index]
    torch.testing.assert_close(graph.layer_features(0, "a").reshape(-1), x.reshape(-1).float())
    assert graph.y.shape == (graph.num_params,) == (1153,)


def test_splits_and_settings_mismatch(tmp_path):
    ds = SirenFisher(tmp_path / "s", **SMALL)
    sp = ds.split_indices(3)
    assert sp["test"] == [0, 1, 2, 3] and sp["val"] == [4, 5, 6, 7] and sp["train"] == [8, 9, 10]
    with pytest.raises(ValueError, match="training pool"):
        ds.split_indices(5)
    other = SirenFisher(tmp_path / "s", **{**SMALL, "num_points": 4})  # lives beside the first
    assert other[0].num_samples == 4 and ds[0].num_samples == 8


def test_fast_batches_equal_pyg_batches(tmp_path):
    from torch_geometric.loader import DataLoader

    ds = SirenFisher(tmp_path / "b", **SMALL)
    idx = [3, 0, 7, 11, 5]
    fast = list(ds.batches(idx, 2))
    slow = list(DataLoader(ds[idx], batch_size=2))
    assert len(fast) == len(slow) == 3
    for f, s in zip(fast, slow):
        assert set(f.keys()) == set(s.keys())
        for key in s.keys():
            if isinstance(s[key], torch.Tensor):
                assert torch.equal(f[key], s[key]), key
        assert [g.model_id.item() for g in f.to_data_list()] == [g.model_id.item() for g in s.to_data_list()]


def test_files_are_plain_versioned_data_and_old_files_get_a_clear_error(tmp_path):
    from gradgraph.errors import FileFormatError
    from gradgraph.io import load_file

    ds = SirenFisher(tmp_path / "v", **SMALL)
    stored = load_file(ds.processed_paths[0], "dataset")  # torch.load(weights_only=True) inside
    assert isinstance(stored["spec"], dict) and stored["config"] == ds.config
    torch.save({"config": ds.config, "spec": ds.spec, "y": ds.y}, ds.processed_paths[0])  # the old pickled layout
    with pytest.raises(FileFormatError, match="siren_fisher_.*pt.*delete the file to regenerate the dataset"):
        SirenFisher(tmp_path / "v", **SMALL)


def test_resuming_with_another_chunk_size_and_a_damaged_chunk(tmp_path, monkeypatch):
    _crash_in_second_chunk(tmp_path / "r", monkeypatch)  # chunk_size 5: one chunk of 5 written
    other = SirenFisher(tmp_path / "r", **{**SMALL, "chunk_size": 7})  # resumed with another chunk size
    fresh = SirenFisher(tmp_path / "f", **SMALL)
    assert other.y.shape == fresh.y.shape and torch.equal(other.y, fresh.y)
    _crash_in_second_chunk(tmp_path / "d", monkeypatch)
    chunk = next((tmp_path / "d" / "raw").rglob("chunk_*.pt"))
    chunk.write_bytes(chunk.read_bytes()[:100])  # damaged outside gradgraph (a disk fault)
    healed = SirenFisher(tmp_path / "d", **SMALL)
    assert torch.equal(healed.y, fresh.y) and torch.equal(healed.entry_x, fresh.entry_x)
