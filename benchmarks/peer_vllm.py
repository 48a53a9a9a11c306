"""vLLM's CPU build as the peer of benchmarks/vs_vllm.py: a worker run in `.peer-venv` (`make peer-venv`).

It imports nothing from softmux (its venv has no softmux): the driver writes the workload as a torch
file (each request's `cat(soft_prompt, embed(input_ids))` in float32, [P+L, H]) and this worker feeds
the rows to `LLM(model=folder, enable_prompt_embeds=True, ...)` as `prompt_embeds`, cast to its dtype.

Protocol: one JSON object per line. The first line written is {"ready": ...} (or {"error": ...});
then for each command read on stdin one answer. Commands:
  {"cmd": "run"}                  all requests at once (vLLM's scheduler keeps max_num_seqs running)
                                  (+ "structured": {"json": schema}, "max_tokens", "exact": under a
                                  constraint)
  {"cmd": "single", "index": i}   one request alone, its latency
  {"cmd": "steps", "rows": n}     the first n requests stepped by hand, the time of every engine step
  {"cmd": "quit"}
Answers go to the file descriptor that was stdout when the worker started; everything else that
writes to stdout (vLLM's logs, its engine-core process) is sent to stderr.

    LD_PRELOAD=<libtcmalloc_minimal.so.4>:.peer-venv/lib/libiomp5.so VLLM_CPU_OMP_THREADS_BIND=0-1 \
    VLLM_CPU_KVCACHE_SPACE=2 .peer-venv/bin/python benchmarks/peer_vllm.py --model FOLDER \
        --workload W.pt --dtype float32 --max-num-seqs 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

_ANSWERS = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # vLLM logs to stdout: keep the answer channel clean
sys.stdout = sys.stderr


def answer(obj: dict) -> None:
    _ANSWERS.write(json.dumps(obj) + "\n")
    _ANSWERS.flush()


def run_params(cmd: dict, params):
    """The run's SamplingParams: the bench's (exactly --new-tokens, greedy), or with `structured`
    ({"json": schema} ...: vLLM's StructuredOutputsParams, compact JSON) and, with `"exact": false`,
    answers that end where the grammar does, up to `max_tokens`."""
    if "structured" not in cmd:
        return params
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured = StructuredOutputsParams(**cmd["structured"])
    n = cmd.get("max_tokens", params.max_tokens)
    if cmd.get("exact", True):
        return SamplingParams(
            max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0, structured_outputs=structured
        )
    return SamplingParams(max_tokens=n, temperature=0.0, structured_outputs=structured)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    started = time.perf_counter()
    try:
        import torch
        import vllm
        from vllm import LLM, SamplingParams

        dtype = getattr(torch, args.dtype)
        work = torch.load(args.workload)
        embeds = [e.to(dtype) for e in work["embeds"]]  # [P+L, H] each
        # Compact JSON under structured outputs, as softmux writes it (xgrammar: what "auto" picks for JSON
        # schemas; the setting needs a named backend): vLLM 0.32 reads this engine-wide
        # setting only (the request's own `disable_any_whitespace` is ignored), and with free whitespace
        # the 135M model fills answers with newlines until the token limit (63 of 64, measured).
        # The context window vLLM reserves a request's key/value room for: the model's own, capped (a
        # 131072-token window, as Llama 3's, does not fit its default CPU cache; this workload needs ~80).
        config_file = Path(args.model) / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        max_len = min(int(config.get("max_position_embeddings", 16384)), 16384)
        llm = LLM(
            model=args.model,
            max_model_len=max_len,
            enable_prompt_embeds=True,
            dtype=args.dtype,
            max_num_seqs=args.max_num_seqs,
            seed=0,
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
        )
        params = SamplingParams(
            max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True, temperature=0.0
        )
        # warm-up (kernels, allocator), as the softmux side gets
        llm.generate(
            [{"prompt_embeds": e} for e in embeds[: min(8, len(embeds))]],
            SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0),
            use_tqdm=False,
        )
    except Exception as exc:  # the driver reports this and goes on without the peer
        answer({"error": f"{type(exc).__name__}: {exc}"})
        raise
    cfg = llm.llm_engine.vllm_config
    answer(
        {
            "ready": True,
            "startup_s": time.perf_counter() - started,
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "prefix_caching": bool(cfg.cache_config.enable_prefix_caching),
            "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
        }
    )

    def reset() -> None:
        # a run must not reuse the previous run's keys and values (every run sends the same prompts)
        try:
            llm.reset_prefix_cache()
        except Exception:
            pass

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        reset()
        if cmd["cmd"] == "run":
            t = time.perf_counter()
            outs = llm.generate(
                [{"prompt_embeds": e} for e in embeds], run_params(cmd, params), use_tqdm=False
            )
            seconds = time.perf_counter() - t
            tokens = [list(o.outputs[0].token_ids) for o in outs]
            n = sum(len(x) for x in tokens)
            texts = [o.outputs[0].text for o in outs]
            reasons = [o.outputs[0].finish_reason for o in outs]
            answer(
                {
                    "seconds": seconds,
                    "tokens_per_s": n / seconds,
                    "generated": n,
                    "tokens": tokens,
                    "texts": texts,
                    "reasons": reasons,
                }
            )
        elif cmd["cmd"] == "single":
            t = time.perf_counter()
            outs = llm.generate([{"prompt_embeds": embeds[cmd["index"]]}], params, use_tqdm=False)
            seconds = time.perf_counter() - t
            answer({"seconds": seconds, "tokens": list(outs[0].outputs[0].token_ids)})
        elif cmd["cmd"] == "steps":
            engine = llm.llm_engine
            for i in range(cmd["rows"]):
                engine.add_request(f"steps-{time.monotonic_ns()}-{i}", {"prompt_embeds": embeds[i]}, params)
            times = []
            while engine.has_unfinished_requests():
                t = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t)
            answer({"step_seconds": times})
        else:
            answer({"error": f"unknown command {cmd['cmd']!r}"})


if __name__ == "__main__":
    main()
