"""Tasks as tenants, measured over HTTP against real servers (default model, shipped tasks, CPU).

Four measurements, each a median over `--rounds` rounds, the scheduling policies alternating:
- noisy neighbour: `topic` floods (requests held at `--flood` concurrency, a refused one retried after
  0.2 s) while `sentiment` sends one streamed request a second: the quiet task's time to first token
  and refusals, the flood's tokens/s and refusals, `--scheduling fifo` against `fair`;
- shares: `topic` and `extract-json` both flood for `--window` seconds: each task's share of the
  generated tokens (from /stats), equal weights and 3:1 (task.json), and an idle task's counter when it
  returns (lifted to the floods', not left behind);
- priorities: a full batch of long `topic` rows at priority 5 and one `sentiment` request at priority
  -1: its time to first token against the decode step time, and the preempted row's answer against
  the same request alone;
- mixed-batch throughput: benchmarks/compare.py's in-process workload (64 requests, 8 tasks, 32 rows)
  under both policies, alternating.

The clients run in a process of their own at `--client-nice` (19: they get a core only when the
server leaves one idle), standing in for clients on other machines: on a 2-core box a generator of 320
clients retrying every 0.2 s takes a whole core, and the engine's OpenMP team, which ends every region
at a barrier, then waits a scheduler time slice per region (docs/architecture.md, "Tasks as tenants").
`--client-nice 0` measures that same-box case.

    python -m benchmarks.tenants [--rounds 3] [--duration 30] [--window 60] [--flood 320] [--quick]
        [--client-nice 19] [--json benchmarks/results/tenants_cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import ROOT, cpu_model
from server.bench import percentiles, start_server

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
TEXTS = [
    "The battery died after a day and support never answered.",
    "Quarterly revenue rose 12% on strong cloud sales.",
    "The striker scored twice in the final minutes.",
    "Meet me on March 3rd 2024 at the station.",
]


# ---- servers ---------------------------------------------------------------------------------------
@contextmanager
def store_with(settings: dict[str, dict[str, Any]]) -> Iterator[Path]:
    """A copy of prompts_store/ with a task.json written into the named task folders, and none in the
    others: the shipped output contracts would end the floods' ignore_eos rows early (a complete answer
    ends its row), so the measurements stay the scheduling ones they were."""
    tmp = Path(tempfile.mkdtemp(prefix="softmux-tenants-"))
    store = tmp / "store"
    shutil.copytree(ROOT / "prompts_store", store)
    for shipped in store.glob("*/task.json"):
        shipped.unlink()
    for task, values in settings.items():
        (store / task / "task.json").write_text(json.dumps(values))
    try:
        yield store
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def server(store: Path, policy: str, threads: int) -> Iterator[str]:
    proc, url = start_server(
        ["--store", str(store), "--scheduling", policy, "--threads", str(threads), "--reload-interval", "0"]
    )
    try:
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def body(task: str, text: str, new_tokens: int, **parameters: Any) -> dict[str, Any]:
    return {
        "task": task,
        "inputs": CHAT.format(text),
        "parameters": {"max_new_tokens": new_tokens, **parameters},
    }


async def stream_once(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> dict[str, Any]:
    """One streamed request: status, time to first token, latency and the text."""
    start = time.perf_counter()
    first = None
    text = ""
    async with client.stream("POST", url + "/generate_stream", json=payload) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code}
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if first is None:
                    first = time.perf_counter() - start
                if event.get("generated_text") is not None:
                    text = event["generated_text"]
    return {"status": 200, "ttft": first, "latency": time.perf_counter() - start, "text": text}


async def stats(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    return (await client.get(url + "/stats")).json()


class Flood:
    """`concurrency` clients sending `task` back to back; a 429 is retried after 0.2 s. Each 32 clients
    share one connection pool (httpx's pool costs grow with its size: one pool of 320 took a core)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        task: str,
        concurrency: int,
        new_tokens: int,
        texts: list[str] = TEXTS,
        **parameters: Any,
    ) -> None:
        self.client, self.url, self.task, self.inputs = client, url, task, texts
        self.concurrency, self.new_tokens, self.parameters = concurrency, new_tokens, parameters
        self.tokens, self.done, self.refused, self.errors = 0, 0, 0, 0
        self.texts: list[str] = []
        self._workers: list[asyncio.Task[None]] = []
        self._pools: list[httpx.AsyncClient] = []

    async def _worker(self, k: int, client: httpx.AsyncClient) -> None:
        payload = body(self.task, self.inputs[k % len(self.inputs)], self.new_tokens, **self.parameters)
        while True:
            try:
                r = await client.post(self.url + "/generate", json=payload)
            except httpx.HTTPError:
                self.errors += 1
                await asyncio.sleep(0.2)
                continue
            if r.status_code == 429:
                self.refused += 1
                await asyncio.sleep(0.2)
            elif r.status_code == 200:
                out = r.json()
                self.tokens += out["details"]["generated_tokens"]
                self.done += 1
                self.texts.append(out["generated_text"])
            else:
                self.errors += 1
                await asyncio.sleep(0.2)

    def start(self) -> None:
        self._pools = [client(32) for _ in range(0, self.concurrency, 32)]
        self._workers = [
            asyncio.create_task(self._worker(k, self._pools[k // 32])) for k in range(self.concurrency)
        ]

    async def stop(self) -> None:
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for pool in self._pools:
            await pool.aclose()


def client(connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits)


# ---- noisy neighbour -------------------------------------------------------------------------------
async def noisy_neighbour(url: str, flood_concurrency: int, duration: float) -> dict[str, Any]:
    async with client(flood_concurrency + 16) as c:
        flood = Flood(c, url, "topic", flood_concurrency, 32)
        flood.start()
        await asyncio.sleep(5.0)  # the flood reaches its steady state
        tokens0, t0 = flood.tokens, time.perf_counter()
        refused0 = flood.refused
        quiet: list[asyncio.Task[dict[str, Any]]] = []
        for k in range(int(duration)):
            quiet.append(
                asyncio.create_task(stream_once(c, url, body("sentiment", TEXTS[k % len(TEXTS)], 16)))
            )
            await asyncio.sleep(1.0)
        answers = await asyncio.gather(*quiet)
        seconds = time.perf_counter() - t0
        flood_tokens, flood_refused = flood.tokens - tokens0, flood.refused - refused0
        await flood.stop()
    ok = [a for a in answers if a["status"] == 200]
    return {
        "quiet_sent": len(answers),
        "quiet_refused": sum(a["status"] == 429 for a in answers),
        "quiet_ttft": percentiles([a["ttft"] for a in ok]) if ok else {},
        "quiet_latency": percentiles([a["latency"] for a in ok]) if ok else {},
        "flood_tokens_per_s": flood_tokens / seconds,
        "flood_refused_per_s": flood_refused / seconds,
        "flood_errors": flood.errors,
    }


# ---- shares ----------------------------------------------------------------------------------------
async def shares(url: str, window: float) -> dict[str, Any]:
    async with client(160) as c:
        # Alike requests (one input, 32 tokens each, eos ignored): shares of tokens are shares of service.
        floods = [
            Flood(c, url, task, 64, 32, texts=[TEXTS[0]], ignore_eos=True)
            for task in ("topic", "extract-json")
        ]
        for f in floods:
            f.start()
        await asyncio.sleep(8.0)
        before = (await stats(c, url))["tasks"]
        await asyncio.sleep(window)
        after = (await stats(c, url))["tasks"]
        returning = asyncio.create_task(stream_once(c, url, body("iso-date", TEXTS[3], 8)))
        await asyncio.sleep(0.05)
        at_return = (await stats(c, url))["tasks"]
        await returning
        for f in floods:
            await f.stop()
    served = {t: after[t]["output_tokens"] - before[t]["output_tokens"] for t in ("topic", "extract-json")}
    total = sum(served.values())
    return {
        "share_topic": served["topic"] / total,
        "tokens_per_s": total / window,
        "counters_at_return": {
            t: at_return[t]["counter"] for t in ("topic", "extract-json", "iso-date") if t in at_return
        },
    }


# ---- priorities ------------------------------------------------------------------------------------
async def priorities(url: str) -> dict[str, Any]:
    async with client(64) as c:
        alone = await stream_once(
            c, url, body("topic", TEXTS[0], 96, ignore_eos=True)
        )  # the flood's answer, solo
        await stream_once(c, url, body("sentiment", TEXTS[1], 8, priority=-1))  # its prefix computed once
        urgent_alone = await stream_once(c, url, body("sentiment", TEXTS[1], 8, priority=-1))
        flood = Flood(c, url, "topic", 32, 96, texts=[TEXTS[0]], ignore_eos=True)
        flood.start()
        while (await stats(c, url))["running"] < 32:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        s0, t0 = await stats(c, url), time.perf_counter()
        await asyncio.sleep(2.0)
        s1, t1 = await stats(c, url), time.perf_counter()
        step = (t1 - t0) / max(1, s1["decode_passes"] - s0["decode_passes"])
        urgent = await stream_once(c, url, body("sentiment", TEXTS[1], 8, priority=-1))
        while flood.done < 40:
            await asyncio.sleep(0.1)
        await flood.stop()
        preempted = (await stats(c, url))["tasks"]["topic"]["preempted"]
    same = sum(t == alone["text"] for t in flood.texts)
    return {
        "urgent_ttft": urgent["ttft"],
        "urgent_ttft_alone": urgent_alone["ttft"],
        "decode_step": step,
        "bound": 2 * step + urgent_alone["ttft"],
        "flood_rows_preempted": preempted,
        "flood_answers_equal_solo": f"{same}/{len(flood.texts)}",
    }


# ---- mixed-batch throughput (in process) -----------------------------------------------------------
def mixed_throughput(rounds: int, threads: int) -> dict[str, list[float]]:
    """compare.py's workload (64 requests, 8 tasks, 32 rows, 32 new tokens) under both policies."""
    import torch

    from benchmarks.compare import make_jobs, make_prompts, run_engine
    from server.engine.fairness import Policy
    from server.models import load_model

    torch.set_num_threads(threads)
    lm = load_model("default", "cpu", "float32")
    prompts = make_prompts(lm, 8, 20, seed=0)
    jobs = make_jobs(64, 8, 16, 48, seed=1)
    run_engine(lm, prompts, jobs[:8], 4, 8)  # warm-up
    out: dict[str, list[float]] = {"fifo": [], "fair": []}
    for _ in range(rounds):
        for policy in (Policy.FIFO, Policy.FAIR):
            out[policy.value].append(run_engine(lm, prompts, jobs, 32, 32, policy=policy)["tokens_per_s"])
    return out


# ---- the clients' process ---------------------------------------------------------------------------
CLIENT_NICE = [19]


def _client(fn: Callable[..., Coroutine[Any, Any, dict[str, Any]]], *args: Any) -> dict[str, Any]:
    return asyncio.run(fn(*args))


def in_client_process(fn: Callable[..., Coroutine[Any, Any, dict[str, Any]]], *args: Any) -> dict[str, Any]:
    """Run a measurement's clients in a fresh process at the clients' niceness."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        1, mp_context=context, initializer=os.nice, initargs=(CLIENT_NICE[0],)
    ) as pool:
        return pool.submit(_client, fn, *args).result()


# ---- the run -----------------------------------------------------------------------------------------
def median_of(runs: list[dict[str, Any]], *path: str) -> float:
    values = []
    for run in runs:
        v: Any = run
        for key in path:
            v = v[key]
        values.append(float(v))
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="seconds of quiet requests (one a second) under the flood",
    )
    ap.add_argument("--window", type=float, default=60.0, help="seconds over which the shares are counted")
    ap.add_argument("--flood", type=int, default=320, help="the flood's concurrency")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one round, short windows (a smoke run)")
    ap.add_argument("--only", choices=("noisy", "shares", "priorities", "mixed"), action="append")
    ap.add_argument(
        "--client-nice",
        type=int,
        default=19,
        help="niceness of the clients' process (0: same priority as the server)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    CLIENT_NICE[0] = args.client_nice
    if args.quick:
        args.rounds, args.duration, args.window = 1, 8.0, 10.0
    only = set(args.only or ("noisy", "shares", "priorities", "mixed"))
    report: dict[str, Any] = {
        "cpu": cpu_model(),
        "date": time.strftime("%Y-%m-%d"),
        "args": vars(args) | {"json": str(args.json)},
    }
    print(
        f"CPU: {report['cpu']}, {args.threads} threads, {args.rounds} round(s), "
        f"clients at nice {args.client_nice}"
    )

    if "noisy" in only:
        runs: dict[str, list[dict[str, Any]]] = {"fifo": [], "fair": []}
        with store_with({}) as store:
            for r in range(args.rounds):
                for policy in ("fifo", "fair"):
                    with server(store, policy, args.threads) as url:
                        runs[policy].append(
                            in_client_process(noisy_neighbour, url, args.flood, args.duration)
                        )
                    print(f"  noisy neighbour, round {r + 1}, {policy}: {json.dumps(runs[policy][-1])}")
        report["noisy_neighbour"] = runs
        print(
            "noisy neighbour (medians):   quiet TTFT p50 / p99 s   quiet refused   flood tok/s   flood 429/s"
        )
        for policy in ("fifo", "fair"):
            rs = [x for x in runs[policy] if x["quiet_ttft"]]
            p50 = median_of(rs, "quiet_ttft", "p50") if rs else float("nan")
            p99 = median_of(rs, "quiet_ttft", "p99") if rs else float("nan")
            print(
                f"  {policy:5}  {p50:8.3f} / {p99:7.3f}   {median_of(runs[policy], 'quiet_refused'):5.0f} of "
                f"{median_of(runs[policy], 'quiet_sent'):.0f}   "
                f"{median_of(runs[policy], 'flood_tokens_per_s'):9.1f}   "
                f"{median_of(runs[policy], 'flood_refused_per_s'):9.1f}"
            )
        ratio = median_of(runs["fair"], "flood_tokens_per_s") / median_of(runs["fifo"], "flood_tokens_per_s")
        print(f"  flood throughput fair / fifo: {ratio:.3f}")
        report["flood_ratio"] = ratio

    if "shares" in only:
        report["shares"] = {}
        for label, settings in (("equal", {}), ("3:1", {"topic": {"weight": 3}})):
            with store_with(settings) as store:
                runs_s = []
                for r in range(args.rounds):
                    with server(store, "fair", args.threads) as url:
                        runs_s.append(in_client_process(shares, url, args.window))
                    print(f"  shares {label}, round {r + 1}: {json.dumps(runs_s[-1])}")
            report["shares"][label] = runs_s
            print(
                f"shares {label}: topic {100 * median_of(runs_s, 'share_topic'):.1f}% "
                "of generated tokens (median)"
            )

    if "priorities" in only:
        runs_p: dict[str, list[dict[str, Any]]] = {"fifo": [], "fair": []}
        settings = {"topic": {"priority": 5}, "sentiment": {"min_priority": -1}}
        with store_with(settings) as store:
            for r in range(args.rounds):
                for policy in ("fifo", "fair"):
                    with server(store, policy, args.threads) as url:
                        runs_p[policy].append(in_client_process(priorities, url))
                    print(f"  priorities, round {r + 1}, {policy}: {json.dumps(runs_p[policy][-1])}")
        report["priorities"] = runs_p
        for policy in ("fifo", "fair"):
            rs = runs_p[policy]
            print(
                f"priorities {policy}: urgent TTFT {median_of(rs, 'urgent_ttft'):.3f} s (bound 2 steps + "
                f"alone: {median_of(rs, 'bound'):.3f} s; step {median_of(rs, 'decode_step') * 1000:.0f} ms), "
                f"rows preempted {median_of(rs, 'flood_rows_preempted'):.0f}, answers equal solo: "
                f"{', '.join(x['flood_answers_equal_solo'] for x in rs)}"
            )

    if "mixed" in only:
        mixed = mixed_throughput(args.rounds, args.threads)
        report["mixed"] = mixed
        fifo, fair = statistics.median(mixed["fifo"]), statistics.median(mixed["fair"])
        paired = statistics.median(b / a for a, b in zip(mixed["fifo"], mixed["fair"]))
        print(
            f"mixed batch (compare.py workload): fifo {fifo:.1f} tok/s, fair {fair:.1f} tok/s, ratio of "
            f"medians {fair / fifo:.3f}, median of the rounds' ratios {paired:.3f}"
        )

    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
