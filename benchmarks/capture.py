"""Capture speed and memory, side by side with the per-sample-gradient libraries.

    python benchmarks/capture.py [options]      # the same as: gradgraph bench capture [options]

The benchmark itself lives in :mod:`gradgraph.bench.capture` (``--help`` lists the options); the table is
written to benchmarks/results/capture.md.
"""
import argparse
import sys

from gradgraph.bench import capture


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/capture.py", description=capture.__doc__.splitlines()[0])
    capture.add_arguments(parser)
    return capture.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
