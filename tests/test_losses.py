"""Per-sample losses: one value per sample, exact, and shapes that would broadcast are refused."""
import pytest
import torch
import torch.nn.functional as F

from gradgraph.errors import LossShapeError
from gradgraph.losses import per_sample_cross_entropy, per_sample_mse


def test_values_match_a_loop_over_samples():
    out, y = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    torch.testing.assert_close(per_sample_mse(out, y), torch.stack([((o - t) ** 2).sum() for o, t in zip(out, y)]))
    logits, cls = torch.randn(4, 5, 7), torch.randint(7, (4, 5))
    want = torch.stack([F.cross_entropy(lg, c, reduction="sum") for lg, c in zip(logits, cls)])
    torch.testing.assert_close(per_sample_cross_entropy(logits, cls), want)
    torch.testing.assert_close(per_sample_cross_entropy(logits[:, 0], cls[:, 0]),
                               F.cross_entropy(logits[:, 0], cls[:, 0], reduction="none"))


@pytest.mark.parametrize("out,target", [((4, 1), (4,)), ((4,), (4, 1)), ((4, 3), (1, 3))])
def test_mse_refuses_shapes_that_would_broadcast(out, target):
    with pytest.raises(LossShapeError, match="same shape"):
        per_sample_mse(torch.randn(out), torch.randn(target))


def test_cross_entropy_refuses_mismatched_targets():
    with pytest.raises(LossShapeError, match=r"targets of shape \(4, 5\), got \(4,\)"):
        per_sample_cross_entropy(torch.randn(4, 5, 7), torch.randint(7, (4,)))
