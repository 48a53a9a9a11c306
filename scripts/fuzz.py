"""Fuzz every route of the HTTP API from its own OpenAPI schema with schemathesis.

Starts softmux on a tiny seeded llama (SmolLM2's tokenizer, from the default model's cache) with
three random prompt-tuning tasks in a temp store and an admin token, then runs
`schemathesis run <url>/openapi.json --checks not_a_server_error --request-timeout T` against it:
any 5xx answer, or a request that takes longer than T seconds, fails the run.

    python scripts/fuzz.py                      # `make fuzz`: ~1,400 cases over every route
    python scripts/fuzz.py --max-examples 5 --min-cases 1   # a quicker look
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.api.app import create_app  # noqa: E402
from server.config import Settings  # noqa: E402
from server.models import ensure_default_model, load_model  # noqa: E402
from tests.api_support import live_server, make_store  # noqa: E402
from tests.tiny_model import tiny_test_model  # noqa: E402

ADMIN_TOKEN = "fuzz-admin-token"


@dataclass
class FuzzResult:
    returncode: int
    cases: int  # test cases schemathesis generated and sent
    operations: int  # API operations it covered
    seconds: float
    output: str


def schemathesis_bin() -> str:
    found = Path(sys.executable).with_name("schemathesis")
    return str(found) if found.exists() else (shutil.which("schemathesis") or "schemathesis")


def run_fuzz(
    max_examples: int,
    *,
    request_timeout: float = 10.0,
    seed: int = 1,
    workers: int = 1,
    model_dir: Path | None = None,
    extra: list[str] | None = None,
) -> FuzzResult:
    with tempfile.TemporaryDirectory(prefix="softmux-fuzz-") as tmp:
        tmp_path = Path(tmp)
        if model_dir is None:
            model_dir = tiny_test_model(
                tmp_path / "tiny",
                tokenizer_from=ensure_default_model(Settings().cache_dir),
                initializer_range=0.3,
            )
        lm = load_model(str(model_dir), dtype="float32")
        make_store(tmp_path / "store", lm.hidden_size)
        settings = Settings(
            store=tmp_path / "store",
            max_input_tokens=64,
            max_new_tokens=16,
            max_batch_tokens=4096,
            admin_token=ADMIN_TOKEN,
            reload_interval=0,
            max_upload_bytes=1 << 20,
        )
        app = create_app(settings, loader=lambda: lm, wait=True)
        with live_server(app) as base:
            cmd = [
                schemathesis_bin(),
                "run",
                f"{base}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                str(max_examples),
                "--request-timeout",
                str(request_timeout),
                "--seed",
                str(seed),
                "--workers",
                str(workers),
                "--continue-on-failure",
                "--header",
                f"Authorization: Bearer {ADMIN_TOKEN}",
                "--no-color",
                *(extra or []),
            ]
            started = time.monotonic()
            env = {
                **os.environ,
                "SCHEMATHESIS_HOOKS": "fuzz_hooks",
                "NO_COLOR": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")]),
            }
            # cwd: schemathesis keeps a .schemathesis/ folder of examples there; not in the repo
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600, cwd=tmp)
            seconds = time.monotonic() - started
    output = proc.stdout + proc.stderr
    cases = _count(r"Test cases:\s*([\d,]+) generated", output)
    operations = _count(r"Tested:\s*([\d,]+)", output)
    return FuzzResult(proc.returncode, cases, operations, seconds, output)


def _count(pattern: str, text: str) -> int:
    m = re.search(pattern, text)
    return int(m.group(1).replace(",", "")) if m else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--max-examples", type=int, default=30, help="examples per operation and phase (default 30)"
    )
    p.add_argument("--min-cases", type=int, default=1000, help="fail unless at least this many cases ran")
    p.add_argument(
        "--request-timeout", type=float, default=10.0, help="seconds per request before it counts as a hang"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    ns = p.parse_args()
    result = run_fuzz(ns.max_examples, request_timeout=ns.request_timeout, seed=ns.seed, workers=ns.workers)
    print(result.output)
    ok = result.returncode == 0 and result.cases >= ns.min_cases
    print(
        f"fuzz: {result.cases} cases over {result.operations} operations in {result.seconds:.0f} s; "
        f"schemathesis exit {result.returncode}; {'PASS' if ok else 'FAIL'} (need >= {ns.min_cases} cases, "
        "no 5xx, no hang)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
