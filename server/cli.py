"""`softmux` command line: serve | serve-ray | prepare-model | train | bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server import __version__
from server.config import add_arguments, default_cache_dir, from_namespace


def _serve(ns: argparse.Namespace) -> int:
    from server import preflight
    from server.api.app import run_server  # lazy: keeps other subcommands free of the web stack

    settings = from_namespace(ns)
    found = preflight.problems(settings)
    for problem in found:
        print(f"softmux serve: {problem}", file=sys.stderr)
    if found:
        return 2
    run_server(settings)
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


def _build_kernels(ns: argparse.Namespace) -> int:
    """Build (or find) the native CPU kernels for this machine;
    non-zero with the reason where they cannot be."""
    import time

    from server.engine import kernels  # lazy: importing torch takes seconds

    began = time.monotonic()
    built = kernels.load(ns.cache_dir)
    if built is None:
        print(
            "softmux build-kernels: the kernels cannot be built here (the reason is logged above); "
            "the server will run torch ops"
        )
        return 1
    print(
        f"softmux kernels ready ({time.monotonic() - began:.1f} s): "
        f"{ns.cache_dir / 'kernels' / kernels.build_key()}"
    )
    return 0


def _train(ns: argparse.Namespace) -> int:
    import torch  # lazy: importing torch and transformers takes seconds

    from server.models import load_model
    from server.training import TrainConfig, model_label_for, task_settings, train

    if ns.threads > 0:
        torch.set_num_threads(ns.threads)
    if ns.steps is not None and ns.epochs is not None:
        raise SystemExit("give --steps or --epochs, not both")
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
        output=ns.output,
        output_choices_from_data=ns.output_choices_from_data,
        defaults=ns.defaults or {},
    )
    try:  # a contract the data cannot give is refused before the model loads
        task_settings(cfg)
    except ValueError as e:
        raise SystemExit(f"softmux train: {e}") from None
    lm = load_model(
        ns.model,
        device=ns.device,
        dtype="float32" if ns.device in ("auto", "cpu") else "auto",
        cache_dir=ns.cache_dir,
    )
    result = train(cfg, lm, model_label=model_label_for(ns.model))
    print(
        f"wrote {result.folder} in {result.seconds:.0f} s: "
        f"held-out exact match {result.before:.1%} -> {result.after:.1%}"
    )
    return 0


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task name: the store folder it is written to")
    p.add_argument("--data", type=Path, required=True, help='JSON lines {"input": ..., "output": ...}')
    p.add_argument(
        "--eval-data",
        type=Path,
        default=None,
        help="held-out JSON lines (default: split --holdout off --data)",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.2,
        help="held-out fraction (or count if >= 1) of --data; default: %(default)s",
    )
    p.add_argument(
        "--max-eval", type=int, default=None, help="evaluate on at most this many held-out examples"
    )
    p.add_argument("--store", type=Path, default=Path("prompts_store"), help="default: %(default)s")
    p.add_argument("--model", default="default", help="the model the server uses; default: %(default)s")
    p.add_argument("--device", default="cpu", help="default: %(default)s")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="default: %(default)s")
    p.add_argument("--num-virtual-tokens", type=int, default=20, help="default: %(default)s")
    p.add_argument(
        "--init", choices=["text", "sample_vocab", "random"], default="text", help="default: %(default)s"
    )
    p.add_argument("--init-text", default=None, help="instruction text for --init text")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default 200 unless --epochs)")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--lr", type=float, default=0.03, help="AdamW learning rate; default: %(default)s")
    p.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument(
        "--threads", type=int, default=2, help="torch threads (0: torch's default); default: %(default)s"
    )
    contract = p.add_argument_group(
        "contract", "written as task.json beside the adapter; the server holds every request to it"
    )
    given = contract.add_mutually_exclusive_group()
    given.add_argument(
        "--output",
        type=parse_output,
        default=None,
        metavar="JSON",
        help=(
            "the answers' shape, a structured_outputs object "
            "(one of json, json_object, regex, choice, grammar), "
            'e.g. \'{"choice": ["positive", "negative"]}\''
        ),
    )
    given.add_argument(
        "--output-choices-from-data",
        action="store_true",
        help="the answers are a choice among the distinct outputs of --data (classification tasks)",
    )
    contract.add_argument(
        "--default",
        dest="defaults",
        action=DefaultsAction,
        default=None,
        metavar="KEY=VALUE",
        help=(
            "a sampling default for requests that leave it unset, repeatable: max_new_tokens, temperature, "
            "top_k, top_p, repetition_penalty, frequency_penalty, presence_penalty, stop "
            "(repeat it or give a JSON list)"
        ),
    )


def parse_output(text: str) -> dict[str, Any]:
    """--output: a structured_outputs object stating one constraint (refused here, before any training)."""
    from server.structured import GrammarError, OutputSpec  # light: no torch

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f'not valid JSON ({e}); e.g. \'{{"choice": ["yes", "no"]}}\''
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            "a JSON object with one of json, json_object, regex, choice, grammar"
        )
    try:
        spec = OutputSpec.from_fields(value)
    except GrammarError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if spec is None:
        raise argparse.ArgumentTypeError(
            "it states no constraint: give one of json, json_object, regex, choice, grammar"
        )
    return value


def parse_default(text: str) -> tuple[str, Any]:
    """One --default KEY=VALUE -> (TaskDefaults field, value of the field's type); stop gives a list."""
    from pydantic import ValidationError

    from server.prompts.settings import TaskDefaults

    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if key not in TaskDefaults.model_fields:
        raise argparse.ArgumentTypeError(
            f"unknown default {key!r}; allowed: {', '.join(TaskDefaults.model_fields)}"
        )
    value: Any = _stop_strings(raw) if key == "stop" else raw
    try:
        parsed = TaskDefaults.model_validate({key: value})
    except ValidationError as e:
        raise argparse.ArgumentTypeError(f"{key}: {e.errors()[0]['msg']} (got {raw!r})") from None
    result = getattr(parsed, key)
    return key, list(result) if isinstance(result, tuple) else result


def _stop_strings(raw: str) -> Any:
    """stop=TEXT is one string; a JSON string or list (stop='["\\n", "END"]') allows escapes and several."""
    if raw[:1] in ('"', "["):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            return [raw]
        return [value] if isinstance(value, str) else value
    return [raw]


class DefaultsAction(argparse.Action):
    """Collects repeated --default KEY=VALUE into one dict (stop strings add up; other keys: the last wins),
    checked whole, so a bad value is a usage error before any training."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        from pydantic import ValidationError

        from server.prompts.settings import TaskDefaults

        try:
            key, value = parse_default(str(values))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentError(self, str(e)) from None
        defaults = dict(getattr(namespace, self.dest, None) or {})
        defaults[key] = defaults.get(key, []) + value if key == "stop" else value
        try:
            TaskDefaults.model_validate(defaults)
        except ValidationError as e:
            raise argparse.ArgumentError(self, f"{key}: {e.errors()[0]['msg']}") from None
        setattr(namespace, self.dest, defaults)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softmux", description=__doc__)
    parser.add_argument("--version", action="version", version=f"softmux {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP server")
    add_arguments(serve)
    serve.set_defaults(func=_serve)

    serve_ray = sub.add_parser(
        "serve-ray", help="run the same server as Ray Serve deployments: N engine replicas over one store"
    )
    _add_serve_ray_arguments(serve_ray)

    prep = sub.add_parser("prepare-model", help="convert the bundled default model into the cache")
    prep.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="default: %(default)s")
    prep.set_defaults(func=_prepare_model)

    kb = sub.add_parser(
        "build-kernels",
        help="build the native CPU kernels for this machine now (else the first start builds them)",
    )
    kb.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="default: %(default)s")
    kb.set_defaults(func=_build_kernels)

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
