"""The ``kzoo`` command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _bench(args: argparse.Namespace) -> int:
    import torch

    from kzoo.bench import rational

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.what == "rational":
        result = rational.run(device, batch=args.batch, repeats=args.repeats, out_dir=Path(args.out))
        print(rational.table(result["payload"]))
        print(f"\nwrote {result['json']} and {result['plot']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kzoo.demo import rational_demo

    return rational_demo(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kzoo", description="kzoo: vision models on custom Triton kernels")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="benchmark kzoo's kernels and models")
    bench.add_argument("what", choices=["rational"], help="what to benchmark")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--batch", type=int, default=None, help="override the batch size of the KAT shapes")
    bench.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    bench.add_argument("--out", default="bench/results", help="folder for the JSON results and PNG plot")
    bench.set_defaults(run=_bench)

    demo = commands.add_parser("demo", help="show what kzoo does so far")
    demo.add_argument("--out", default="runs/demo", help="folder for the demo's pictures")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
