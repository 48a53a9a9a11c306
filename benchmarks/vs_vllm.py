"""softmux against vLLM's CPU build on the same machine, in one run (issue 10's workload).

64 requests over 8 tasks, soft prompts of P=20 virtual tokens (sampled vocabulary rows, seeded: the
`make_prompts`/`make_jobs` of benchmarks/compare.py), inputs 8-24 tokens, exactly 32 new tokens
each (softmux: greedy with eos ignored in this bench; vLLM: `ignore_eos=True, temperature=0`),
2 threads. vLLM runs in its own venv (`make peer-venv`) as a subprocess (benchmarks/peer_vllm.py)
fed `cat(soft_prompt, embed(input_ids))` as `prompt_embeds`; softmux's engine runs in-process.

For each dtype (float32, bfloat16) and row limit (32, and 64 = no limit): softmux and vLLM runs
alternate, median of `--repeats`. At the smallest limit also: single-request latency (32 tokens),
the decode step at that many rows (softmux's engine, vLLM's engine, the bare transformers forward)
against the matrix-multiply floor measured in the same run (plain torch matmuls of the model's own
weights at that batch). Greedy answers are compared token by token (softmux vs vLLM).
When vLLM cannot run here the reason is printed and softmux is still reported against the bare model.

    flock /tmp/softmux-bench.lock .venv/bin/python benchmarks/vs_vllm.py [--repeats 3] \
        [--json benchmarks/results/vs_vllm_cpu.json] [--no-peer] [--dtypes float32 bfloat16] [--limits 32 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(
    0, str(Path(__file__).resolve().parent.parent)
)  # `python benchmarks/vs_vllm.py` from anywhere
from benchmarks.common import ROOT, cpu_model, linear_weights, median, print_ratio_table, write_results
from benchmarks.compare import Job, PassTimer, bare_decode_step, bench_request, make_jobs, make_prompts
from benchmarks.machine import CpuWatch, machine_line
from benchmarks.peer import Peer, PeerUnavailable
from server.config import Settings
from server.engine.engine import Engine
from server.engine.request import ErrorEvent, FinishEvent
from server.engine.scheduler import SchedulerConfig
from server.models import LoadedModel, load_model, resolve_model
from server.prompts.types import SoftPrompt


# ---- softmux: the one place the engine is built ----------------------------------------------------
def build_softmux_engine(lm: LoadedModel, max_rows: int, observer: PassTimer | None = None) -> Engine:
    """softmux's engine as the harness runs it; when the engine's constructor changes, adapt only this.

    Today: `Engine(lm, SchedulerConfig(max_batch_size, max_batch_tokens, max_queue), prefix cache bytes,
    observer=)`; the token budget and the queue are unbounded here, only rows are limited.
    """
    engine = Engine(lm, SchedulerConfig(max_rows, 1 << 30, 1 << 16), 1 << 30, observer=observer)
    engine.eos_ids = set()  # bench only: every request generates exactly new_tokens (vLLM: ignore_eos=True)
    return engine


def run_softmux(
    lm: LoadedModel,
    prompts: list[SoftPrompt],
    jobs: list[Job],
    new_tokens: int,
    max_rows: int,
    timer: PassTimer | None = None,
) -> dict:
    """All requests submitted at once (as vLLM's `generate(list)`); the engine keeps `max_rows` running."""
    engine = build_softmux_engine(lm, max_rows, timer)
    errors: list[str] = []
    remaining = [len(jobs)]
    done = threading.Event()

    def sink(event) -> None:  # non-streaming requests (as /generate): only the end is sent
        if isinstance(event, ErrorEvent):
            errors.append(event.message)
        if isinstance(event, (FinishEvent, ErrorEvent)):
            remaining[0] -= 1  # the engine thread is the only caller
            if remaining[0] == 0:
                done.set()

    requests = [bench_request(prompts[job.task], job.input_ids, new_tokens, sink) for job in jobs]
    # The loop runs on this thread, which loaded the model (server/engine/engine.py, the OpenMP note):
    # as vLLM's LLM.generate runs its engine on the caller's thread.
    start = time.perf_counter()
    for req in requests:
        engine.enqueue(req)
    engine.run_until_idle()
    seconds = time.perf_counter() - start
    assert done.is_set()
    if errors:
        raise RuntimeError(f"softmux: {len(errors)} requests failed: {errors[0]}")
    tokens = [list(r.output_ids) for r in requests]
    n = sum(len(t) for t in tokens)
    if n != len(jobs) * new_tokens:
        raise RuntimeError(f"softmux generated {n} tokens, expected {len(jobs) * new_tokens}")
    return {"seconds": seconds, "tokens_per_s": n / seconds, "generated": n, "tokens": tokens}


# ---- floors ----------------------------------------------------------------------------------------
@torch.inference_mode()
def matmul_floor(lm: LoadedModel, rows: int, repeats: int = 15) -> dict:
    """One decode step's matrix multiplies only: F.linear over the model's own Linear weights (lm_head
    included), in order, at `rows` rows; median seconds of the chain, its FLOPs and rate. Timed with
    2-D inputs [rows, in] and with the decode step's own 3-D layout [rows, 1, in] (interleaved); the
    floor is the faster of the two."""
    weights = linear_weights(lm)
    flops = sum(2 * rows * w.shape[0] * w.shape[1] for w in weights)
    layouts = {"2d": (rows,), "3d": (rows, 1)}
    xs = {
        k: {w.shape[1]: torch.randn(*lead, w.shape[1], dtype=lm.dtype) for w in weights}
        for k, lead in layouts.items()
    }
    times: dict[str, list[float]] = {k: [] for k in layouts}
    for i in range(repeats + 3):
        for k in layouts:
            t = time.perf_counter()
            for w in weights:
                F.linear(xs[k][w.shape[1]], w)
            if i >= 3:
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = min(med, key=med.get)
    s = med[best]
    return {
        "rows": rows,
        "seconds": s,
        "layout": best,
        "seconds_2d": med["2d"],
        "seconds_3d": med["3d"],
        "min_seconds": min(times[best]),
        "gflop": flops / 1e9,
        "gflop_per_s": flops / s / 1e9,
        "matmuls": len(weights),
    }


@torch.inference_mode()
def reference_greedy(lm: LoadedModel, row: torch.Tensor, n: int) -> list[int]:
    """DESIGN.md's reference (as tests/support.py): the bare model on cat(soft_prompt, embed(ids)) = `row`
    [P+L, H], alone, no cache, greedy, eos ignored."""
    embed = lm.model.get_input_embeddings()
    x = row.to(lm.dtype)[None]  # [1, T, H]
    out: list[int] = []
    for _ in range(n):
        token = int(lm.model(inputs_embeds=x).logits[0, -1].argmax())
        out.append(token)
        x = torch.cat([x, embed(torch.tensor([[token]]))], dim=1)
    return out


# ---- the run
@dataclass
class Setup:
    """What every measurement of the run shares."""

    args: argparse.Namespace
    folder: str  # the converted model folder both sides load
    lm32: LoadedModel
    prompts32: list[SoftPrompt]
    jobs: list[Job]
    rows: list[torch.Tensor]  # per request: cat(soft_prompt, embed(input_ids)), float32 [P+L, H]
    workload: Path  # `rows`, saved for the vLLM worker
    header: dict
    watch: CpuWatch

    @property
    def limits(self) -> list[int]:
        return sorted(self.args.limits)


@dataclass
class Results:
    rows: list[dict] = field(default_factory=list)  # the table: one per (dtype, mode)
    tokens: dict[str, dict[str, list[list[int]]]] = field(
        default_factory=dict
    )  # dtype -> "softmux_32"... -> answers
    steps: dict[str, dict] = field(default_factory=dict)  # dtype -> decode step seconds of each side
    singles: dict[str, dict] = field(default_factory=dict)  # dtype -> single-request seconds of each side
    floors: dict[str, dict] = field(default_factory=dict)  # dtype -> matmul_floor()
    peer_info: dict = field(default_factory=dict)  # dtype -> row limit -> the worker's ready line
    peer_note: str | None = None  # why vLLM was not (fully) measured


class VllmSide:
    """The vLLM worker of one (dtype, row limit), or none: a failure ends vLLM's part of the run (the reason
    kept in `Results.peer_note`), softmux's part goes on."""

    def __init__(self, setup: Setup, dtype: str, limit: int, res: Results) -> None:
        self.res, self.peer = res, None
        if res.peer_note is not None:
            return
        a = setup.args
        print(f"[{dtype}, {limit} rows] starting vLLM ...", flush=True)
        try:
            self.peer = Peer(
                a.peer_python,
                setup.folder,
                setup.workload,
                dtype,
                limit,
                a.new_tokens,
                a.threads,
                a.peer_log,
                a.peer_startup_timeout,
            )
        except PeerUnavailable as exc:
            res.peer_note = str(exc)
            print(f"vLLM cannot run here: {exc}", flush=True)
            return
        res.peer_info.setdefault(dtype, {})[limit] = self.peer.ready
        print(
            f"[{dtype}, {limit} rows] vLLM {self.peer.ready['vllm']} ready in "
            f"{self.peer.ready['startup_s']:.0f} s",
            flush=True,
        )

    def ask(self, cmd: dict) -> dict | None:
        if self.peer is None:
            return None
        try:
            return self.peer.ask(cmd)
        except PeerUnavailable as exc:
            self.res.peer_note = str(exc)
            print(f"vLLM failed mid-run: {exc}", flush=True)
            self.close()
            return None

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
            self.peer = None


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="default", help="'default' or a model folder (vLLM loads the same folder)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--virtual", type=int, default=20)
    ap.add_argument("--input-min", type=int, default=8)
    ap.add_argument("--input-max", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument(
        "--limits", type=int, nargs="+", default=[32, 64], help="row limits (64 = no limit for 64 requests)"
    )
    ap.add_argument("--single", type=int, default=0, help="index of the request timed alone")
    ap.add_argument("--peer-python", type=Path, default=ROOT / ".peer-venv" / "bin" / "python")
    ap.add_argument("--no-peer", action="store_true", help="softmux and the bare model only")
    ap.add_argument("--peer-startup-timeout", type=float, default=600)
    ap.add_argument("--peer-log", type=Path, default=Path(tempfile.gettempdir()) / "softmux-peer-vllm.log")
    ap.add_argument("--json", type=Path)
    return ap.parse_args()


def prepare(args: argparse.Namespace, watch: CpuWatch) -> Setup:
    """The float32 model, the tasks' prompts, the jobs,
    and their prompt embeddings saved for the vLLM worker."""
    load_before = os.getloadavg()
    settings = Settings()
    folder = resolve_model(args.model, settings.cache_dir)
    lm32 = load_model(args.model, device="cpu", dtype="float32", cache_dir=settings.cache_dir)
    prompts32 = make_prompts(lm32, args.tasks, args.virtual, seed=0)
    jobs = make_jobs(args.requests, args.tasks, args.input_min, args.input_max, seed=1)
    embed = lm32.model.get_input_embeddings()
    with torch.inference_mode():
        rows = [
            torch.cat([prompts32[j.task].embeddings, embed(torch.tensor(j.input_ids))]).clone() for j in jobs
        ]
    workload = Path(tempfile.mkdtemp(prefix="softmux-vs-vllm-")) / "workload.pt"
    torch.save({"embeds": rows}, workload)  # float32 [P+L, H] per request; the worker casts to its dtype
    header = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "torch": torch.__version__,
        "model": folder,
        "workload": f"{args.requests} requests over {args.tasks} tasks, P={args.virtual}, inputs "
        f"{args.input_min}-{args.input_max} tokens, exactly {args.new_tokens} new tokens, greedy",
        "repeats": args.repeats,
        "loadavg_before": load_before,
    }
    print(f"CPU: {header['cpu']}; {args.threads} threads; softmux torch {torch.__version__}")
    print(
        f"workload: {header['workload']}; medians of {args.repeats}, softmux and vLLM runs alternating",
        flush=True,
    )
    if args.peer_log.exists():
        args.peer_log.unlink()
    return Setup(args, folder, lm32, prompts32, jobs, rows, workload, header, watch)


def others(run: dict) -> str:
    return "" if run["others_cores"] is None else f" (others {run['others_cores']:.1f} cores)"


@dataclass
class Trial:
    """One (dtype, row limit): the model in that dtype, the prompts cast to it, vLLM's worker,
    the step timer."""

    dtype: str
    limit: int
    lm: LoadedModel
    prompts: list[SoftPrompt]
    vllm: VllmSide
    timer: PassTimer


def measure_throughput(setup: Setup, t: Trial, res: Results) -> None:
    """All jobs at a row limit: softmux and vLLM runs alternating, `--repeats` each; the table's row."""
    a, watch = setup.args, setup.watch
    dtype, limit, lm, prompts, vllm, timer = t.dtype, t.limit, t.lm, t.prompts, t.vllm, t.timer
    s_runs: list[dict] = []
    v_runs: list[dict] = []
    for r in range(a.repeats):
        s = watch.watched(lambda: run_softmux(lm, prompts, setup.jobs, a.new_tokens, limit, timer))
        assert s is not None
        s_runs.append(s)
        msg = f"[{dtype}, {limit} rows] run {r + 1}: softmux {s['tokens_per_s']:.1f} tok/s{others(s)}"
        v = watch.watched(lambda: vllm.ask({"cmd": "run"})) if vllm.peer is not None else None
        if v is not None:
            v_runs.append(v)
            msg += f", vLLM {v['tokens_per_s']:.1f} tok/s{others(v)}"
        print(msg, flush=True)
    res.tokens.setdefault(dtype, {})[f"softmux_{limit}"] = s_runs[0]["tokens"]
    if v_runs:
        res.tokens[dtype][f"vllm_{limit}"] = v_runs[0]["tokens"]
    res.rows.append(
        {
            "dtype": dtype,
            "mode": f"engine, {limit} rows",
            "unit": "tok/s",
            "softmux": median([x["tokens_per_s"] for x in s_runs]),
            "vllm": median([x["tokens_per_s"] for x in v_runs]) if v_runs else None,
            "softmux_runs": [x["tokens_per_s"] for x in s_runs],
            "vllm_runs": [x["tokens_per_s"] for x in v_runs],
            "softmux_runs_others_cores": [x["others_cores"] for x in s_runs],
            "vllm_runs_others_cores": [x["others_cores"] for x in v_runs],
        }
    )


def measure_latency_and_step(setup: Setup, t: Trial, res: Results) -> None:
    """One request alone (alternating, `--repeats` each) and the decode step at `limit` rows on both sides."""
    a = setup.args
    dtype, limit, lm, prompts, vllm, timer = t.dtype, t.limit, t.lm, t.prompts, t.vllm, t.timer
    st = timer.decode.get(limit, [])
    res.steps[dtype] = {"rows": limit, "softmux_s": median(st), "softmux_steps": len(st)}
    s_single: list[float] = []
    v_single: list[float] = []
    for _ in range(a.repeats):
        s_single.append(run_softmux(lm, prompts, [setup.jobs[a.single]], a.new_tokens, limit)["seconds"])
        v = vllm.ask({"cmd": "single", "index": a.single})
        if v is not None:
            v_single.append(v["seconds"])
    res.singles[dtype] = {"softmux_runs": s_single, "vllm_runs": v_single}
    res.rows.append(
        {
            "dtype": dtype,
            "mode": f"single request, {a.new_tokens} tokens",
            "unit": "s",
            "softmux": median(s_single),
            "vllm": median(v_single) if v_single else None,
            "softmux_runs": s_single,
            "vllm_runs": v_single,
        }
    )
    v = vllm.ask({"cmd": "steps", "rows": limit})
    if v is not None:
        vt = v["step_seconds"]
        res.steps[dtype].update(vllm_s=median(vt[1:]), vllm_first_step_s=vt[0], vllm_steps=len(vt))


def measure_dtype(setup: Setup, dtype: str, res: Results) -> None:
    """Every row limit (a vLLM worker each),
    then the bare forward's step and the matmul floor at the smallest."""
    a, limits = setup.args, setup.limits
    lm = (
        setup.lm32
        if dtype == "float32"
        else load_model(a.model, device="cpu", dtype=dtype, cache_dir=Settings().cache_dir)
    )
    prompts = [
        SoftPrompt(
            name=p.name,
            kind=p.kind,
            content_hash=p.content_hash,
            source=p.source,
            embeddings=p.embeddings.to(lm.dtype),
        )
        for p in setup.prompts32
    ]
    run_softmux(lm, prompts, setup.jobs[:16], 4, limits[0])  # warm-up (allocator, kernels)
    for limit in limits:
        trial = Trial(dtype, limit, lm, prompts, VllmSide(setup, dtype, limit, res), PassTimer())
        try:
            measure_throughput(setup, trial, res)
            if limit == limits[0]:
                measure_latency_and_step(setup, trial, res)
        finally:
            trial.vllm.close()
    context = a.virtual + (a.input_min + a.input_max) // 2 + a.new_tokens // 2
    res.steps[dtype]["bare_s"] = bare_decode_step(lm, limits[0], context)
    res.floors[dtype] = matmul_floor(lm, limits[0])


def same_tokens(a: list[list[int]], b: list[list[int]]) -> dict:
    identical = sum(x == y for x, y in zip(a, b))
    prefix = []
    for x, y in zip(a, b):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefix.append(k)
    return {"identical": identical, "of": len(a), "mean_common_prefix": statistics.mean(prefix)}


def compare_answers(setup: Setup, res: Results) -> tuple[dict, dict]:
    """Greedy answers token by token: softmux vs vLLM at the smallest limit (where they differ in float32,
    which one equals the reference: the bare model alone, no cache), and softmux at both limits."""
    lo, hi, n = f"_{setup.limits[0]}", f"_{setup.limits[-1]}", setup.args.new_tokens
    match = {
        dt: same_tokens(t["softmux" + lo], t["vllm" + lo]) for dt, t in res.tokens.items() if "vllm" + lo in t
    }
    for dt, m in match.items():
        t = res.tokens[dt]
        differ = [i for i, (x, y) in enumerate(zip(t["softmux" + lo], t["vllm" + lo])) if x != y]
        if dt == "float32" and differ:
            refs = {i: reference_greedy(setup.lm32, setup.rows[i], n) for i in differ}
            m.update(
                differing=differ,
                softmux_equals_reference=sum(t["softmux" + lo][i] == ref for i, ref in refs.items()),
                vllm_equals_reference=sum(t["vllm" + lo][i] == ref for i, ref in refs.items()),
            )
    self_match = {dt: same_tokens(t["softmux" + lo], t["softmux" + hi]) for dt, t in res.tokens.items()}
    return match, self_match


def print_steps(res: Results) -> None:
    """Each dtype's decode step (softmux, vLLM, the bare forward) against the matmul floor."""
    for dtype, st in res.steps.items():
        fl = res.floors[dtype]
        parts = [f"softmux {st['softmux_s'] * 1e3:.1f} ms"]
        if "vllm_s" in st:
            parts.append(f"vLLM {st['vllm_s'] * 1e3:.1f} ms")
        parts.append(f"bare transformers forward {st['bare_s'] * 1e3:.1f} ms")
        print(
            f"decode step at {st['rows']} rows, {dtype}: "
            + ", ".join(parts)
            + f"; matmul floor {fl['seconds'] * 1e3:.1f} ms ({fl['matmuls']} matmuls, {fl['gflop']:.2f} "
            f"GFLOP at {fl['gflop_per_s']:.0f} GFLOP/s; inputs [rows, in] {fl['seconds_2d'] * 1e3:.1f} ms, "
            f"[rows, 1, in] {fl['seconds_3d'] * 1e3:.1f} ms): softmux / floor = "
            f"{st['softmux_s'] / fl['seconds']:.2f}"
            + (f", vLLM / floor = {st['vllm_s'] / fl['seconds']:.2f}" if "vllm_s" in st else "")
            + (" (target <= 1.15)" if dtype == "float32" else "")
        )
        st["softmux_over_floor"] = st["softmux_s"] / fl["seconds"]
        if "vllm_s" in st:
            st["vllm_over_floor"] = st["vllm_s"] / fl["seconds"]
        if res.peer_note is not None:
            print(
                f"  softmux vs the bare model, {dtype}: decode-only bound of the bare forward at "
                f"{st['rows']} rows = {st['rows'] / st['bare_s']:.0f} tok/s; softmux engine step / bare step "
                f"= {st['softmux_s'] / st['bare_s']:.2f}"
            )


def report(setup: Setup, res: Results, match: dict, self_match: dict, machine: dict) -> None:
    a, limits, header = setup.args, setup.limits, setup.header
    targets = {  # the issue's: float32 >= 1.2x at a 32-row limit and >= 1.0x with all rows batched
        ("float32", f"engine, {limits[-1]} rows"): 1.0,
        ("float32", f"engine, {limits[0]} rows"): 1.2,
        ("bfloat16", f"engine, {limits[0]} rows"): 1.0,
        ("float32", f"single request, {a.new_tokens} tokens"): 1.0,
        ("bfloat16", f"single request, {a.new_tokens} tokens"): 1.0,
    }
    print()
    print(f"CPU: {header['cpu']} ({a.threads} threads); {header['workload']}; medians of {a.repeats}")
    if res.peer_info:
        first = next(iter(next(iter(res.peer_info.values())).values()))
        print(
            f"vLLM: vllm-cpu {first['vllm']} (torch {first['torch']}), LLM(enable_prompt_embeds=True, "
            f"max_num_seqs=row limit), prefix caching {'on' if first['prefix_caching'] else 'off'} "
            f"(reset before every run), max_num_batched_tokens {first['max_num_batched_tokens']}"
        )
    else:
        print(f"vLLM: not measured: {res.peer_note}")
    print()
    print_ratio_table(res.rows, targets)
    print()
    print_steps(res)
    print()
    for dt, m in match.items():
        print(
            f"greedy answers, softmux vs vLLM, {dt}, {limits[0]} rows: {m['identical']}/{m['of']} "
            f"token-identical (mean common prefix {m['mean_common_prefix']:.1f} of {a.new_tokens} tokens)"
        )
        if "differing" in m:
            print(
                f"  of the {len(m['differing'])} that differ, the reference (bare model alone, no cache, "
                f"{dt}) equals softmux's answer in {m['softmux_equals_reference']} and vLLM's in "
                f"{m['vllm_equals_reference']}"
            )
    for dt, m in self_match.items():
        print(
            f"softmux {limits[0]} rows vs {limits[-1]} rows, {dt}: {m['identical']}/{m['of']} token-identical"
        )
    print(machine_line(machine, header["loadavg_before"]))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    setup = prepare(args, CpuWatch().start())
    res = Results(peer_note="disabled (--no-peer)" if args.no_peer else None)
    for dtype in args.dtypes:
        measure_dtype(setup, dtype, res)
    match, self_match = compare_answers(setup, res)
    machine = setup.watch.stop()
    report(setup, res, match, self_match, machine)
    write_results(
        args.json,
        args,
        setup.header,
        results=res.rows,
        decode_step=res.steps,
        matmul_floor=res.floors,
        single=res.singles,
        token_match=match,
        softmux_self_match=self_match,
        tokens=res.tokens,
        peer=res.peer_info,
        peer_note=res.peer_note,
        machine=machine,
    )


if __name__ == "__main__":
    main()
