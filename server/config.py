"""One frozen settings object. Every field is a `softmux serve` flag and a `SOFTMUX_<NAME>` env var."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    """Where converted models live; shared by `make serve`, the tests and the CLI."""
    env = os.environ.get("SOFTMUX_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "softmux" if xdg else Path.home() / ".cache" / "softmux"


DEFAULT_INPUT_TOKENS = 1024  # --max-input-tokens where the model's context window holds it
DEFAULT_NEW_TOKENS = 512  # --max-new-tokens likewise


@dataclass(frozen=True)
class Settings:
    model: str = field(
        default="default",
        metadata={"help": "'default' (SmolLM2-135M-Instruct), a local HF folder or a hub id"},
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(
        default="auto",
        metadata={"help": "auto (bfloat16 on GPU, float32 on CPU) | float32 | float16 | bfloat16 | float64"},
    )
    store: Path = field(
        default=Path("prompts_store"),
        metadata={"help": "folder of PEFT soft-prompt adapters, one task per folder"},
    )
    cache_dir: Path = field(
        default_factory=default_cache_dir, metadata={"help": "where the converted default model is cached"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=8000, metadata={"help": "port to bind"})
    max_batch_size: int = field(default=32, metadata={"help": "rows in the running batch"})
    max_batch_tokens: int = field(
        default=16384,
        metadata={"help": "tokens one prefill pass may feed (a longer single request still runs alone)"},
    )
    max_input_tokens: int = field(
        default=0,
        metadata={
            "help": (
                "input tokens per request (virtual tokens not counted); 0: from the model, "
                "1024 where its context window allows"
            )
        },
    )
    max_new_tokens: int = field(
        default=0,
        metadata={
            "help": (
                "largest max_new_tokens a request may ask for; 0: from the model, "
                "512 where its context window allows"
            )
        },
    )
    max_model_len: int = field(
        default=0,
        metadata={
            "help": (
                "longest sequence a request may reach (virtual + input + new tokens), vLLM's name; 0: "
                "the model's context window"
            )
        },
    )
    max_virtual_tokens: int = field(
        default=128, metadata={"help": "largest soft prompt (virtual tokens) the registry accepts"}
    )
    max_queue: int = field(
        default=256,
        metadata={"help": "waiting requests of all tasks together; beyond this new requests get 429"},
    )
    max_queue_per_task: int = field(
        default=0,
        metadata={
            "help": (
                "a cap on one task's waiting requests, unless its task.json sets max_queue (0: none; a full "
                "queue still admits a task below its weighted share of --max-queue)"
            )
        },
    )
    scheduling: str = field(
        default="fair",
        metadata={
            "help": (
                "fair: per-task queues, the least served task (weighted) admitted first, priorities, a task "
                "with no row takes one from the most served | fifo: one queue in arrival order"
            ),
            "choices": ("fair", "fifo"),
        },
    )
    prefix_cache: bool = field(
        default=True,
        metadata={
            "help": "compute each task's key/value prefix once and reuse it (--no-prefix-cache to compare)"
        },
    )
    prefix_cache_bytes: int = field(
        default=256 << 20, metadata={"help": "memory for cached per-task key/value prefixes, in bytes"}
    )
    kv_cache_bytes: int = field(
        default=0,
        metadata={
            "help": (
                "key/value pool size in bytes, soft-prompt prefixes included (0: measured once the weights "
                "are in place: a quarter of available memory, at most 4 GiB on CPU; half of free GPU memory)"
            )
        },
    )
    prepack_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "CPU: repack the weights at load: in 16-column panels for the native panel kernel (with "
                "--one-copy their only copy), else in oneDNN's blocked layout for decode-sized batches (one "
                "more copy); docs/benchmarks.md has the measurements"
            )
        },
    )
    one_copy: bool = field(
        default=True,
        metadata={
            "help": (
                "CPU with the native kernels: keep each weight once, in the panel layout the kernels read "
                "(prefill runs on it too), and release the transformers model's own copy; --no-one-copy "
                "keeps both (about 2x the weights' memory)"
            )
        },
    )
    quantize: str = field(
        default="none",
        metadata={
            "help": (
                "none | int8 (each decoder linear quantized at load, symmetric per output channel, into its "
                "only copy: about half a 16-bit model's weight memory and faster decode; the native CPU "
                "kernels read it, elsewhere torch's own int8 kernel; the head and embeddings stay in the "
                "model's dtype; answers differ slightly: docs/configuration.md#quantization)"
            ),
            "choices": ("none", "int8"),
        },
    )
    native_kernels: bool = field(
        default=True,
        metadata={
            "help": (
                "CPU: build (once, needs a C++ compiler) and use softmux's kernels: panel linears (with "
                "--prepack-weights), attention read in place from the key/value pool, fused RMSNorm, rotary "
                "and SiLU; without a compiler the same math runs as torch ops"
            )
        },
    )
    native_layers: bool = field(
        default=True,
        metadata={
            "help": (
                "CPU, with --native-kernels: run all decoder layers of a pass in one C++ call over those "
                "kernels (llama-like models with a SiLU MLP) instead of a Python loop calling them one by "
                "one; the same results bit for bit, in less time per step "
                "(docs/architecture.md has the measurements)"
            )
        },
    )
    cuda_graphs: bool = field(
        default=True,
        metadata={
            "help": (
                "CUDA: run decode steps at fixed shapes (rows padded to buckets 1, 2, 4, 8, 16, ...; key "
                "columns to powers of two), recorded as CUDA graphs at start and replayed with one launch; "
                "--no-cuda-graphs: each step at its batch's own shapes, launched op by op"
            )
        },
    )
    threads: int = field(default=0, metadata={"help": "torch intra-op threads (0: torch's default)"})
    log_level: str = field(
        default="info",
        metadata={"help": "debug | info | warning | error", "choices": ("debug", "info", "warning", "error")},
    )
    admin_token: str = field(
        default="",
        metadata={
            "help": (
                "bearer token for the admin routes (PUT/DELETE/GET /tasks/NAME); empty: "
                "admin routes answer 403"
            )
        },
    )
    api_key: str = field(
        default="",
        metadata={"help": "bearer token required on generation routes (/generate*, /v1/*); empty: open"},
    )
    max_upload_bytes: int = field(
        default=64 << 20, metadata={"help": "largest adapter upload (both files together), in bytes"}
    )
    reload_interval: float = field(
        default=1.0,
        metadata={
            "help": "seconds between looks at the store for added/replaced/removed tasks (0: no hot reload)"
        },
    )
    max_resident_prompts: int = field(
        default=256,
        metadata={
            "help": (
                "soft prompts kept in memory; "
                "least recently used are dropped and reloaded from disk on demand"
            )
        },
    )
    request_timeout: float = field(
        default=0.0,
        metadata={
            "help": (
                "seconds a request may take (queue + generation) before it ends with finish_reason 'timeout' "
                "and the text so far; also the ceiling for parameters.timeout (0: no default and no ceiling)"
            )
        },
    )
    shutdown_grace: float = field(
        default=30.0,
        metadata={
            "help": (
                "on SIGTERM: seconds to let accepted requests finish "
                "(new ones get 503) before the rest fail and the server exits"
            )
        },
    )
    max_body_bytes: int = field(
        default=1 << 20,
        metadata={
            "help": (
                "largest request body on all routes but adapter uploads (--max-upload-bytes), in bytes; "
                "larger bodies get 413"
            )
        },
    )
    limit_concurrency: int = field(
        default=0,
        metadata={
            "help": (
                "uvicorn: open connections + in-flight requests beyond which new ones get 503 (0: no limit)"
            )
        },
    )
    timeout_keep_alive: int = field(
        default=5, metadata={"help": "uvicorn: seconds an idle keep-alive connection stays open"}
    )
    log_format: str = field(
        default="text",
        metadata={
            "help": "text (human-readable lines) | json (one JSON object per line, with request_id)",
            "choices": ("text", "json"),
        },
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(
                    f"{f.name} must be one of {', '.join(choices)} (got {getattr(self, f.name)!r})"
                )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def with_model_limits(self, context: int | None) -> Settings:
        """The request limits for a model whose context window is `context` tokens (None: unknown).

        Limits left at 0 are derived: 1024 input and 512 new tokens where the window holds them beside the
        largest soft prompt, else the window's room split 2:1. Limits given that the window cannot hold
        raise ValueError saying which and why (the server then refuses to start)."""
        window = context
        if self.max_model_len:
            if context is not None and self.max_model_len > context:
                raise ValueError(
                    f"--max-model-len {self.max_model_len} exceeds the model's context window "
                    f"({context} tokens)"
                )
            window = self.max_model_len
        if window is None:
            return self.replace(
                max_input_tokens=self.max_input_tokens or DEFAULT_INPUT_TOKENS,
                max_new_tokens=self.max_new_tokens or DEFAULT_NEW_TOKENS,
            )
        room = window - self.max_virtual_tokens
        if room < 2:
            raise ValueError(
                f"--max-virtual-tokens {self.max_virtual_tokens} leaves no room in the model's context "
                f"window ({window} tokens)"
            )
        new = self.max_new_tokens or min(
            DEFAULT_NEW_TOKENS, max(1, (room if self.max_input_tokens else room // 3) - self.max_input_tokens)
        )
        given = self.max_input_tokens or min(DEFAULT_INPUT_TOKENS, room - new)
        if given < 1 or given + new > room:
            raise ValueError(
                f"--max-virtual-tokens ({self.max_virtual_tokens}) + --max-input-tokens ({given}) + "
                f"--max-new-tokens ({new}) = {self.max_virtual_tokens + given + new} exceeds the model's "
                f"context window ({window} tokens); lower them, or leave --max-input-tokens/--max-new-tokens "
                "out to derive them from the model"
            )
        return self.replace(max_input_tokens=given, max_new_tokens=new)


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {text!r} (use true/false)")


def _env_name(name: str) -> str:
    return "SOFTMUX_" + name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one `--flag` per Settings field; its default comes from `SOFTMUX_<NAME>` when set."""
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        env = os.environ.get(_env_name(f.name))
        default = getattr(defaults, f.name)
        kind = _parse_bool if isinstance(default, bool) else type(default)
        choices = f.metadata.get("choices")
        if env is not None:
            try:
                default = kind(env)
            except ValueError as e:
                parser.error(f"{_env_name(f.name)}={env!r}: {e}")
            if choices is not None and default not in choices:
                parser.error(f"{_env_name(f.name)}={env!r}: must be one of {', '.join(choices)}")
        help_text = f"{f.metadata.get('help', '')} (env {_env_name(f.name)}; default: %(default)s)"
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            parser.add_argument(
                flag, dest=f.name, type=kind, default=default, choices=choices, help=help_text
            )


def from_namespace(ns: argparse.Namespace) -> Settings:
    names = {f.name for f in dataclasses.fields(Settings)}
    return Settings(**{k: v for k, v in vars(ns).items() if k in names})
