"""DigitINRs: the fits reproduce the digits, the dataset is seeded and resumable, the splits are stratified."""
import pytest
import torch

from gradgraph import capture
from gradgraph.data import DigitINRs, digit_images, dilate
from gradgraph.data.digit_inrs import grid_coords, make_siren, psnr, render, theta_to_params
from gradgraph.losses import per_sample_mse

SMALL = dict(num_images=12, steps=20, chunk_size=5, num_points=16, progress=False)


def test_images_and_dilation():
    images, labels = digit_images()
    assert images.shape == (1797, 784) and labels.shape == (1797,)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    target = dilate(images[:3]).reshape(3, 28, 28)
    img = images[:3].reshape(3, 28, 28)
    assert torch.equal(target[:, 5, 7], img[:, 4:7, 6:9].amax((1, 2)))  # a 3x3 max filter
    assert torch.all(target >= img)


def test_fits_reach_a_psnr_floor(editing_data):
    p = psnr(editing_data.fit_mse)
    assert float(p.min()) > 30, p  # 300 steps; the full 500-step fit reaches a mean of ~55 dB (see the README)
    siren = make_siren()
    rendered = render(siren, theta_to_params(editing_data.spec, editing_data.theta[:4]), grid_coords())
    torch.testing.assert_close((rendered - editing_data.images[:4]).pow(2).mean(1), editing_data.fit_mse[:4])


def test_items_are_the_editing_loss_gradient_graph(editing_data):
    i = 3
    graph = editing_data[i]
    siren = make_siren()
    for name, v in theta_to_params(editing_data.spec, graph.theta.unsqueeze(0)).items():
        siren.get_parameter(name).data.copy_(v[0])
    points = editing_data.points
    want = capture(siren, grid_coords()[points], (graph.target[points] - 0.5).unsqueeze(-1), per_sample_mse)
    torch.testing.assert_close(graph.entry_x, want.entry_x)
    torch.testing.assert_close(graph.point_target, graph.target[points])
    torch.testing.assert_close(graph.probe_out, siren(grid_coords()[points]).squeeze(-1).detach() + 0.5)
    assert graph.num_samples == 64 and graph.num_params == 1185


def test_same_seed_same_dataset_and_resume_after_a_crash(tmp_path, monkeypatch):
    a = DigitINRs(tmp_path / "a", **SMALL)
    b = DigitINRs(tmp_path / "b", **SMALL)
    assert torch.equal(a.theta, b.theta) and torch.equal(a.entry_x, b.entry_x)
    c = DigitINRs(tmp_path / "c", **{**SMALL, "seed": 1})
    assert not torch.equal(a.theta, c.theta)

    calls = {"n": 0}
    original = DigitINRs.generate_chunk

    def crashing(self, indices, bar):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return original(self, indices, bar)

    monkeypatch.setattr(DigitINRs, "generate_chunk", crashing)
    with pytest.raises(KeyboardInterrupt):
        DigitINRs(tmp_path / "r", **SMALL)
    assert len(list((tmp_path / "r" / "raw").rglob("chunk_*.pt"))) == 1
    assert not list((tmp_path / "r").rglob("*.tmp"))
    monkeypatch.setattr(DigitINRs, "generate_chunk", original)
    resumed = DigitINRs(tmp_path / "r", **SMALL)
    assert calls["n"] == 2  # the finished chunk was not fitted again
    assert torch.equal(resumed.theta, a.theta) and torch.equal(resumed.entry_x, a.entry_x)
    assert "PSNR of the fits" in (tmp_path / "r" / "README.md").read_text()
    assert not list((tmp_path / "r" / "raw").rglob("chunk_*.pt"))


def test_splits_are_stratified_and_fixed(editing_data):
    sp = editing_data.split_indices()
    assert sorted(sp["test"] + sp["val"] + sp["train"]) == list(range(len(editing_data)))
    assert sp == editing_data.split_indices()
    labels = editing_data.labels
    for name in ("test", "val"):  # every class is represented in the held-out splits
        assert set(labels[sp[name]].tolist()) == set(range(10))
    full = DigitINRs.__new__(DigitINRs)
    full.config = {"num_images": 1797, "inrs_per_image": 2, "seed": 0}
    sp = full.split_indices()
    assert 350 <= len(sp["test"]) / 2 <= 370 and 170 <= len(sp["val"]) / 2 <= 190
    assert set(i % 1797 for i in sp["test"]).isdisjoint(i % 1797 for i in sp["train"])  # split by image
