"""gradgraph.bench: the benchmark registry lists every benchmark without importing torch or the benchmarks,
and gets each one's module (``add_arguments(parser)``, ``run(args)``) on demand."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from gradgraph.bench import BENCHMARKS
from gradgraph.errors import UnknownNameError

PACKAGE = Path(__file__).resolve().parents[1] / "gradgraph"


def test_listing_the_benchmarks_imports_no_torch():
    """In a fresh process where importing torch fails: the names and help texts come from the registry alone.
    The ``gradgraph`` package is stubbed (its own ``__init__`` imports torch; this checks ``gradgraph.bench``)."""
    code = f"""
import importlib.abc, sys, types
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("torch was imported")
sys.meta_path.insert(0, NoTorch())
package = types.ModuleType("gradgraph")
package.__path__ = [{str(PACKAGE)!r}]
sys.modules["gradgraph"] = package
from gradgraph.bench import BENCHMARKS
for name in BENCHMARKS.names():
    print(name, "|", BENCHMARKS.help(name))
print(sorted(m for m in sys.modules if m.startswith("gradgraph.")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert [ln.split(" | ")[0] for ln in lines[:-1]] == ["capture", "curvature", "curvature-trace", "editing",
                                                         "lopt", "lopt-step", "metanet", "norms"]
    assert all(ln.split(" | ")[1] for ln in lines[:-1])
    assert lines[-1] == "['gradgraph.bench', 'gradgraph.errors', 'gradgraph.registry']"


@pytest.mark.parametrize("name", BENCHMARKS.names())
def test_every_benchmark_module_has_its_entry_points(name):
    module = BENCHMARKS.get(name)
    assert module.__name__ == f"gradgraph.bench.{name.replace('-', '_')}"
    assert callable(module.add_arguments) and callable(module.run)
    # the help text given at registration is the module docstring's first line (kept in sync by this test)
    assert BENCHMARKS.help(name) == module.__doc__.strip().splitlines()[0]
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)  # the options build without error


def test_unknown_benchmark_is_a_clear_error():
    with pytest.raises(UnknownNameError, match="unknown benchmark 'nope': choose one of capture, curvature"):
        BENCHMARKS.get("nope")


def test_the_cli_runs_the_named_benchmark_with_its_own_options(monkeypatch):
    """Each ``bench NAME`` parser has the options of ``gradgraph.bench.options`` (the same function the module
    exposes as ``add_arguments``), and running it calls that benchmark's ``run``, not another's."""
    from gradgraph import cli
    from gradgraph.bench import options

    for name in BENCHMARKS.names():
        module = BENCHMARKS.get(name)
        assert module.add_arguments is options.ARGUMENTS[name]
        called = []
        monkeypatch.setattr(module, "run", lambda args, name=name, called=called: called.append((name, args.benchmark)))
        assert cli.main(["bench", name, "--threads", "1"]) is None and called == [(name, name)]


def test_the_option_name_lists_match_the_registries():
    """``gradgraph.bench.options`` keeps torch-free copies of two registries' names: they must stay equal."""
    from gradgraph.bench import options
    from gradgraph.bench.engines import ENGINES
    from gradgraph.optim.tasks import OPT_TASKS

    assert options.ENGINE_NAMES == tuple(ENGINES)
    assert options.OPT_TASK_NAMES == tuple(OPT_TASKS.names())


def test_the_curvature_grid_has_one_bar_over_every_run():
    """The grid's bar counts 3 per training model and 1 per validation model per epoch; a run stopped early
    gives its remaining epochs back and a run read back finished counts at once, so the bar ends full."""
    from gradgraph.bench.curvature import GridProgress
    from gradgraph.tasks.configs import CurvatureConfig

    class Data:
        def split_indices(self, n):
            return {"train": list(range(n)), "val": list(range(7)), "test": []}

    configs = [CurvatureConfig(model=m, train_size=n, epochs=4) for n in (2, 5) for m in ("gradmetanet", "gmn-average")]
    grid = GridProgress(configs, Data(), enabled=False)
    assert grid.total == 4 * 2 * (3 * 2 + 7) + 4 * 2 * (3 * 5 + 7)
    grid(configs[0], 1, False)
    grid(configs[0], 2, True)  # early stopping after 2 of 4 epochs
    grid(configs[1], 4, True)  # read back finished
    for e in range(1, 5):
        grid(configs[2], e, e == 4)
    grid(configs[3], 3, False)
    grid(configs[3], 4, True)
    assert grid.done == grid.total
    grid.close()


def test_an_off_scale_improvement_is_drawn_on_the_edge_with_its_value():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gradgraph.bench.curvature_report import FLOOR, _improvement_line

    fig, ax = plt.subplots()
    _improvement_line(ax, (10, 100), (-250.0, 5.0), "--", "x", "C0", "s-affine")
    assert min(ax.lines[0].get_ydata()) == FLOOR and ax.get_ylim()[0] < FLOOR
    assert [t.get_text() for t in ax.texts] == ["-250%"]
    plt.close(fig)
