"""The ``w2sd`` command. Errors in user input print one line (no traceback) and exit with status 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .errors import W2SDError

# name -> (module, help). Each module has add_arguments(parser) and run(args) -> int; imported lazily so that
# `w2sd toy` never pays for the SDXL code and vice versa.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "toy": ("toy.cli", "run the toy validators (built-in Gaussian-mixture cases, or --config CASE.json)"),
    "toy-bench": ("toy.bench.cli", "benchmark W2SD vs strong sampling and autoguidance at equal NFE on toy pairs"),
    "sdxl": ("w2sd.sdxl.cli", "W2SD on SDXL: weak / strong / W2SD images per seed (the published demo)"),
}


def _load(module: str):
    import importlib

    return importlib.import_module(module)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="w2sd", description="Weak-to-Strong Diffusion with Reflection (W2SD).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = _load(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args._run
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print("w2sd: interrupted", file=sys.stderr)
        return 130
    except (W2SDError, ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError) as e:
        msg = str(e) or type(e).__name__
        if isinstance(e, FileNotFoundError) and e.filename and e.filename not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"w2sd: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
