"""softmux on Ray Serve: the app assembly (`build_app`; `app_builder`, the `import_path` of
`deploy/ray/serve.yaml`) and `softmux serve-ray`. An ingress deployment and N engine replicas over
one shared store:

```
HTTP -> Ray proxy -> SoftmuxIngress (`ingress`; FastAPI: /stats, /metrics fan out; everything else forwarded)
          -> handle.options(stream=True, multiplexed_model_id=<task>).handle_http(request)
          -> SoftmuxEngine replica (`replica`): the same FastAPI app as `softmux serve` (its own Service:
             model, registry over the shared store, engine loop that mixes tasks per pass)
```

- Task-affine routing: the task a request names is its `multiplexed_model_id`; the
  `TaskAffinityRouter` (`server.deploy.router`) sends it to the task's home replica while that one
  is not much busier than the least loaded, else (and for new tasks) to the least loaded; the
  `@serve.multiplexed` loader makes the prompt resident there. A replica holds many tasks and its
  engine still mixes them in one forward pass (no `@serve.batch`, which would split batches by
  model id). The first request of a task on a replica computes the task's key/value prefix;
  routing keeps later ones where that prefix is warm.
- Store changes (PUT/DELETE /tasks/{name} through the ingress) are published to every replica by
  the app's control actor (`server.deploy.control`); the answer waits until each live replica
  applied it (at most 2 s). Every replica's store watcher stays on as the backstop, and a replica
  started later (autoscaling, restart) loads the store as it is then.
- Faults: when the replica running a request dies before its answer started, the ingress retries
  it once on another replica, then answers 503 (retryable, `Retry-After: 1`); a stream already
  under way ends with an error event. Ray restarts the replica.
"""

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from server.config import Settings, from_namespace
from server.deploy.ingress import SoftmuxIngress
from server.deploy.options import APP_NAME, add_ray_arguments, args_to_argv
from server.deploy.replica import SoftmuxEngine, replica_threads

log = logging.getLogger("softmux.deploy")


# ---- building the app -----------------------------------------------------------------------------
def build_app(
    settings: Settings,
    replicas: int | str = 2,
    *,
    max_ongoing_requests: int | None = None,
    max_tasks_per_replica: int = 64,
    imbalanced_threshold: int = 8,
    autoscaling: dict[str, Any] | None = None,
    app_name: str = APP_NAME,
) -> serve.Application:
    """The Ray Serve application: SoftmuxIngress over `replicas` SoftmuxEngine replicas
    (`"auto"` or an `autoscaling` config: Ray Serve autoscaling instead of a fixed count)."""
    threads = replica_threads(settings)
    engine_options: dict[str, Any] = {
        "max_ongoing_requests": max_ongoing_requests or 2 * settings.max_batch_size,
        "request_router_config": RequestRouterConfig(
            request_router_class="server.deploy.router.TaskAffinityRouter",  # type: ignore[arg-type]
            request_router_kwargs={"imbalanced_threshold": imbalanced_threshold},
        ),
        "ray_actor_options": {"num_cpus": threads},
        "graceful_shutdown_timeout_s": settings.shutdown_grace,
        "health_check_period_s": 5.0,
    }
    if autoscaling is not None:
        engine_options["autoscaling_config"] = autoscaling
    elif replicas != "auto":
        engine_options["num_replicas"] = int(replicas)
    engine = SoftmuxEngine.options(  # type: ignore[attr-defined]
        **engine_options
    ).bind(settings.replace(threads=threads), max_tasks_per_replica, app_name)
    return SoftmuxIngress.options(  # type: ignore[attr-defined]
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000
    ).bind(engine, settings, app_name)


def absolute(settings: Settings) -> Settings:
    """Paths as replicas (other processes, other working folders) must see them."""
    model = settings.model
    if model != "default" and Path(model).exists():
        model = str(Path(model).resolve())
    return settings.replace(
        store=Path(settings.store).resolve(), cache_dir=Path(settings.cache_dir).resolve(), model=model
    )


def app_from_namespace(ns: argparse.Namespace) -> serve.Application:
    settings = absolute(from_namespace(ns))
    autoscaling = None
    if ns.replicas == "auto":
        autoscaling = {
            "min_replicas": ns.min_replicas,
            "max_replicas": ns.max_replicas,
            "target_ongoing_requests": ns.target_ongoing_requests,
        }
    return build_app(
        settings,
        ns.replicas,
        max_ongoing_requests=ns.max_ongoing_requests,
        max_tasks_per_replica=ns.max_tasks_per_replica,
        imbalanced_threshold=ns.imbalanced_threshold,
        autoscaling=autoscaling,
        app_name=ns.app_name,
    )


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for `serve run` / `serve deploy` (`import_path: server.deploy.ray_app:app_builder`):
    `args` are `softmux serve-ray` flags with underscores."""
    parser = argparse.ArgumentParser(prog="softmux serve-ray (serve.yaml args)")
    add_ray_arguments(parser)
    return app_from_namespace(parser.parse_args(args_to_argv(args)))


# ---- softmux serve-ray ----------------------------------------------------------------------------
def serve_ray(ns: argparse.Namespace) -> int:
    """Start (or join) Ray, deploy the app on --host:--port, wait for SIGTERM/SIGINT, drain, exit 0."""
    from server.api.logs import configure_logging

    settings = absolute(from_namespace(ns))
    configure_logging(settings.log_level, settings.log_format)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started_ray = False
    if ns.ray_address:
        ray.init(address=ns.ray_address, namespace="serve")
    else:
        replicas = ns.max_replicas if ns.replicas == "auto" else int(ns.replicas)
        cpus = max(os.cpu_count() or 1, replicas * replica_threads(settings))
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            namespace="serve",
            _node_ip_address="127.0.0.1",
            configure_logging=False,
        )
        started_ray = True
    stop = threading.Event()
    signals: list[int] = []

    def on_signal(sig: int, _frame: Any) -> None:
        signals.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    code = 0
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        handle = serve.run(app_from_namespace(ns), name=ns.app_name, route_prefix="/")
        log.info("serving on http://%s:%d (Ray Serve app %r)", settings.host, settings.port, ns.app_name)
        print(f"softmux serve-ray: ready on http://{settings.host}:{settings.port}", flush=True)
        while not stop.wait(0.5):
            pass
        log.info("signal %s: draining (grace %.1fs)", signals[0] if signals else "?", settings.shutdown_grace)
        finished = handle.drain.remote(settings.shutdown_grace).result(timeout_s=settings.shutdown_grace + 30)
        log.info("drained: %s", "every accepted request finished" if finished else "grace ran out")
    except Exception:
        log.exception("serve-ray failed")
        code = 1
    finally:
        try:
            serve.delete(ns.app_name)
            ray.kill(ray.get_actor(f"softmux-control-{ns.app_name}", namespace="serve"))
        except Exception:
            pass
        if started_ray:
            serve.shutdown()
            ray.shutdown()
    return code
