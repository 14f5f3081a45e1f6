import os
import sys
import warnings

# One intra-op thread for the suite and the notebooks and subprocesses it starts: the tests run small ops, and
# on a machine with other work, OpenMP threads that spin-wait for a descheduled partner made the suite 7x slower
# (392 s against 54 s on 2 busy cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was imported first
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("MPLBACKEND", "Agg")
# torch.func has no batching rule for CPU flash attention: a slow fallback, results are exact
warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")


def assert_tensors_close(got: dict, want: dict, rtol=1e-6):
    """Relative agreement with an absolute floor at rtol x the largest reference magnitude (some gradients,
    like the key bias of attention, are analytically zero)."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    scale = max(float(v.abs().max()) for v in want.values()) if want else 1.0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=rtol * scale, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def editing_data(tmp_path_factory):
    """A small DigitINRs (40 digits, 300-step fits) shared by the editing tests."""
    from gradgraph.data import DigitINRs

    return DigitINRs(tmp_path_factory.mktemp("digit_inrs"), num_images=40, steps=300, progress=False)
