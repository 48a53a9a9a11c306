"""`softmux` command line: serve | prepare-model (train and bench to come)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from server import __version__
from server.config import add_arguments, default_cache_dir, from_namespace


def _serve(ns: argparse.Namespace) -> int:
    from server.api.app import run_server  # lazy: keeps other subcommands free of the web stack

    run_server(from_namespace(ns))
    return 0


def _prepare_model(ns: argparse.Namespace) -> int:
    from server.models import ensure_default_model  # lazy: importing transformers takes seconds

    print(ensure_default_model(ns.cache_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softmux", description=__doc__)
    parser.add_argument("--version", action="version", version=f"softmux {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP server")
    add_arguments(serve)
    serve.set_defaults(func=_serve)

    prep = sub.add_parser("prepare-model", help="convert the bundled default model into the cache")
    prep.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="default: %(default)s")
    prep.set_defaults(func=_prepare_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    level = str(getattr(ns, "log_level", "info")).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(ns.func(ns))


if __name__ == "__main__":
    sys.exit(main())
