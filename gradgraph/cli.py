"""The ``gradgraph`` command.

``gradgraph train <task>`` is generated from the task's config dataclass (every field an option, with its
help and default), so a registered task gets its command for free. Listing commands, tasks and benchmarks
imports no torch (``gradgraph --help`` is fast): a command's module is imported when the command runs, a
benchmark's module when it runs (its options come from the torch-free gradgraph.bench.options).
"""
from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import MISSING, fields, replace

from .bench import BENCHMARKS
from .bench.options import ARGUMENTS as BENCH_ARGUMENTS
from .bench.options import threads as threads_option
from .errors import ConfigError, GradGraphError, SampleMixingError, UnsupportedModuleError
from .registry import load_object
from .tasks import TASKS


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, unless its help already says what the default means."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(default" in text else super()._get_help_string(action)


# -- options from config dataclasses ---------------------------------------------------------------------
def _value_type(hint):
    """The value type of a field's type hint (``int | None`` -> ``int``; None stays a valid default)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else str
    return hint


def _preset(config_cls: type, argv: list[str]) -> dict:
    """The values of the preset named by ``--preset NAME`` (or ``--preset=NAME``) in ``argv``, if any."""
    presets = getattr(config_cls, "presets", {})
    for k, a in enumerate(argv):
        name = argv[k + 1] if a == "--preset" and k + 1 < len(argv) else a[9:] if a.startswith("--preset=") else None
        if name in presets:
            return presets[name]
    return {}


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, argv: list[str] | None = None) -> None:
    """One option per field of ``config_cls``, the task's own fields first: ``--train-size`` for
    ``train_size``, typed from the annotation, with the field's help, choices and default. A config with
    ``presets`` (named sets of defaults) gets ``--preset NAME``: the preset's values become the defaults, so
    options given explicitly still win (and ``--preset NAME --help`` shows them)."""
    presets = getattr(config_cls, "presets", {})
    chosen = _preset(config_cls, argv or [])
    if presets:
        parser.add_argument("--preset", choices=list(presets), default=None,
                            help="a named set of defaults: " + "; ".join(
                                f"{n}: " + ", ".join(f"{k}={v}" for k, v in p.items()) for n, p in presets.items())
                            + " (default: the values shown)")
    hints = typing.get_type_hints(config_cls)
    inherited = {f.name for base in config_cls.__mro__[1:] if hasattr(base, "__dataclass_fields__")
                 for f in fields(base)}
    own = [f for f in fields(config_cls) if f.name not in inherited]
    ordered = own + [f for f in fields(config_cls) if f not in own]
    for f in ordered:
        hint = _value_type(hints[f.name])
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        default = chosen.get(f.name, default)
        kwargs: dict = {"default": default, "help": f.metadata.get("help") or " ", "dest": f.name}
        choices = f.metadata.get("choices")
        if callable(choices):
            choices = choices()
        if choices:
            kwargs["choices"] = list(choices)
        flag = "--" + f.name.replace("_", "-")
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        origin = typing.get_origin(hint)
        if origin in (tuple, list):
            kwargs["nargs"] = "+"
            hint = typing.get_args(hint)[0]
        kwargs["type"] = hint if hint in (int, float, str) else str
        if not choices:
            kwargs["metavar"] = kwargs["type"].__name__.upper()
        parser.add_argument(flag, **kwargs)


def config_from_args(config_cls: type, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in fields(config_cls)}
    for f in fields(config_cls):
        if isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    try:
        return config_cls(**values)
    except ConfigError as e:  # name the option, not the field
        text = str(e)
        for f in fields(config_cls):
            text = text.replace(f"{config_cls.__name__}.{f.name} ", f"--{f.name.replace('_', '-')} ")
        raise ConfigError(text) from None


# -- commands --------------------------------------------------------------------------------------------
def _load_model(name: str, seed: int):
    """A reference model, or ``package.module:function`` returning a model with ``example_inputs()`` or a
    tuple ``(model, inputs[, targets, loss_fn])``."""
    import torch

    from .models import build_model

    torch.manual_seed(seed)
    made = build_model(name)
    if isinstance(made, tuple):
        model, inputs, *rest = made
        targets = rest[0] if rest else None
        loss_fn = rest[1] if len(rest) > 1 else None
        return model, inputs, targets, loss_fn
    return made, None, None, getattr(made, "per_sample_loss", None)


def cmd_inspect(args) -> int:
    import torch

    from .api import capture, coverage

    model, inputs, targets, loss_fn = _load_model(args.model, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    if inputs is None:
        if not hasattr(model, "example_inputs"):
            print(f"error: {args.model} returned a model without example_inputs(); return (model, inputs) "
                  "from the factory instead", file=sys.stderr)
            return 2
        inputs = model.example_inputs(args.batch_size, gen)
        if loss_fn is not None and hasattr(model, "example_targets"):
            targets = model.example_targets(args.batch_size, gen)
        else:
            loss_fn = None
    if args.coverage:
        print(f"coverage of {args.model} ({type(model).__name__}):\n{coverage(model, inputs)}\n")
    try:
        graph = capture(model, inputs, targets, loss_fn)
    except (UnsupportedModuleError, SampleMixingError):
        if not args.coverage:  # a refused model: every module's status, and the reason
            print(f"coverage of {args.model} ({type(model).__name__}):\n{coverage(model, inputs)}\n")
        return 2
    print(f"model: {args.model} ({type(model).__name__}), batch of {graph.num_samples}, "
          f"{'per-sample loss' if loss_fn else 'sum of outputs'} differentiated\n")
    print(graph.summary())
    psg = graph.per_sample_grads()
    print(f"\nper-sample gradients rebuilt from the graph for {len(psg)} parameter tensors")
    if args.draw:
        from .graph.plot import draw_graph

        draw_graph(graph, args.draw)
        print(f"drawing written to {args.draw}")
    return 0


def cmd_fisher(args) -> int:
    """Apply a trained curvature estimator to a model and print (and optionally save) its Fisher diagonal."""
    import torch

    from .api import capture
    from .data.siren_fisher import fisher_diagonal
    from .io import save_file
    from .tasks.curvature import load

    model, inputs, _, _ = _load_model(args.model, args.seed)
    if inputs is None:
        inputs = model.example_inputs(args.batch_size, torch.Generator().manual_seed(args.seed))
    est = load(args.run)
    fisher = est.predict(model, inputs)
    graph = capture(model, inputs)
    standard = graph.graph_to_params(fisher_diagonal(graph))
    print(f"Fisher diagonal of {args.model} ({type(model).__name__}) on a batch of {graph.num_samples}, estimated "
          f"by {args.run} ({est.cfg.model}); S: the empirical Fisher of the same gradients\n")
    print(f"{'parameter':32s} {'shape':>14s} {'mean estimate':>14s} {'mean S':>12s} {'estimate / S':>12s}")
    for name, v in fisher.items():
        s = standard[name]
        print(f"{name:32s} {str(tuple(v.shape)):>14s} {float(v.mean()):14.4g} {float(s.mean()):12.4g} "
              f"{float(v.mean() / s.mean()):12.3f}")
    if args.out:
        save_file({"model": args.model, "run": str(args.run), "fisher": fisher}, args.out, "fisher")
        print(f"\nwritten to {args.out} (gradgraph.io.load_file(path, 'fisher'))")
    return 0


def cmd_train(args) -> int:
    """Train one run of a task (under torchrun: one process per rank, see gradgraph.train.distributed)."""
    from .train.distributed import is_main, process_group
    from .train.loop import train

    cfg = config_from_args(args.config_cls, args)
    task_cls = load_object(cfg.task)
    with process_group(cfg.device) as device:
        cfg = replace(cfg, device=device)
        metrics = train(task_cls(cfg, progress=not args.quiet), progress=not args.quiet)
        if is_main():
            scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}  # not per-model lists
            print(json.dumps(scalars, indent=1))
            print(f"run folder: {cfg.run_dir}")
    return 0


def cmd_meta_train(args) -> int:
    """PES meta-training of a learned optimizer (gradgraph.optim.metatrain)."""
    from .optim.metatrain import run

    return run(args)


def cmd_bench(args) -> int:
    """Runs the benchmark named ``args.benchmark``: its module (and torch) is imported only now."""
    return BENCHMARKS.get(args.benchmark).run(args)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser (``argv`` picks the preset whose values ``train TASK --help`` shows as defaults)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="gradgraph", description="Gradient graphs and GradMetaNet metanetworks.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="capture a batch of a model and summarize its gradient graph",
                       formatter_class=_Formatter)
    p.add_argument("--model", default="mlp", help="mlp | siren | cnn | gpt | package.module:function")
    p.add_argument("--batch-size", type=int, default=8, help="samples in the batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the batch")
    p.add_argument("--draw", metavar="PNG", help="also draw the graph (networkx + matplotlib) to this file")
    p.add_argument("--coverage", action="store_true",
                   help="also print what gradgraph makes of every module (captured, glue, frozen, refused) and each "
                        "neuron space (permutable or fixed, and why); printed anyway when the model is refused")
    threads_option(p)
    p.set_defaults(func=cmd_inspect)

    f = sub.add_parser("fisher", help="estimate a model's Fisher diagonal with a trained curvature run",
                       formatter_class=_Formatter)
    f.add_argument("--run", required=True, help="a finished `gradgraph train curvature` run folder (or its best.pt)")
    f.add_argument("--model", default="mlp", help="mlp | siren | cnn | gpt | package.module:function")
    f.add_argument("--batch-size", type=int, default=32, help="samples whose gradients the estimate sees")
    f.add_argument("--seed", type=int, default=0, help="seed of the model and the batch")
    f.add_argument("--out", help="also save {name: tensor} here (gradgraph's versioned format)")
    threads_option(f)
    f.set_defaults(func=cmd_fisher)

    train = sub.add_parser("train", help="train a metanetwork on a task").add_subparsers(dest="task", required=True)
    for name in TASKS:
        config_cls = TASKS.get(name)
        t = train.add_parser(name, help=TASKS.help(name), description=(config_cls.__doc__ or "").strip(),
                             formatter_class=_Formatter)
        add_config_arguments(t, config_cls, argv if argv[:2] == ["train", name] else None)
        t.add_argument("--quiet", action="store_true", help="no progress bars")
        t.set_defaults(func=cmd_train, config_cls=config_cls)

    m = sub.add_parser("meta-train", help="meta-train a learned optimizer with PES (resumable)",
                       formatter_class=_Formatter)
    m.add_argument("--task", default="digits-mlp", help="digits-mlp | digits-mlp-w64 | text-gpt")
    m.add_argument("--variant", default="ds", help="sgdm | ds | ds+gradmetanet")
    m.add_argument("--steps", type=int, default=100, help="meta-steps to reach (counting resumed ones)")
    m.add_argument("--pairs", type=int, default=16, help="antithetic pairs (2x particles)")
    m.add_argument("--truncation", type=int, default=50, help="inner steps per meta-step (K)")
    m.add_argument("--horizon", type=int, help="inner horizon T (default: the task's)")
    m.add_argument("--sigma", type=float, default=0.01, help="PES perturbation scale")
    m.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the meta-parameters")
    m.add_argument("--scalar-lr", type=float, default=1e-2,
                   help="learning rate of the scalar step sizes alpha, mu, beta (log-scale numbers)")
    m.add_argument("--seed", type=int, default=0, help="seed of the meta-parameters and of PES")
    m.add_argument("--meta-loss", default="train", choices=["train", "val"],
                   help="per-step meta-loss: the training batch's loss before the update, or the validation loss "
                        "after it (rewards generalisation rather than memorising the training set)")
    m.add_argument("--init-from", metavar="RULE",
                   help="warm start: a shipped checkpoint's name (e.g. ds) or a rule.pt path of a simpler variant; "
                        "the new variant starts as that rule, its extra MLP inputs at zero weight")
    m.add_argument("--set-size", type=int, metavar="K",
                   help="graph variants: GradMetaNet reads the first K samples of each step's batch (default: all; "
                        "its cost is linear in K)")
    m.add_argument("--compile", action="store_true",
                   help="graph variants: GradMetaNet's forward through torch.compile (compiles once, ~10 s; measured "
                        "2x faster per forward on digits-mlp)")
    m.add_argument("--loop", action="store_true",
                   help="one optimizer per particle even where the particles can be stacked (sgdm, ds)")
    m.add_argument("--out", default="runs/meta-train", help="run folder (resumed if it holds a checkpoint)")
    m.add_argument("--save-every", type=int, default=10, help="meta-steps between checkpoints")
    threads_option(m)
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=cmd_meta_train)

    bench = sub.add_parser("bench", help="run a benchmark and write its markdown table")
    benches = bench.add_subparsers(dest="benchmark", required=True)
    for name in BENCHMARKS:  # the options come from a torch-free module; the benchmark loads when it runs
        b = benches.add_parser(name, help=BENCHMARKS.help(name), description=BENCHMARKS.help(name),
                               formatter_class=_Formatter)
        BENCH_ARGUMENTS[name](b)
        b.set_defaults(func=cmd_bench)
    return parser


def _apply_thread_policy(args: argparse.Namespace) -> None:
    """``--threads`` if given, else ``$OMP_NUM_THREADS``, else 1 (gradgraph.threads); the count is written back
    to ``args.threads`` so that a command (and a training config) records what it ran with."""
    from .threads import set_threads

    args.threads = set_threads(getattr(args, "threads", None))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        _apply_thread_policy(args)
        return args.func(args)
    except GradGraphError as e:  # a message written for the user: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
