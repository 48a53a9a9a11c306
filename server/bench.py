"""`softmux bench`: an HTTP load generator against a running server (or one it starts).

N requests over K tasks at concurrency C (or a sweep of concurrencies), each through
`/generate_stream` so time to first token is measured as the client sees it. Reports requests/s,
generated tokens/s, time to first token and end-to-end latency percentiles, the engine's rows and
distinct tasks per forward pass (from `/stats`), and errors by status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx


@dataclass(frozen=True)
class BenchRequest:
    task: str
    inputs: str
    max_new_tokens: int


@dataclass
class Outcome:
    status: int  # HTTP status, or 0 for a transport error
    ttft: float | None = None
    latency: float = 0.0
    tokens: int = 0
    error: str | None = None


@dataclass
class Report:
    concurrency: int
    requests: int
    seconds: float
    requests_per_s: float
    tokens_per_s: float
    ttft: dict[str, float]
    latency: dict[str, float]
    rows_per_pass: float | None
    tasks_per_pass: float | None
    errors: dict[str, int] = field(default_factory=dict)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "p50": statistics.median(ordered),
        "p90": at(0.90),
        "p99": at(0.99),
        "mean": statistics.fmean(ordered),
    }


def synthetic_requests(
    tasks: list[str], n: int, input_words: int, max_new_tokens: int, seed: int
) -> list[BenchRequest]:
    rng = random.Random(seed)
    words = (
        "time person year way day thing man world life hand part child eye woman place work week case point"
    ).split()
    return [
        BenchRequest(
            task=tasks[i % len(tasks)],
            inputs=" ".join(rng.choice(words) for _ in range(input_words)),
            max_new_tokens=max_new_tokens,
        )
        for i in range(n)
    ]


def load_requests(path: Path, default_new: int) -> list[BenchRequest]:
    """JSON lines with `task`, `inputs` and optionally `max_new_tokens`."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out.append(BenchRequest(row["task"], row["inputs"], int(row.get("max_new_tokens", default_new))))
    return out


async def one_request(client: httpx.AsyncClient, req: BenchRequest) -> Outcome:
    body = {
        "task": req.task,
        "inputs": req.inputs,
        "parameters": {"max_new_tokens": req.max_new_tokens, "details": True},
    }
    start = time.perf_counter()
    out = Outcome(status=0)
    try:
        async with client.stream("POST", "/generate_stream", json=body) as resp:
            out.status = resp.status_code
            if resp.status_code != 200:
                out.error = (await resp.aread()).decode(errors="replace")[:200]
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        out.error = event["error"]
                        out.status = 424
                        break
                    if event.get("token") is not None:
                        out.tokens += 1
                        if out.ttft is None:
                            out.ttft = time.perf_counter() - start
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.latency = time.perf_counter() - start
    return out


async def run_load(url: str, requests: list[BenchRequest], concurrency: int, progress: bool) -> Report:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        before = (await client.get("/stats")).json()
        queue: asyncio.Queue[BenchRequest] = asyncio.Queue()
        for r in requests:
            queue.put_nowait(r)
        outcomes: list[Outcome] = []
        start = time.perf_counter()

        async def worker() -> None:
            while not queue.empty():
                outcomes.append(await one_request(client, queue.get_nowait()))
                if progress:
                    done = len(outcomes)
                    elapsed = time.perf_counter() - start
                    print(
                        f"\r  c={concurrency}: {done}/{len(requests)} done, {done / elapsed:.1f} req/s",
                        end="",
                        file=sys.stderr,
                        flush=True,
                    )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
        if progress:
            print(file=sys.stderr)
        after = (await client.get("/stats")).json()
    return summarise(concurrency, outcomes, seconds, before, after)


def summarise(
    concurrency: int, outcomes: list[Outcome], seconds: float, before: dict[str, Any], after: dict[str, Any]
) -> Report:
    ok = [o for o in outcomes if o.status == 200 and o.error is None]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o not in ok:
            errors[str(o.status)] = errors.get(str(o.status), 0) + 1

    def delta(key: str) -> int:
        return int(after.get(key, 0)) - int(before.get(key, 0))

    passes = delta("prefill_passes") + delta("decode_passes")
    return Report(
        concurrency=concurrency,
        requests=len(outcomes),
        seconds=seconds,
        requests_per_s=len(ok) / seconds,
        tokens_per_s=sum(o.tokens for o in ok) / seconds,
        ttft=percentiles([o.ttft for o in ok if o.ttft is not None]),
        latency=percentiles([o.latency for o in ok]),
        rows_per_pass=(delta("rows_prefilled") + delta("rows_decoded")) / passes if passes else None,
        tasks_per_pass=delta("tasks_summed") / passes if passes else None,
        errors=errors,
    )


def print_report(r: Report) -> None:
    def ms(d: dict[str, float], key: str) -> str:
        return f"{d[key] * 1e3:.0f}" if key in d else "-"

    rows = f"{r.rows_per_pass:.1f}" if r.rows_per_pass is not None else "-"
    tasks = f"{r.tasks_per_pass:.2f}" if r.tasks_per_pass is not None else "-"
    print(
        f"| {r.concurrency} | {r.requests} | {r.requests_per_s:.2f} | {r.tokens_per_s:.1f} | "
        f"{ms(r.ttft, 'p50')} / {ms(r.ttft, 'p90')} / {ms(r.ttft, 'p99')} | {ms(r.latency, 'p50')} / "
        f"{ms(r.latency, 'p90')} / {ms(r.latency, 'p99')} | {rows} | {tasks} | "
        f"{json.dumps(r.errors) if r.errors else '-'} |"
    )


def plot(reports: list[Report], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r.concurrency for r in reports]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(c, [r.tokens_per_s for r in reports], marker="o")
    a.set(xlabel="concurrency", ylabel="generated tokens/s", title="throughput", xscale="log")
    for key in ("p50", "p90"):
        b.plot(c, [r.latency.get(key, float("nan")) for r in reports], marker="o", label=f"latency {key}")
        b.plot(
            c,
            [r.ttft.get(key, float("nan")) for r in reports],
            marker="x",
            linestyle="--",
            label=f"TTFT {key}",
        )
    b.set(xlabel="concurrency", ylabel="seconds", title="latency", xscale="log")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    extra: list[str], *, cwd: Path | None = None, verbose: bool = False, ready_timeout: float = 300.0
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `softmux serve` (in its own process group) and wait until /ready answers 200: on the
    `--port`/`--host` that `extra` gives, else on a free loopback port. Returns the process and its base
    URL; the caller stops it (SIGTERM). Its log goes to this terminal when `verbose`, else to a temp file
    shown if it fails to start."""
    port, host = flag_value(extra, "--port"), flag_value(extra, "--host")
    if port is None:
        port = str(free_port())
        extra = ["--port", port, *extra]
    cmd = [sys.executable, "-m", "server.cli", "serve", *extra]
    log = None if verbose else tempfile.TemporaryFile()  # never a pipe: nobody drains it during a long run
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    reach = "127.0.0.1" if host in (None, "0.0.0.0", "::") else host  # a wildcard bind is reached on loopback
    url = f"http://[{reach}]:{port}" if ":" in reach else f"http://{reach}:{port}"

    def tail() -> str:
        if log is None:
            return ""
        log.seek(0)
        return log.read().decode(errors="replace")[-2000:]

    deadline = time.monotonic() + ready_timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}: {tail()}")
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    except (
        BaseException
    ):  # Ctrl-C while waiting: the server, in a session of its own, must not outlive the caller
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        raise
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit(f"server did not become ready in {ready_timeout:.0f} s: {tail()}")


def flag_value(args: list[str], flag: str) -> str | None:
    """The value a command line gives `flag` (`--port 1` or `--port=1`; the last wins), or None."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def check_plotting(path: Path | None) -> None:
    """--plot needs matplotlib: say so before any load is sent, not after the run."""
    if path is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            f"softmux bench: --plot {path} needs matplotlib, which is not installed here: "
            "pip install 'softmux[bench]' (or leave --plot out)"
        ) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server to load (default: %(default)s)")
    p.add_argument(
        "--start-server", action="store_true", help="start `softmux serve` on a free port for the run"
    )
    p.add_argument(
        "--server-args",
        default="",
        help=(
            "extra flags for the started server, e.g. '--max-batch-size 64' "
            "(a --port or --host there is where it listens)"
        ),
    )
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--tasks", type=int, default=0, help="spread over the first K tasks of /tasks (0: all)")
    p.add_argument(
        "--concurrency", type=int, nargs="+", default=[32], help="one level, or several for a sweep"
    )
    p.add_argument("--input-words", type=int, default=24, help="words per synthetic input")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument(
        "--requests-file", type=Path, help="JSON lines {task, inputs, max_new_tokens?} instead of synthetic"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the reports here")
    p.add_argument("--plot", type=Path, help="write a PNG of throughput and latency against concurrency")
    p.add_argument("--no-progress", action="store_true")


def main(ns: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the table
    check_plotting(ns.plot)
    proc = None
    url = ns.url
    if ns.start_server:
        proc, url = start_server(shlex.split(ns.server_args))
    try:
        if ns.requests_file:
            requests = load_requests(ns.requests_file, ns.max_new_tokens)
        else:
            names = [t["name"] for t in httpx.get(url + "/tasks", timeout=30).json()["tasks"]]
            if not names:
                raise SystemExit("the server has no tasks")
            names = names[: ns.tasks] if ns.tasks else names
            requests = synthetic_requests(names, ns.requests, ns.input_words, ns.max_new_tokens, ns.seed)
        print(f"{len(requests)} requests over {len({r.task for r in requests})} tasks against {url}")
        print(
            "| concurrency | requests | req/s | gen tok/s | TTFT ms p50/p90/p99 | latency ms p50/p90/p99 | "
            "rows/pass | tasks/pass | errors |"
        )
        print("|---:|---:|---:|---:|---|---|---:|---:|---|")
        reports = []
        for c in ns.concurrency:
            report = asyncio.run(run_load(url, requests, c, progress=not ns.no_progress))
            print_report(report)
            reports.append(report)
        if ns.json:
            ns.json.write_text(json.dumps([asdict(r) for r in reports], indent=2))
        if ns.plot:
            plot(reports, ns.plot)
            print(f"plot written to {ns.plot}")
        return 0 if all(not r.errors for r in reports) else 1
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
