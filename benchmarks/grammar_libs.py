"""llguidance against xgrammar on this project's workload: the default model's tokenizer
(SmolLM2-135M-Instruct, vocabulary 49152, eos 2) and the constraints of benchmarks/schemas.py, to choose the
structured-output library.

For each library that imports: the tokenizer-info build time; per schema the cold compile time to a ready
matcher (no compile cache; one process-wide warm-up compile of another schema first), the schemas it refused
and why; the per-step cost of filling a token bitmask while walking each schema's valid example answer token
by token (then EOS), and whether every example token was allowed by the mask and accepted. A valid token that
a library forbids or rejects is a correctness finding, printed under the table. The regexes and choice lists
are compiled and walked too.

    python -m benchmarks.grammar_libs [--repeats 3] [--only llguidance|xgrammar] \\
        [--out benchmarks/results/grammar_libs.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from benchmarks.schemas import CHOICES, REGEX_EXAMPLES, REGEXES, SCHEMAS, check, choice_regex, example_text

MODEL_DIR = os.path.expanduser("~/.cache/softmux/SmolLM2-135M-Instruct")
VOCAB = 49152
EOS = 2
SEPARATORS = (", ", ": ")  # what the server's JSON mode emits: one line, a space after ',' and ':'
LLG_JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": SEPARATORS[0],
    "key_separator": SEPARATORS[1],
}
WARM_UP_SCHEMA = {"type": "object", "properties": {"warm": {"type": "integer"}}, "required": ["warm"]}


class Refused(Exception):
    """A library would not compile a constraint (its message says why)."""


class Library:
    """One structured-output library behind the few calls a server makes: build, compile, mask, accept."""

    name = ""

    def version(self) -> str:
        return metadata.version(self.name)

    def build_tokenizer(self, tok: Any) -> None:
        raise NotImplementedError

    def compile_json(self, schema: dict) -> Any:
        raise NotImplementedError

    def compile_regex(self, regex: str) -> Any:
        raise NotImplementedError

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        raise NotImplementedError

    def accept(self, matcher: Any, token: int) -> bool:
        raise NotImplementedError

    def terminated(self, matcher: Any) -> bool:
        raise NotImplementedError

    def error(self, matcher: Any) -> str:
        return ""

    def warnings(self, matcher: Any) -> list[str]:
        """What the library reports having approximated or ignored for this matcher's constraint (beyond
        stderr)."""
        return []

    def settings(self) -> dict[str, Any]:
        return {}


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.lltok: Any = None

    def build_tokenizer(self, tok: Any) -> None:
        self.lltok = self.llg.hf.from_tokenizer(tok, n_vocab=VOCAB)

    def _matcher(self, grammar: str) -> Any:
        matcher = self.llg.LLMatcher(self.lltok, grammar, log_level=0)
        if matcher.is_error():
            raise Refused(matcher.get_error())
        return matcher

    def compile_json(self, schema: dict) -> Any:
        try:
            grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=LLG_JSON_OPTIONS)
        except ValueError as e:
            raise Refused(str(e)) from e
        return self._matcher(grammar)

    def compile_regex(self, regex: str) -> Any:
        return self._matcher(self.llg.LLMatcher.grammar_from_regex(regex))

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        self.llg.torch.fill_next_token_bitmask(matcher, bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)

    def terminated(self, matcher: Any) -> bool:
        return matcher.is_stopped() and not matcher.is_error()

    def error(self, matcher: Any) -> str:
        return matcher.get_error()

    def warnings(self, matcher: Any) -> list[str]:
        return list(matcher.get_grammar_warnings())

    def settings(self) -> dict[str, Any]:
        return {"json_options": LLG_JSON_OPTIONS, "eos": self.lltok.eos_token}


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, threads: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.threads = threads
        self.info: Any = None
        self.compiler: Any = None

    def build_tokenizer(self, tok: Any) -> None:
        self.info = self.xgr.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB)
        # No cache: every compile is cold, as for a schema the server has not seen.
        self.compiler = self.xgr.GrammarCompiler(self.info, max_threads=self.threads, cache_enabled=False)

    def _matcher(self, compile_: Callable[[], Any]) -> Any:
        try:
            return self.xgr.GrammarMatcher(compile_())
        except (
            Exception
        ) as e:  # xgrammar raises RuntimeError, ValueError or its own errors for what it refuses
            raise Refused(f"{type(e).__name__}: {e}") from e

    def compile_json(self, schema: dict) -> Any:
        text = json.dumps(schema)
        return self._matcher(
            lambda: self.compiler.compile_json_schema(text, any_whitespace=False, separators=SEPARATORS)
        )

    def compile_regex(self, regex: str) -> Any:
        return self._matcher(lambda: self.compiler.compile_regex(regex))

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask, 0)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)

    def terminated(self, matcher: Any) -> bool:
        return matcher.is_terminated()

    def settings(self) -> dict[str, Any]:
        return {
            "any_whitespace": False,
            "separators": SEPARATORS,
            "max_threads": self.threads,
            "cache_enabled": False,
            "cache_bytes_after_run": self.compiler.get_cache_size_bytes(),
            "stop_token_ids": list(self.info.stop_token_ids),
        }


@dataclass
class Walk:
    """One example walked through a fresh matcher: the time of each mask fill,
    and the first problem if any."""

    mask_us: list[float] = field(default_factory=list)
    accept_us: list[float] = field(default_factory=list)
    problem: str = ""


@contextmanager
def stderr_to_file() -> Iterator[Callable[[], list[str]]]:
    """Send file descriptor 2 to a temporary file (xgrammar's C++ warnings go there) and yield a function that
    returns the lines written since its last call, log prefixes cut, so that they can be told apart per
    compile."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        read = 0

        def new_lines() -> list[str]:
            nonlocal read
            f.seek(read)
            text = f.read().decode(errors="replace")
            read += len(text.encode())
            return [re.sub(r"^\[[0-9:]+\] \S+: ", "", line) for line in text.splitlines() if line.strip()]

        try:
            yield new_lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def allowed(bitmask: torch.Tensor, token: int) -> bool:
    return bool((int(bitmask[0, token >> 5]) >> (token & 31)) & 1)


def walk(lib: Library, matcher: Any, tokens: list[int], tok: Any, bitmask: torch.Tensor) -> Walk:
    """Mask, check, accept each token of a valid answer then EOS:
    what decoding with that answer would cost."""
    out = Walk()
    for i, token in enumerate([*tokens, EOS]):
        started = time.perf_counter_ns()
        lib.fill(matcher, bitmask)
        out.mask_us.append((time.perf_counter_ns() - started) / 1e3)
        in_mask = allowed(bitmask, token)
        started = time.perf_counter_ns()
        ok = lib.accept(matcher, token)
        out.accept_us.append((time.perf_counter_ns() - started) / 1e3)
        if not (in_mask and ok):
            piece = "EOS" if token == EOS else repr(tok.decode([token]))
            before = tok.decode(tokens[:i])[-30:]
            out.problem = (
                f"token {i} ({token} {piece}) after ...{before!r}: the mask "
                f"{'allows' if in_mask else 'forbids'} it, accept {'takes' if ok else 'rejects'} it "
                f"{lib.error(matcher)}".rstrip()
            )
            return out
    if not lib.terminated(matcher):
        out.problem = "the matcher took EOS but did not terminate"
    return out


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
        "max": max(values, default=float("nan")),
    }


def measure(lib: Library, tok: Any, repeats: int) -> dict[str, Any]:
    """Every number of one library; `repeats` cold compiles and walks per constraint. Its stderr is kept aside
    and split per compile into warnings."""
    with stderr_to_file() as new_lines:
        return measure_quietly(lib, tok, repeats, new_lines)


def measure_quietly(
    lib: Library, tok: Any, repeats: int, new_lines: Callable[[], list[str]]
) -> dict[str, Any]:
    builds = []
    for _ in range(repeats):
        started = time.perf_counter()
        lib.build_tokenizer(tok)
        builds.append(time.perf_counter() - started)
    lib.compile_json(WARM_UP_SCHEMA)  # one-time process start-up out of the first schema's number
    new_lines()
    bitmask = torch.full((1, (VOCAB + 31) // 32), -1, dtype=torch.int32)

    compile_ms: list[float] = []
    mask_us: list[float] = []
    first_mask_us: list[float] = []
    accept_us: list[float] = []
    per_schema: dict[str, dict[str, Any]] = {}
    refused: dict[str, str] = {}
    rejected: dict[str, str] = {}
    warnings: dict[str, list[str]] = {}
    for name, schema in SCHEMAS:
        tokens = tok.encode(example_text(name), add_special_tokens=False)
        times = []
        for r in range(repeats):
            started = time.perf_counter()
            try:
                matcher = lib.compile_json(schema)
            except Refused as e:
                refused[name] = str(e)[:400]
                new_lines()
                break
            times.append((time.perf_counter() - started) * 1e3)
            said = sorted(set(lib.warnings(matcher) + new_lines()))
            if said and r == 0:
                warnings[name] = said
            walked = walk(lib, matcher, tokens, tok, bitmask)
            mask_us += walked.mask_us
            first_mask_us.append(walked.mask_us[0])
            accept_us += walked.accept_us
            if walked.problem and r == 0:
                rejected[name] = walked.problem
        compile_ms += times
        per_schema[name] = {"tokens": len(tokens), "compile_ms": times}
    for walked_name in rejected:
        per_schema[walked_name]["rejected"] = rejected[walked_name]

    others: dict[str, dict[str, Any]] = {}
    for name, regex, text in [
        *((f"regex:{n}", rx, REGEX_EXAMPLES[n]) for n, rx in REGEXES),
        *((f"choice:{n}", choice_regex(c), c[0]) for n, c in CHOICES),
    ]:
        started = time.perf_counter()
        try:
            matcher = lib.compile_regex(regex)
        except Refused as e:
            others[name] = {"refused": str(e)[:400], "warnings": new_lines()}
            continue
        ms = (time.perf_counter() - started) * 1e3
        said = sorted(set(lib.warnings(matcher) + new_lines()))
        walked = walk(lib, matcher, tok.encode(text, add_special_tokens=False), tok, bitmask)
        others[name] = {
            "compile_ms": ms,
            "mask_us_p50": percentile(walked.mask_us, 0.5),
            "problem": walked.problem,
            "warnings": said,
        }

    return {
        "library": lib.name,
        "version": lib.version(),
        "settings": lib.settings(),
        "tokenizer_build_s": builds,
        "compile_ms": summary(compile_ms),
        "refused": refused,
        "mask_us": summary(mask_us),
        "first_mask_us": summary(first_mask_us),
        "accept_us": summary(accept_us),
        "examples": {
            "walked": len(SCHEMAS) - len(refused),
            "accepted": len(SCHEMAS) - len(refused) - len(rejected),
        },
        "rejected": rejected,
        "warnings": warnings,
        "stderr_after": new_lines(),
        "others": others,
        "per_schema": per_schema,
    }


def cpu_model() -> str:
    """/proc/cpuinfo's model name, with family and model where a VM hides the full name (benchmarks.common's
    version imports the server package, which the second venv this script also runs in does not have)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = info.get("model name", platform.machine())
    if len(name.split()) <= 2:
        guest = ", guest" if "hypervisor" in info.get("flags", "").split() else ""
        name += f" (CPU family {info.get('cpu family', '?')}, model {info.get('model', '?')}{guest})"
    return name


def print_table(results: list[dict[str, Any]]) -> None:
    print(
        "| library | version | tokenizer build s | compile p50 / p99 / max ms | refused | mask step p50 / "
        "p99 us | first mask p50 / max us | examples accepted | regex+choice accepted |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for res in results:
        c, m, f = res["compile_ms"], res["mask_us"], res["first_mask_us"]
        others = res["others"].values()
        ok = sum(1 for o in others if "refused" not in o and not o["problem"])
        print(
            f"| {res['library']} | {res['version']} | "
            f"{sorted(res['tokenizer_build_s'])[len(res['tokenizer_build_s']) // 2]:.2f} | {c['p50']:.2f} / "
            f"{c['p99']:.2f} / {c['max']:.2f} | {len(res['refused'])}/{len(SCHEMAS)} | {m['p50']:.1f} / "
            f"{m['p99']:.1f} | {f['p50']:.1f} / {f['max']:.1f} | "
            f"{res['examples']['accepted']}/{res['examples']['walked']} | {ok}/{len(res['others'])} |"
        )
    for res in results:
        slowest = max(res["per_schema"].items(), key=lambda kv: max(kv[1]["compile_ms"], default=0.0))
        print(
            f"  {res['library']} slowest compile: {slowest[0]} (median "
            f"{percentile(slowest[1]['compile_ms'], 0.5):.2f} ms)"
        )
        by_message: dict[str, list[str]] = {}
        for name, said in res["warnings"].items():
            for message in said:
                by_message.setdefault(message, []).append(name)
        for message, names in by_message.items():
            print(f"  {res['library']} warns on {', '.join(names)}: {message}")
        for name, why in res["refused"].items():
            print(f"  {res['library']} refused {name}: {why}")
        for name, why in res["rejected"].items():
            print(f"  {res['library']} example {name}: {why}")
        for name, other in res["others"].items():
            if other.get("refused") or other.get("problem"):
                print(f"  {res['library']} {name}: {other.get('refused') or other['problem']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--repeats", type=int, default=3, help="cold compiles and walks per schema (and tokenizer builds)"
    )
    ap.add_argument("--only", choices=["llguidance", "xgrammar"], help="measure this library alone")
    ap.add_argument(
        "--xgrammar-threads", type=int, default=os.cpu_count() or 1, help="GrammarCompiler max_threads"
    )
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    problems = check()
    if problems:
        raise SystemExit("benchmarks/schemas.py is inconsistent:\n" + "\n".join(problems))
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert len(tok) == VOCAB and tok.eos_token_id == EOS, (len(tok), tok.eos_token_id)

    factories: dict[str, Callable[[], Library]] = {
        "llguidance": LLGuidance,
        "xgrammar": lambda: XGrammar(args.xgrammar_threads),
    }
    results, skipped = [], {}
    for name, factory in factories.items():
        if args.only and name != args.only:
            continue
        try:
            lib = factory()
        except ImportError as e:
            skipped[name] = f"not importable: {e}"
            print(f"skipping {name}: {skipped[name]}")
            continue
        results.append(measure(lib, tok, args.repeats))

    import transformers

    header = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizer": MODEL_DIR.replace(os.path.expanduser("~"), "~"),
        "vocab": VOCAB,
        "schemas": len(SCHEMAS),
        "repeats": args.repeats,
    }
    print(
        f"CPU: {header['cpu']}, {header['cores']} cores, Python {header['python']}, torch {header['torch']}; "
        f"{len(SCHEMAS)} schemas x {args.repeats} cold compiles, "
        "each followed by its example walked token by token + EOS"
    )
    print_table(results)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "header": header,
            "args": {k: str(v) for k, v in vars(args).items()},
            "skipped": skipped,
            "results": results,
        }
        args.out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
