"""The options of every benchmark (``gradgraph bench NAME --help``), without torch: the command line builds a
benchmark's parser from here in a fraction of a second and imports the benchmark's module (and torch) only to
run it. Each benchmark module takes its ``add_arguments`` and presets from here, so there is one copy of each.

Two name lists are copies of registries that live with torch (the capture engines, the optimizer tasks); a test
keeps them equal to the registries.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

from ..tasks.configs import CURVATURE_MODELS, EDITING_MODELS, TRACE_MODELS, CurvatureConfig

__all__ = ["ARGUMENTS", "threads"]

THREADS_HELP = "torch intra-op threads (default: $OMP_NUM_THREADS if set, else 1: fastest for gradgraph's small ops)"

# copies of gradgraph.bench.engines.ENGINES and gradgraph.optim.tasks.OPT_TASKS (tests/test_bench.py checks them)
ENGINE_NAMES = ("plain", "gradgraph", "vmap", "opacus", "backpack")
OPT_TASK_NAMES = ("digits-mlp", "digits-mlp-w64", "text-gpt")

CAPTURE_OUTPUT = "benchmarks/results/capture.md"
CAPTURE_MODELS = ("mlp", "cnn", "gpt", "hf-gpt2", "hf-resnet")
CURVATURE_MODEL_NAMES = tuple(CURVATURE_MODELS)
EDITING_MODEL_NAMES = tuple(EDITING_MODELS)
# "ds+gradmetanet@K": GradMetaNet reads the first K samples of the batch (the variant's set_size); ":compiled":
# its forward through torch.compile (LearnedOptimizer(compile=True))
LOPT_STEP_OPTIMIZERS = ("adam", "sgdm", "ds", "ds+gradmetanet", "ds+gradmetanet:compiled", "ds+gradmetanet@32",
                        "ds+gradmetanet@32:compiled")
LOPT_STEP_SIZES = {"digits": (64, (32,), 10), "w1024": (784, (1024, 1024), 10)}
METANET_MODELS = ("gradmetanet", "gradmetanet++", "gmn-concat")
NORMS_ENGINES = ("plain", "gradgraph", "opacus-ghost", "vmap")

CURVATURE_PRESETS = {
    # the paper's protocol
    "paper": dict(num_models=3000, sizes=(10, 30, 100, 300, 1000, 2000), seeds=(0, 1, 2, 3, 4), epochs=100,
                  patience=None, models=CURVATURE_MODEL_NAMES),
    # what fits a 2-core CPU machine in a few hours (see the README for what was run)
    "cpu": dict(num_models=3000, sizes=(10, 100, 500, 2000), seeds=(0, 1, 2), epochs=100, patience=15,
                models=CURVATURE_MODEL_NAMES),
    # the main job of `make demo`: a few minutes
    "demo": dict(num_models=300, sizes=(10, 100), seeds=(0,), epochs=10, patience=None,
                 models=("gradmetanet", "gmn-average", "neuron-asym")),
    # for tests: seconds
    "tiny": dict(num_models=45, num_points=8, sizes=(5,), seeds=(0,), epochs=2, patience=None,
                 models=("gradmetanet", "gmn-average")),
}

TRACE_PRESETS = {
    # one run per model, 46 min of training each on one thread of the 2-core CPU (the scaled variant's defaults)
    "cpu": dict(models=tuple(TRACE_MODELS), sizes=(500,), seeds=(0,), epochs=15, num_models=1000, width=1024,
                num_points=32),
    # more seeds and a smaller training set (6 runs; not run yet)
    "cpu-seeds": dict(models=("gradmetanet",), sizes=(100, 500), seeds=(0, 1, 2), epochs=15, num_models=1000,
                      width=1024, num_points=32),
    # for tests: seconds
    "tiny": dict(models=("gradmetanet",), sizes=(10,), seeds=(0,), epochs=2, num_models=30, width=8,
                 num_points=6),
}

EDITING_PRESETS = {
    # the protocol: every model, 3 seeds, up to 100 epochs with early stopping
    "full": dict(num_images=1797, seeds=(0, 1, 2), epochs=100, patience=15, models=EDITING_MODEL_NAMES),
    # what a 2-core CPU session fits (48 min on one core, measured): every model, 3 seeds, 10 epochs at lr 3e-3
    "cpu": dict(num_images=1797, seeds=(0, 1, 2), epochs=10, patience=None, lr=3e-3,
                models=("ws", "ws+probe", "ws+probe+target", "ws+gradmetanet", "ws+gradmetanet++",
                        "ws+gradmetanet+oce")),
    # longer training of the main rows, one seed (~30 min on a shared 2-core CPU)
    "cpu-long": dict(num_images=1797, seeds=(0,), epochs=30, patience=None, lr=3e-3,
                     models=("ws", "ws+probe+target", "ws+gradmetanet", "ws+gradmetanet+oce")),
    # for tests: seconds
    "tiny": dict(num_images=40, fit_steps=100, seeds=(0,), epochs=1, patience=None, models=("ws", "ws+gradmetanet"),
                 adam_grid={"k": (0, 3), "lr": (1e-3,)}),
}

LOPT_PRESETS = {
    # digits-mlp and its width transfer, 5 seeds (~10 min with ds and sgdm on a 2-core CPU)
    "cpu": dict(tasks=("digits-mlp", "digits-mlp-w64"), seeds=5, tune_seeds=2, steps=None, eval_every=20),
    # adds the text task (the generalisation row; ~1 h on CPU)
    "full": dict(tasks=("digits-mlp", "digits-mlp-w64", "text-gpt"), seeds=5, tune_seeds=2, steps=None,
                 eval_every=20),
    # for tests: seconds
    "tiny": dict(tasks=("digits-mlp",), seeds=2, tune_seeds=1, steps=30, eval_every=10, lr_grid=(0.002, 0.01)),
}


def threads(parser: argparse.ArgumentParser) -> None:
    """``--threads N``, the one thread option of every command (see :mod:`gradgraph.threads`)."""
    parser.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)


def capture(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("grid")
    g.add_argument("--models", nargs="+", choices=CAPTURE_MODELS, default=list(CAPTURE_MODELS),
                   help="mlp: the width x batch grid; cnn, gpt: gradgraph's reference models; hf-gpt2, hf-resnet: "
                        "Hugging Face GPT2LMHeadModel and ResNetForImageClassification from random configs")
    g.add_argument("--widths", nargs="+", type=int, default=[256, 1024, 2048],
                   help="MLP widths (default 256 1024 2048)")
    g.add_argument("--batches", nargs="+", type=int, default=[32, 128], help="MLP batch sizes (default 32 128)")
    g.add_argument("--depth", type=int, default=2, help="MLP hidden layers (default 2)")
    g.add_argument("--ref-batches", nargs="+", type=int, default=[128],
                   help="batch sizes of the reference CNN and GPT (default 128)")
    g.add_argument("--cnn", default="{}", metavar="JSON", help='reference CNN arguments, e.g. \'{"image_size": 16}\'')
    g.add_argument("--gpt", default="{}", metavar="JSON", help='reference GPT arguments, e.g. \'{"d_model": 128}\'')
    g.add_argument("--hf-batches", nargs="+", type=int, default=[8], help="batch sizes of the Hugging Face models")
    g.add_argument("--hf-gpt2", default="{}", metavar="JSON",
                   help='HF GPT-2 arguments (default: 2 blocks, width 256, sequence 128), e.g. \'{"n_layer": 4}\'')
    g.add_argument("--hf-resnet", default="{}", metavar="JSON",
                   help="HF ResNet arguments (default: ResNet-18's layout at 64x64 pixels), e.g. "
                        "'{\"image_size\": 32}'")
    g.add_argument("--tiny", action="store_true", help="a seconds-long smoke grid (MLP 16x2, CNN, GPT; tiny batches)")
    m = parser.add_argument_group("measurement")
    m.add_argument("--engines", nargs="+", choices=ENGINE_NAMES, default=list(ENGINE_NAMES))
    m.add_argument("--device", default="cpu", help="cpu or cuda (every engine on the GPU, CUDA memory stats)")
    m.add_argument("--repeats", type=int, default=7, help="timed steps per engine (default 7)")
    m.add_argument("--warmup", type=int, default=2, help="untimed steps before (default 2)")
    m.add_argument("--budget", type=float, default=20.0,
                   help="seconds of timed steps per engine and configuration after which it stops at 3 (default 20)")
    m.add_argument("--memory", choices=("subprocess", "inprocess", "off"), default="subprocess",
                   help="peak memory: a fresh process per engine (default), this process, or not at all")
    m.add_argument("--memory-jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="memory worker processes at a time (default: 2, or 1 on one core)")
    m.add_argument("--max-gb", type=float, default=8.0,
                   help="skip per-sample-gradient peers whose gradients alone exceed this many GiB (default 8)")
    m.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing every engine's gradients with the graph's")
    m.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=CAPTURE_OUTPUT, help=f"markdown file (default {CAPTURE_OUTPUT})")
    threads(parser)


def curvature(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(CURVATURE_PRESETS), default="demo", help="grid to run")
    p.add_argument("--models", nargs="+", choices=CURVATURE_MODEL_NAMES, help="override the preset's models")
    p.add_argument("--sizes", nargs="+", type=int, help="override the training-set sizes")
    p.add_argument("--seeds", nargs="+", type=int, help="override the seeds")
    p.add_argument("--epochs", type=int, help="override the epochs")
    p.add_argument("--patience", type=int, help="early stopping patience (epochs)")
    p.add_argument("--num-models", type=int, help="dataset size")
    output = next(f for f in dataclasses.fields(CurvatureConfig) if f.name == "output")
    p.add_argument("--output", choices=output.metadata["choices"], default=output.default,
                   help="the task's output (positive: S * exp(h); shrink: s-shrink * exp(h); z: the paper's)")
    p.add_argument("--loss", choices=("normalized", "log", "z"), default="normalized", help="training loss")
    p.add_argument("--select", choices=("nmse", "logratio", "mse"), default="nmse",
                   help="validation metric for early stopping")
    p.add_argument("--no-calibrated", dest="calibrated", action="store_false",
                   help="skip the calibrated baselines (they take about a minute per training size)")
    p.add_argument("--datasets-dir", help="parent folder of the datasets (default $GRADGRAPH_DATASETS or datasets/)")
    p.add_argument("--out-dir", help="run folders (default runs/curvature-<preset>: a run folder belongs to one set "
                   "of settings, so presets do not share one)")
    p.add_argument("--results", default="benchmarks/results", help="where the table and plot go")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th job starting at i; start n processes with "
                   "shards 0/n .. n-1/n to fill a machine or a GPU, then --report-only")
    p.add_argument("--report-only", action="store_true", help="only aggregate finished runs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    threads(p)


def curvature_trace(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(TRACE_PRESETS), default="cpu", help="grid to run (default cpu)")
    p.add_argument("--models", nargs="+", choices=list(TRACE_MODELS), help="override the preset's models")
    p.add_argument("--width", type=int, help="override the SIREN's hidden width (1024: 1.05M parameters, 43 min of "
                   "training; 128: 2.6 min)")
    p.add_argument("--sizes", nargs="+", type=int, help="override the training-set sizes")
    p.add_argument("--seeds", nargs="+", type=int, help="override the seeds")
    p.add_argument("--epochs", type=int, help="override the epochs")
    p.add_argument("--datasets-dir", help="parent folder of the datasets (default $GRADGRAPH_DATASETS or datasets/)")
    p.add_argument("--out-dir", help="run folders (default runs/curvature-trace-<preset>)")
    p.add_argument("--results", default="benchmarks/results", help="where the table and plot go")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    p.add_argument("--report-only", action="store_true", help="only aggregate finished runs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    threads(p)


def editing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(EDITING_PRESETS), default="cpu", help="grid to run (default cpu)")
    p.add_argument("--models", nargs="+", choices=EDITING_MODEL_NAMES, help="override the preset's models")
    p.add_argument("--seeds", nargs="+", type=int, help="override the seeds")
    p.add_argument("--epochs", type=int, help="override the epochs")
    p.add_argument("--patience", type=int, help="early stopping patience (epochs)")
    p.add_argument("--batch-size", type=int, default=32, help="INRs per step (default 32)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: the preset's, else 1e-3)")
    p.add_argument("--dataset-root", help="dataset folder (default datasets/digit_inrs)")
    p.add_argument("--out-dir", default="runs/editing", help="run folders (default runs/editing)")
    p.add_argument("--results", default="benchmarks/results", help="where the table and plot go")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:k] (default cpu)")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th job starting at i (default 0/1)")
    p.add_argument("--report-only", action="store_true", help="only aggregate finished runs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    threads(p)


def lopt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(LOPT_PRESETS), default="cpu", help="tasks, seeds and sizes (default cpu)")
    p.add_argument("--tasks", nargs="+", choices=list(OPT_TASK_NAMES), help="override the preset's tasks")
    p.add_argument("--optimizers", nargs="+", help="learned optimizers to compare with Adam (default: every "
                   "shipped checkpoint and every --rules name)")
    p.add_argument("--rules", nargs="+", default=[], metavar="NAME=PATH",
                   help="evaluate a meta-train run's rule.pt under NAME (e.g. ds-run=runs/meta/ds/rule.pt)")
    p.add_argument("--seeds", type=int, help="evaluation seeds per optimizer (default: the preset's)")
    p.add_argument("--steps", type=int, help="training steps per run (default: the task's horizon)")
    p.add_argument("--eval-every", type=int, help="steps between test evaluations (default: the preset's)")
    p.add_argument("--out-dir", default="runs/lopt", help="cache of finished runs (default runs/lopt)")
    p.add_argument("--results", default="benchmarks/results/lopt", help="where the table and plot go")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    threads(p)


def lopt_step(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", nargs="+", choices=list(LOPT_STEP_SIZES), default=list(LOPT_STEP_SIZES))
    p.add_argument("--optimizers", nargs="+", choices=LOPT_STEP_OPTIMIZERS, default=list(LOPT_STEP_OPTIMIZERS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--inner", type=int, default=5, help="steps per timed sample (default 5)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (small model, 1 repeat)")
    p.add_argument("--output", default="benchmarks/results/lopt_step.md")
    threads(p)


def metanet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", choices=METANET_MODELS, default=list(METANET_MODELS))
    p.add_argument("--widths", nargs="+", type=int, help="hidden widths of the base MLP (default 32..256)")
    p.add_argument("--set-sizes", nargs="+", type=int, help="set sizes b (default 16..1024)")
    p.add_argument("--fixed-width", type=int, default=64, help="width in the set-size sweep (default 64)")
    p.add_argument("--fixed-set-size", type=int, default=128, help="set size in the width sweep (default 128)")
    p.add_argument("--hidden", type=int, default=32, help="metanetwork width f (default 32)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--memory", choices=["subprocess", "inprocess", "off"], default="subprocess")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke grid")
    p.add_argument("--output", default="benchmarks/results/metanet.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    threads(p)


def norms(p: argparse.ArgumentParser) -> None:
    p.add_argument("--widths", nargs="+", type=int, default=[256, 1024], help="MLP widths (2 hidden layers)")
    p.add_argument("--batches", nargs="+", type=int, default=[32, 128], help="MLP batch sizes")
    p.add_argument("--models", nargs="+", choices=CAPTURE_MODELS[1:], default=["cnn", "gpt", "hf-gpt2"],
                   help="other models of `gradgraph bench capture` (at their default sizes)")
    p.add_argument("--model-batches", nargs="+", type=int, default=[8], help="batch sizes of those models")
    p.add_argument("--engines", nargs="+", choices=NORMS_ENGINES, default=list(NORMS_ENGINES))
    p.add_argument("--repeats", type=int, default=7, help="timed steps per engine")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before")
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed steps per engine, then it stops at 3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke grid")
    p.add_argument("--output", default="benchmarks/results/norms.md", help="markdown file")
    threads(p)


# benchmark name -> the function that adds its options to a parser
ARGUMENTS = {"capture": capture, "curvature": curvature, "curvature-trace": curvature_trace, "editing": editing,
             "lopt": lopt, "lopt-step": lopt_step, "metanet": metanet, "norms": norms}
