"""`softmux serve-ray` flags (every `softmux serve` flag plus the Ray ones), without importing Ray."""

from __future__ import annotations

import argparse
import os
from typing import Any

from server.config import add_arguments

APP_NAME = "softmux"


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """`softmux serve-ray`: every `softmux serve` flag, plus the Ray ones."""
    add_arguments(parser)
    parser.add_argument(
        "--replicas",
        default=os.environ.get("SOFTMUX_REPLICAS", "2"),
        help="engine replicas, or 'auto' for autoscaling between --min-replicas and --max-replicas "
        "(env SOFTMUX_REPLICAS; default: %(default)s)",
    )
    parser.add_argument(
        "--min-replicas", type=int, default=1, help="with --replicas auto; default: %(default)s"
    )
    parser.add_argument(
        "--max-replicas", type=int, default=4, help="with --replicas auto; default: %(default)s"
    )
    parser.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=16.0,
        help="with --replicas auto: requests per replica autoscaling aims at; default: %(default)s",
    )
    parser.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=None,
        help="requests Ray sends one replica at once (default: 2 x --max-batch-size)",
    )
    parser.add_argument(
        "--max-tasks-per-replica",
        type=int,
        default=64,
        help=(
            "tasks kept resident on one replica by its multiplex cache (least recently used leave); "
            "default: %(default)s"
        ),
    )
    parser.add_argument(
        "--imbalanced-threshold",
        type=int,
        default=8,
        help="a task's requests leave its home replica once its queue is this many requests longer "
        "than the least loaded replica's; default: %(default)s",
    )
    parser.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS", ""),
        help="join this Ray cluster (env RAY_ADDRESS); empty: start a local Ray instance",
    )
    parser.add_argument(
        "--app-name", default=APP_NAME, help="Ray Serve application name; default: %(default)s"
    )


def args_to_argv(args: dict[str, Any]) -> list[str]:
    """`serve.yaml` args ({"max_batch_size": 32, "prefix_cache": false}) as command-line flags."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv
