"""Versioned files: atomic, content-checked, refused with the file's name when old, foreign, truncated or damaged."""
import pytest
import torch

from gradgraph.errors import FileFormatError
from gradgraph.io import content_hash, load_file, save_file


def _payload():
    return {"x": torch.arange(6.0).view(2, 3), "meta": {"name": "a", "n": [1, 2.5, None]}, "ids": torch.arange(4)}


def test_round_trip_and_hash(tmp_path):
    save_file(_payload(), tmp_path / "f.pt", "test")
    got = load_file(tmp_path / "f.pt", "test")
    assert torch.equal(got["x"], _payload()["x"]) and got["meta"] == _payload()["meta"]
    changed = _payload()
    changed["x"][0, 0] = 0.5
    assert content_hash(changed) != content_hash(_payload())
    assert content_hash({"a": 1}) != content_hash({"a": 1.0}) != content_hash({"a": "1"})
    assert not list(tmp_path.glob("*.tmp"))


def test_damaged_truncated_foreign_and_old_files_are_refused(tmp_path):
    path = tmp_path / "f.pt"
    save_file(_payload(), path, "test")
    raw = bytearray(path.read_bytes())
    i = raw.find(torch.arange(6.0).view(2, 3)[0, 1].numpy().tobytes())  # the bytes of x[0, 1]
    raw[i:i + 4] = torch.tensor([9.0]).numpy().tobytes()  # a flipped value the zip reader cannot notice
    path.write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match="f.pt is damaged.*hash"):
        load_file(path, "test")
    save_file(_payload(), path, "test")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(FileFormatError, match="f.pt is not a readable .*truncated"):
        load_file(path, "test", remedy="do X")
    save_file(_payload(), path, "other")
    with pytest.raises(FileFormatError, match="not a gradgraph test file.*gradgraph.other"):
        load_file(path, "test")
    torch.save({"format": "gradgraph.test", "version": 1, "payload": {}}, path)
    with pytest.raises(FileFormatError, match="format version 1"):
        load_file(path, "test")


def test_scalars_and_empty_tensors_hash(tmp_path):
    payload = {"s": torch.tensor(3.0), "e": torch.zeros(0, 2), "b": torch.tensor([True]), "h": torch.ones(2).half()}
    save_file(payload, tmp_path / "s.pt", "test")
    assert torch.equal(load_file(tmp_path / "s.pt", "test")["s"], torch.tensor(3.0))
    assert content_hash({"s": torch.tensor(3.0)}) != content_hash({"s": torch.tensor(3.5)})
