"""Every tutorial notebook runs top to bottom (small settings, offline) and leaves the work tree as it was
(``make notebooks`` runs this file)."""
import os
import subprocess
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _work_tree() -> str | None:
    """``git status`` of the repository, ignored files excluded (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("GRADGRAPH_DATASETS", str(tmp_path / "datasets"))  # keep test data out of the repo
    monkeypatch.setenv("GRADGRAPH_RUNS", str(tmp_path / "runs"))
    before = _work_tree()
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert os.environ.get("MPLBACKEND") == "Agg"
    assert _work_tree() == before, "the notebook left files in the work tree (write under a temp or ignored folder)"
