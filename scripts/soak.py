"""Soak test: thousands of requests at high concurrency over every task; nothing lost, no 5xx,
memory flat.

By default it starts `softmux serve` itself (the same server `make serve` runs: the default model
and ./prompts_store) on a free port; `--url URL --pid PID` soaks a server that is already running.
Each request is a short generation (`--max-new-tokens`, default 8) of a random task, native
/generate or, one in five, /v1/completions; 429 and 503 are retried with backoff (Retry-After
honoured). Checks: every request ends in a well-formed 200 answer (none lost, none 5xx), and the
server's resident memory (VmRSS) at the end is within `--rss-tolerance` (10%) of where it stood
after warm-up, not counting the key/value pool's blocks committed in between (`/stats` kv_pool
`bytes_committed`: bounded by --kv-cache-bytes, it grows to the most blocks ever held at once, cached
input-token blocks included, and is reported beside). Prints the figures; exits 1 when a check fails.

    python scripts/soak.py                       # `make soak`: 5,000 requests, concurrency 64
    python scripts/soak.py --requests 500        # a quicker look
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.bench import start_server  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls count silver stars".split()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Tally:
    ok: int = 0
    retries: int = 0
    statuses: Counter = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


def well_formed(path: str, body: dict, max_new: int) -> bool:
    if path == "/generate":
        d = body.get("details") or {}
        return (
            isinstance(body.get("generated_text"), str)
            and d.get("finish_reason") in {"length", "eos_token", "stop_sequence"}
            and 1 <= d.get("generated_tokens", 0) <= max_new
        )
    choice = (body.get("choices") or [{}])[0]
    return (
        isinstance(choice.get("text"), str)
        and choice.get("finish_reason") in {"length", "stop"}
        and 1 <= body.get("usage", {}).get("completion_tokens", 0) <= max_new
    )


async def one(
    client: httpx.AsyncClient, i: int, tasks: list[str], max_new: int, tally: Tally, rng: random.Random
) -> None:
    task = tasks[i % len(tasks)]
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24)))
    if i % 5 == 4:
        path, payload = (
            "/v1/completions",
            {"model": task, "prompt": text, "max_tokens": max_new, "temperature": 0},
        )
    else:
        params = {"max_new_tokens": max_new}
        if i % 2:
            params |= {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "seed": i}
        path, payload = "/generate", {"task": task, "inputs": text, "parameters": params}
    started, delay = time.monotonic(), 0.05
    for _ in range(60):
        try:
            r = await client.post(path, json=payload)
        except httpx.HTTPError as e:
            tally.statuses[type(e).__name__] += 1
            tally.bad.append(f"request {i}: {type(e).__name__}: {e}")
            return
        tally.statuses[r.status_code] += 1
        if r.status_code in (429, 503):
            tally.retries += 1
            await asyncio.sleep(
                max(float(r.headers.get("retry-after", "0") or 0) * 0.1, delay) * (0.5 + rng.random())
            )
            delay = min(delay * 2, 2.0)
            continue
        try:
            body = r.json()
        except ValueError:
            body = {}
        if r.status_code == 200 and well_formed(path, body, max_new):
            tally.ok += 1
            tally.latencies.append(time.monotonic() - started)
        else:
            tally.bad.append(f"request {i}: {r.status_code} {r.text[:200]}")
        return
    tally.bad.append(f"request {i}: still refused after 60 tries")


async def pool_committed(client: httpx.AsyncClient) -> int:
    """Bytes of the key/value pool whose blocks have been used (the server's own count)."""
    return int((await client.get("/stats")).json()["kv_pool"]["bytes_committed"])


async def soak(
    url: str, pid: int, n: int, concurrency: int, warmup: int, max_new: int, timeout: float
) -> tuple[Tally, dict]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        tasks = [t["name"] for t in (await client.get("/tasks")).json()["tasks"]]
        if not tasks:
            raise SystemExit(f"{url} serves no tasks")
        rng = random.Random(0)
        tally = Tally()
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)
        figures: dict = {"tasks": len(tasks), "rss_start": rss_bytes(pid)}
        done = 0

        async def worker() -> None:
            nonlocal done
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await one(client, i, tasks, max_new, tally, rng)
                done += 1
                if done == warmup:
                    figures["rss_warm"] = rss_bytes(pid)
                    figures["pool_warm"] = await pool_committed(client)
                if done % 500 == 0:
                    print(f"  {done}/{n} done, rss {rss_bytes(pid) / 2**20:.0f} MiB", flush=True)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        figures["seconds"] = time.monotonic() - started
        await asyncio.sleep(1.0)  # let the server settle (finished rows freed, caches trimmed)
        figures["rss_end"] = rss_bytes(pid)
        figures["stats"] = (await client.get("/stats")).json()
        figures["pool_end"] = figures["stats"]["kv_pool"]["bytes_committed"]
    return tally, figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--warmup", type=int, default=500, help="requests after which memory counts as settled")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument(
        "--timeout", type=float, default=600.0, help="client seconds per request before it counts as lost"
    )
    p.add_argument("--rss-tolerance", type=float, default=0.10)
    p.add_argument("--url", help="soak a running server instead of starting one (needs --pid)")
    p.add_argument("--pid", type=int, help="the running server's process id, for its memory")
    p.add_argument("--verbose", action="store_true", help="show the started server's log")
    p.add_argument(
        "serve_args", nargs="*", help="extra `softmux serve` flags after --, e.g. -- --max-queue 32"
    )
    args = p.parse_args()
    proc = None
    if args.url:
        if args.pid is None:
            p.error("--url needs --pid (the server's process id, for its memory)")
        url, pid = args.url.rstrip("/"), args.pid
    else:
        print("starting: softmux serve", " ".join(args.serve_args), flush=True)
        proc, url = start_server(args.serve_args, cwd=ROOT, verbose=args.verbose)
        pid = proc.pid
    try:
        tally, f = asyncio.run(
            soak(
                url,
                pid,
                args.requests,
                args.concurrency,
                min(args.warmup, args.requests),
                args.max_new_tokens,
                args.timeout,
            )
        )
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(120)
            print(f"server exited with {code} after SIGTERM")
    lat = sorted(tally.latencies) or [0.0]
    mib = 2**20
    warm = f.get("rss_warm", f["rss_start"])
    pool_warm = f.get("pool_warm", f["pool_end"])
    pool_growth = f["pool_end"] - pool_warm
    pool_limit = f["stats"]["kv_pool"]["bytes_limit"]
    drift = (f["rss_end"] - pool_growth - warm) / warm  # memory the pool's bounded growth does not explain
    fivexx = sum(c for s, c in tally.statuses.items() if isinstance(s, int) and s >= 500 and s != 503)
    lost = args.requests - tally.ok - len(tally.bad)
    stats = f["stats"]
    passes = stats["prefill_passes"] + stats["decode_passes"]
    print(
        "\n"
        f"soak: {args.requests} requests, concurrency {args.concurrency}, {f['tasks']} tasks, "
        f"max_new_tokens {args.max_new_tokens}\n"
        f"  time            {f['seconds']:.1f} s ({args.requests / f['seconds']:.1f} req/s)\n"
        f"  answers         {tally.ok} well-formed 200, {len(tally.bad)} bad, {lost} lost\n"
        f"  statuses        {dict(tally.statuses)} ({tally.retries} retries on 429/503)\n"
        f"  5xx (not 503)   {fivexx}\n"
        f"  latency         p50 {lat[len(lat) // 2]:.2f} s, p99 {lat[int(len(lat) * 0.99) - 1]:.2f} s, "
        f"max {lat[-1]:.2f} s\n"
        f"  rss             start {f['rss_start'] / mib:.0f} MiB, after warm-up ({args.warmup}) "
        f"{warm / mib:.0f} MiB, end {f['rss_end'] / mib:.0f} MiB\n"
        f"  kv pool         committed {pool_warm / mib:.0f} MiB after warm-up, "
        f"{f['pool_end'] / mib:.0f} MiB at the end (limit {pool_limit / mib:.0f} MiB; "
        f"{f['stats']['kv_pool']['cached_token_blocks']} cached input-token blocks)\n"
        f"  rss drift       {drift:+.1%} after warm-up, the pool's growth ({pool_growth / mib:+.0f} MiB) "
        f"left out (tolerance {args.rss_tolerance:.0%})\n"
        f"  engine          {passes} passes, "
        f"{stats['rows_decoded'] / max(stats['decode_passes'], 1):.1f} rows/decode pass, "
        f"{stats['tasks_summed'] / max(passes, 1):.2f} tasks/pass, "
        f"{stats['mixed_task_passes']} mixed-task passes"
    )
    for line in tally.bad[:10]:
        print("  bad:", line)
    ok = tally.ok == args.requests and not tally.bad and fivexx == 0 and abs(drift) <= args.rss_tolerance
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
