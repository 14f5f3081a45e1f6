"""The ``gradgraph`` command."""
from __future__ import annotations

import argparse
import sys

import torch


def _load_model(name: str, seed: int):
    """A reference model, or ``package.module:function`` returning a model with ``example_inputs()`` or a
    tuple ``(model, inputs[, targets, loss_fn])``."""
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
    import gradgraph

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
    graph = gradgraph.capture(model, inputs, targets, loss_fn)
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


def cmd_train_curvature(args) -> int:
    import json
    import os

    import torch.distributed as dist

    from .tasks.curvature import CurvatureConfig, train_curvature

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # started by torchrun
    device = args.device
    if distributed:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device == "cuda":  # one GPU per process: torchrun's LOCAL_RANK picks it
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    cfg = CurvatureConfig(model=args.model, train_size=args.train_size, seed=args.seed, epochs=args.epochs,
                          patience=args.patience, batch_size=args.batch_size, lr=args.lr,
                          num_models=args.num_models, num_points=args.num_points, out_dir=args.out_dir,
                          device=device)
    try:
        metrics = train_curvature(cfg, progress=not args.quiet)
    finally:
        if distributed:
            dist.destroy_process_group()
    if not distributed or int(os.environ.get("RANK", "0")) == 0:
        summary = {k: v for k, v in metrics.items() if k not in ("history", "config")}
        print(json.dumps(summary, indent=1))
        print(f"run folder: {cfg.run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradgraph", description="Gradient graphs and GradMetaNet metanetworks.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="capture a batch of a model and summarize its gradient graph")
    p.add_argument("--model", default="mlp", help="mlp | siren | cnn | gpt | package.module:function (default mlp)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draw", metavar="PNG", help="also draw the graph (networkx + matplotlib) to this file")
    p.set_defaults(func=cmd_inspect)
    from .tasks.curvature import MODELS

    train = sub.add_parser("train", help="train a metanetwork on a task").add_subparsers(dest="task", required=True)
    c = train.add_parser("curvature", help="predict SIREN Fisher diagonals from 128 gradients (paper Sec. 5.1)")
    c.add_argument("--model", choices=MODELS, default="gradmetanet")
    c.add_argument("--train-size", type=int, default=2000)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--epochs", type=int, default=100)
    c.add_argument("--patience", type=int, default=None, help="early stopping patience (default: none)")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--num-models", type=int, default=3000, help="dataset size (500 test, 500 validation)")
    c.add_argument("--num-points", type=int, default=128, help="gradients per graph")
    c.add_argument("--out-dir", default="runs/curvature")
    c.add_argument("--device", default="cpu")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_train_curvature)
    from .bench import add_bench_parsers

    add_bench_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
