"""gradgraph.bench.capture, its engines (bench.engines) and its report (bench.capture_report) on tiny sizes:
every engine computes the gradients the graph holds, the tables have their columns, the memory measurement
sees a step's allocations, the command runs. No timing assertions."""
import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_tensors_close

import gradgraph
from gradgraph.bench import capture as bench
from gradgraph.bench import capture_report, engines
from gradgraph.bench.engines import ENGINES, PEERS, engine_grads, prepare, quiet
from gradgraph.cli import main
from gradgraph.errors import UnknownNameError

CONFIGS = {
    "mlp": bench.Config("mlp", 3, width=5, depth=2),
    "cnn": bench.Config("cnn", 3),
    "gpt": bench.Config("gpt", 2, kwargs=(("block_size", 6), ("d_model", 8), ("n_heads", 2))),
    "hf-gpt2": bench.Config("hf-gpt2", 2, kwargs=(("vocab_size", 40), ("block_size", 6), ("d_model", 8),
                                                  ("n_head", 2))),
    "hf-resnet": bench.Config("hf-resnet", 2, kwargs=(("image_size", 16), ("hidden_sizes", (8, 16)), ("depths", (1, 1)),
                                                      ("embedding_size", 8))),
}

# (family, engine) pairs that do not run or do not compute the per-sample gradients, and why
UNSUPPORTED = {("gpt", "backpack"): "no LayerNorm extension", ("hf-gpt2", "backpack"): "no Conv1D extension",
               ("hf-gpt2", "opacus"): "wrong position-embedding gradients (HF's position_ids are [1, T])",
               ("hf-resnet", "opacus"): "refuses BatchNorm", ("hf-resnet", "backpack"): "fails in its backward hook"}
SUPPORTED = [(f, e) for f in sorted(CONFIGS) for e in ENGINES if (f, e) not in UNSUPPORTED]


def test_unsupported_engine_is_reported_with_its_reason():
    """BackPACK has no LayerNorm extension: the benchmark reports that instead of running it on the GPT."""
    model = CONFIGS["gpt"].build(dtype=torch.float64)[0]
    reason = ENGINES.get("backpack").unsupported(model)
    assert reason is not None and "LayerNorm" in reason
    assert all(ENGINES.get(e).unsupported(CONFIGS[f].build(dtype=torch.float64)[0]) is None for f, e in SUPPORTED)


def test_opacus_on_hf_gpt2_is_flagged_as_wrong():
    """Opacus runs on Hugging Face's GPT-2 but its position-embedding gradients are not per-sample (HF passes
    position ids of shape [1, T]); the agreement check measures the difference and the table says so."""
    diff = bench.agreement(CONFIGS["hf-gpt2"], ["gradgraph", "opacus"], "cpu", dtype=torch.float64)
    assert diff["gradgraph"] == 0.0 and isinstance(diff["opacus"], float) and diff["opacus"] > 0.1
    row = _row(CONFIGS["hf-gpt2"], {"plain": 2, "gradgraph": 3, "opacus": 4}, {"plain": 1, "gradgraph": 2, "opacus": 3},
               diff={"gradgraph": 0.0, "opacus": diff["opacus"]})
    table = "\n".join(capture_report.main_table([row], ["plain", "gradgraph", "opacus"]))
    assert [ln for ln in table.splitlines() if "Opacus" in ln][0].count("**wrong gradients**") == 1
    assert "wrong" not in [ln for ln in table.splitlines() if "gradgraph.capture" in ln][0]


@pytest.mark.parametrize("family,engine", SUPPORTED)
def test_every_engine_returns_the_graphs_gradients(family, engine):
    """The comparison is apples to apples: per-sample gradients equal graph.per_sample_grads() (plain: .grad
    equals graph.grads()), in float64, for every engine that supports the model."""
    model, x, y, loss_fn = CONFIGS[family].build(dtype=torch.float64)
    graph = gradgraph.capture(model, x, y, loss_fn)
    want = graph.grads() if engine == "plain" else graph.per_sample_grads()
    got = engine_grads(engine, model, x, y, loss_fn)
    assert_tensors_close(got, want)
    assert all(p.grad is None for p in model.parameters())  # engines work on their own copy of the model


def test_steps_leave_no_state_behind():
    """A step's memory belongs to its result: .grad and the peers' per-sample attributes are cleared, so that
    dropping the result frees everything (the memory measurement relies on it)."""
    model, x, y, loss_fn = CONFIGS["mlp"].build()
    for engine in ("plain", "opacus", "backpack"):
        inner = copy.deepcopy(model)
        step = ENGINES.get(engine).prepare(inner, loss_fn)
        with quiet():
            result = step(x, y)
        assert set(result) == {n for n, _ in model.named_parameters()}
        for p in inner.parameters():
            assert p.grad is None and getattr(p, "grad_sample", None) is None
            assert getattr(p, "grad_batch", None) is None


def test_engines_are_a_registry_in_the_report_order():
    assert ENGINES.names() == ["plain", "gradgraph", "vmap", "opacus", "backpack"]
    assert PEERS == ("vmap", "opacus", "backpack")
    assert ENGINES.help("vmap") == "torch.func vmap(grad)"
    with pytest.raises(UnknownNameError, match="unknown capture engine 'jax'"):
        ENGINES.get("jax")


def test_vmap_engine_builds_the_oracle_once_per_batch(monkeypatch):
    """The timed vmap step reuses the function gradgraph.oracle built on the first (warm-up) step."""
    built = []
    real = engines.make_per_sample_grads
    monkeypatch.setattr(engines, "make_per_sample_grads", lambda *a, **k: built.append(a) or real(*a, **k))
    model, x, y, loss_fn = CONFIGS["mlp"].build(dtype=torch.float64)
    step = prepare("vmap", model, loss_fn)
    first, second = step(x, y), step(x, y)
    assert len(built) == 1
    assert_tensors_close(second, first)
    step(x[:2], y[:2])  # another batch: built anew
    assert len(built) == 2


def test_agreement_reports_small_differences_and_the_graph_as_reference():
    diff = bench.agreement(CONFIGS["cnn"], list(ENGINES), "cpu")
    assert set(diff) == set(ENGINES)
    assert diff["gradgraph"] == 0.0
    assert all(isinstance(v, float) and v < 1e-4 for v in diff.values())


def _row(config, times_ms, peaks_mib, **kw):
    row = capture_report.Row(config, 1000, repeats=3, **kw)
    row.times = {e: [t / 1e3] * 3 for e, t in times_ms.items()}
    row.memory = {e: capture_report.Memory(int(m * 2 ** 20), "test") for e, m in peaks_mib.items()}
    return row


def test_report_has_every_figure_and_its_ratio_to_plain():
    engines = list(ENGINES)
    mlp = _row(bench.Config("mlp", 128, width=1024), {"plain": 10, "gradgraph": 12, "vmap": 100, "opacus": 80,
                                                      "backpack": 60},
               {"plain": 8, "gradgraph": 4, "vmap": 1000, "opacus": 1500, "backpack": 1100},
               feature_bytes=100, psg_bytes=10_000, graph_bytes=300, theory=[0.002, 0.002, 0.1])
    gpt = _row(CONFIGS["gpt"], {"plain": 2, "gradgraph": 5, "vmap": 6, "opacus": 4},
               {"plain": 1, "gradgraph": 2, "vmap": 3, "opacus": 3},
               skipped={"backpack": "BackPACK 1.7.1 BatchGrad has no extension for LayerNorm"})
    text = capture_report.report([mlp, gpt], engines, "test machine", "gradgraph bench capture --tiny")
    lines = text.splitlines()
    assert "Machine: test machine  " in lines and any("gradgraph bench capture --tiny" in ln for ln in lines)
    for columns in (capture_report.MAIN_COLUMNS, capture_report.TARGET_COLUMNS, capture_report.REPR_COLUMNS):
        assert "| " + " | ".join(columns) + " |" in lines
    main_rows = [ln for ln in lines if ln.startswith("| MLP 1024x2 | 128 | 1,000 |")]
    assert len(main_rows) == len(engines)
    capture_row = next(ln for ln in main_rows if "gradgraph.capture" in ln).split(" | ")
    assert capture_row[4:8] == ["12.00", "1.20x", "4.00", "0.50x"]
    target = next(ln for ln in lines if ln.startswith("| MLP 1024x2 | 128 | 1.20x |"))
    assert "BackPACK BatchGrad | 5.00x | 275.00x | 250.00x |" in target  # fastest peer: BackPACK (60 ms)
    assert any("LayerNorm" in ln for ln in lines if ln.startswith("| GPT"))  # the skip reason is stated
    assert any(ln.startswith("| MLP 1024x2 | 128 | 100 | 10,000 | 0.01 |") for ln in lines)


def test_the_memory_measurement_sees_the_per_sample_gradients():
    """A fresh worker process (the default method) measures the per-sample gradients a vmap step returns
    (64 samples x 134,154 float32 parameters = 34 MB; buffers under 64 KiB may come from already resident
    heap, hence the 2 % slack)."""
    config = bench.Config("mlp", 64, width=256, depth=2)
    mem = bench.peak_memory(config, "vmap", "cpu", "subprocess")
    assert mem.peak is not None, mem.note
    if sys.platform.startswith("linux"):
        assert mem.method == "VmHWM - VmRSS"
    params = 2 * (256 * 256 + 256) + 256 * 10 + 10
    assert mem.peak >= 0.98 * 64 * params * 4


def test_cli_runs_a_tiny_grid(tmp_path, capsys):
    out = tmp_path / "capture.md"
    assert main(["bench", "capture", "--tiny", "--memory", "inprocess", "--threads", "1", "--output", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out.split("written to")[0].rstrip("\n") + "\n"
    assert "Machine: " in text and "--tiny" in text
    for engine in ENGINES:
        assert ENGINES.get(engine).title in text
    assert "| MLP 16x2 | 4 |" in text and "| CNN (reference) | 4 |" in text and "| GPT (reference) | 2 |" in text


def test_benchmarks_script_has_the_same_options(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "capture.py"
    spec = importlib.util.spec_from_file_location("benchmarks_capture", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    assert "--widths" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no GPU")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert main(["bench", "capture", "--tiny", "--device", "cuda", "--output", "unused.md"]) == 2
    assert "cuda" in capsys.readouterr().err
