"""The README's and the docs' examples run: every ```sh and ```python block against a live server on
the default model with the shipped tasks, so an example that stops working fails the tests.

A block that cannot run here (it builds images, trains for minutes, starts Ray, runs the tests) is
preceded by `<!-- docs-test: skip: <why> -->`; the list of those is checked to carry a reason. Shell
blocks run with `set -e -o pipefail` and `curl` failing on any HTTP error; Python blocks of one file
run in order in one namespace (a later block may use an earlier one's client).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.api.app import create_app
from server.config import Settings
from server.models import load_model
from tests.api_support import live_server

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!-- docs-test: skip: (.+?) -->\s*$")
ADMIN_TOKEN = "docs-test-token"


@dataclass
class Block:
    file: Path
    line: int
    lang: str
    code: str
    skip: str | None  # why it does not run here

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    out = []
    for path in DOCS:
        lines = path.read_text().split("\n")
        i = 0
        while i < len(lines):
            fence = re.match(r"^```(sh|python)\s*$", lines[i])
            if fence:
                end = lines.index("```", i + 1)
                before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
                reason = SKIP.match(before.strip())
                out.append(
                    Block(
                        path,
                        i + 1,
                        fence.group(1),
                        "\n".join(lines[i + 1 : end]),
                        reason.group(1) if reason else None,
                    )
                )
                i = end
            i += 1
    return out


ALL = blocks()
RUN = [b for b in ALL if b.skip is None]


def test_every_example_runs_or_says_why_not():
    skipped = [b for b in ALL if b.skip is not None]
    assert all(len(b.skip or "") > 10 for b in skipped)
    print(
        f"{len(RUN)} of {len(ALL)} examples run; not run: "
        + "; ".join(f"{b.where} ({b.skip})" for b in skipped)
    )
    assert len(RUN) >= 8


@pytest.fixture(scope="module")
def server(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`make serve`'s setup on a copy of the store (uploads in the examples must not touch the real
    one), with an admin token for the task-management examples; and a folder holding a task's adapter
    files, as the upload example expects in its working directory."""
    store = tmp_path_factory.mktemp("docs") / "store"
    shutil.copytree(ROOT / "prompts_store", store)
    work = tmp_path_factory.mktemp("work")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(store / "topic" / name, work / name)
    lm = load_model(str(default_model_dir), dtype="float32")
    settings = Settings(store=store, admin_token=ADMIN_TOKEN, reload_interval=0.0)
    with live_server(create_app(settings, loader=lambda: lm, wait=True)) as url:
        yield url, work


def localised(code: str, url: str) -> str:
    return code.replace("http://127.0.0.1:8000", url).replace("localhost:8000", url.removeprefix("http://"))


@pytest.mark.parametrize("block", [b for b in RUN if b.lang == "sh"], ids=lambda b: b.where)
def test_shell_example(block: Block, server: tuple[str, Path]):
    url, work = server
    script = 'set -e -o pipefail\ncurl() { command curl --fail-with-body -sS "$@"; }\n' + localised(
        block.code, url
    )
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "SOFTMUX_ADMIN_TOKEN": ADMIN_TOKEN,
        "HOME": str(work),
    }
    out = subprocess.run(
        ["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, f"{block.where}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"


def test_python_examples(server: tuple[str, Path]):
    url, work = server
    for path in DOCS:
        code = "\n\n".join(localised(b.code, url) for b in RUN if b.lang == "python" and b.file == path)
        if not code:
            continue
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, f"{path.relative_to(ROOT)}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"


def test_the_first_request_answers_what_the_readme_shows(server: tuple[str, Path]):
    """The README's first answer is the server's, not a hand-written one."""
    url, _ = server
    readme = (ROOT / "README.md").read_text()
    shown = json.loads(re.search(r"```json\n(.*?)\n```", readme, re.S).group(1))  # type: ignore[union-attr]
    first = next(b for b in RUN if b.file.name == "README.md" and "curl" in b.code)
    out = subprocess.run(
        ["bash", "-c", localised(first.code, url)], capture_output=True, text=True, timeout=120
    )
    assert json.loads(out.stdout) == shown
