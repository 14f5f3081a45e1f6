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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradgraph", description="Gradient graphs and GradMetaNet metanetworks.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="capture a batch of a model and summarize its gradient graph")
    p.add_argument("--model", default="mlp", help="mlp | siren | cnn | gpt | package.module:function (default mlp)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draw", metavar="PNG", help="also draw the graph (networkx + matplotlib) to this file")
    p.set_defaults(func=cmd_inspect)
    from .bench import add_bench_parsers

    add_bench_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
