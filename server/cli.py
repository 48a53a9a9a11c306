"""`softmux` command line: serve | serve-ray | prepare-model | train | bench."""

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


def _serve_ray(ns: argparse.Namespace) -> int:
    try:
        from server.deploy.ray_app import serve_ray  # lazy: needs the `ray` extra
    except ImportError as e:
        raise SystemExit(f"softmux serve-ray needs Ray Serve: pip install 'softmux[ray]' ({e})") from None

    return serve_ray(ns)


def _add_serve_ray_arguments(p: argparse.ArgumentParser) -> None:
    from server.deploy.options import add_ray_arguments  # light: no Ray import

    add_ray_arguments(p)
    p.set_defaults(func=_serve_ray)


def _prepare_model(ns: argparse.Namespace) -> int:
    from server.models import ensure_default_model  # lazy: importing transformers takes seconds

    print(ensure_default_model(ns.cache_dir))
    return 0


def _train(ns: argparse.Namespace) -> int:
    import torch  # lazy: importing torch and transformers takes seconds

    from server.models import load_model
    from server.training import TrainConfig, model_label_for, train

    if ns.threads > 0:
        torch.set_num_threads(ns.threads)
    if ns.steps is not None and ns.epochs is not None:
        raise SystemExit("give --steps or --epochs, not both")
    lm = load_model(
        ns.model, device=ns.device, dtype="float32" if ns.device in ("auto", "cpu") else "auto", cache_dir=ns.cache_dir
    )
    cfg = TrainConfig(
        task=ns.task,
        data=ns.data,
        store=ns.store,
        eval_data=ns.eval_data,
        holdout=ns.holdout,
        num_virtual_tokens=ns.num_virtual_tokens,
        init=ns.init,
        init_text=ns.init_text,
        steps=ns.steps,
        epochs=ns.epochs,
        lr=ns.lr,
        batch_size=ns.batch_size,
        seed=ns.seed,
        max_eval=ns.max_eval,
    )
    result = train(cfg, lm, model_label=model_label_for(ns.model))
    print(f"wrote {result.folder} in {result.seconds:.0f} s: held-out exact match {result.before:.1%} -> {result.after:.1%}")
    return 0


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task name: the store folder it is written to")
    p.add_argument("--data", type=Path, required=True, help='JSON lines {"input": ..., "output": ...}')
    p.add_argument("--eval-data", type=Path, default=None, help="held-out JSON lines (default: split --holdout off --data)")
    p.add_argument(
        "--holdout", type=float, default=0.2, help="held-out fraction (or count if >= 1) of --data; default: %(default)s"
    )
    p.add_argument("--max-eval", type=int, default=None, help="evaluate on at most this many held-out examples")
    p.add_argument("--store", type=Path, default=Path("prompts_store"), help="default: %(default)s")
    p.add_argument("--model", default="default", help="the model the server uses; default: %(default)s")
    p.add_argument("--device", default="cpu", help="default: %(default)s")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="default: %(default)s")
    p.add_argument("--num-virtual-tokens", type=int, default=20, help="default: %(default)s")
    p.add_argument("--init", choices=["text", "sample_vocab", "random"], default="text", help="default: %(default)s")
    p.add_argument("--init-text", default=None, help="instruction text for --init text")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default 200 unless --epochs)")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--lr", type=float, default=0.03, help="AdamW learning rate; default: %(default)s")
    p.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default); default: %(default)s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softmux", description=__doc__)
    parser.add_argument("--version", action="version", version=f"softmux {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP server")
    add_arguments(serve)
    serve.set_defaults(func=_serve)

    serve_ray = sub.add_parser("serve-ray", help="run the same server as Ray Serve deployments: N engine replicas over one store")
    _add_serve_ray_arguments(serve_ray)

    prep = sub.add_parser("prepare-model", help="convert the bundled default model into the cache")
    prep.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="default: %(default)s")
    prep.set_defaults(func=_prepare_model)

    tr = sub.add_parser("train", help="prompt-tune a task on the served model and write it into the store")
    _add_train_arguments(tr)
    tr.set_defaults(func=_train)

    from server import bench  # light: httpx only

    be = sub.add_parser("bench", help="HTTP load generator: throughput, TTFT and latency against a server")
    bench.add_arguments(be)
    be.set_defaults(func=bench.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    level = str(getattr(ns, "log_level", "info")).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(ns.func(ns))


if __name__ == "__main__":
    sys.exit(main())
