"""gradgraph.optim.tasks: seeded, offline optimizer tasks."""
import itertools

import pytest
import torch

from gradgraph.optim.tasks import CHARS, OPT_TASKS


def test_registry_lists_the_tasks():
    assert OPT_TASKS.names() == ["digits-mlp", "digits-mlp-w64", "text-gpt"]


def test_digits_split_is_stratified_and_disjoint():
    task = OPT_TASKS.build("digits-mlp")
    d = task.data()
    sizes = {k: len(v[1]) for k, v in d.items()}
    assert sizes == {"train": 1078, "val": 359, "test": 360}
    for k, (x, y) in d.items():
        frac = torch.bincount(y, minlength=10).float() / len(y)
        assert float((frac - 0.1).abs().max()) < 0.01, k
        assert 0 <= float(x.min()) and float(x.max()) <= 1
    rows = [{tuple(r.tolist()) for r in d[k][0]} for k in d]
    # digits has a few duplicate images; the split is by index, so nearly nothing is shared
    assert len(rows[0] & rows[2]) < 10


@pytest.mark.parametrize("name", ["digits-mlp", "digits-mlp-w64", "text-gpt"])
def test_streams_and_models_are_seeded(name):
    task = OPT_TASKS.build(name)
    a = list(itertools.islice(task.batches(3), 12))
    b = list(itertools.islice(task.batches(3), 12))
    c = list(itertools.islice(task.batches(4), 2))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    m1, m2 = task.model(0), task.model(0)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    loss = task.loss(m1, a[0])
    assert loss.ndim == 0 and 0 < float(loss.detach()) < task.max_loss
    assert task.evaluate(m1, "val") > 0 and task.horizon > 0
    with pytest.raises(ValueError, match="split"):
        task.evaluate(m1, "training")


def test_text_targets_are_the_next_characters():
    task = OPT_TASKS.build("text-gpt")
    x, y = next(task.batches(0))
    assert x.shape == (8, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert task.classes == len(CHARS) == 96
    text = "".join(CHARS[i] for i in task.ids()[:200].tolist())
    assert "import" in text or "def " in text or '"""' in text


def test_digits_width_64_has_the_wider_model():
    assert OPT_TASKS.build("digits-mlp-w64").model(0).net[0].out_features == 64
