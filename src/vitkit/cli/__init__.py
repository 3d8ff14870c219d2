"""`vitkit` command line: a thin layer over the library, one module per command."""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module in vitkit.cli that defines add_parser(subparsers) and run(args) -> int
COMMANDS = {
    "models": "models",
    "flops": "flops",
    "bench": "bench",
    "export": "export",
    "attention": "attention",
    "train": "train",
    "pretrain": "pretrain",
    "eval": "eval",
    "predict": "predict",
    "submit": "submit",
    "convert": "convert",
    "quantize": "quantize",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description="Vision Transformer backbones: build, train, evaluate, convert.")
    from vitkit.core.version import __version__

    parser.add_argument("--version", action="version", version=f"vitkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(f"vitkit.cli.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc N` starts it again
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # user-facing failures: one line, no traceback (VITKIT_DEBUG=1 shows it)
        import os

        if os.environ.get("VITKIT_DEBUG"):
            raise
        print(f"vitkit {args.command}: error: {err}", file=sys.stderr)
        return 2
