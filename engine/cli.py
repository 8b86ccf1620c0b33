"""``flotilla serve MODEL [flags]``: vLLM's flag names, so a vLLM deployment changes its image only.

Flags whose feature Flotilla does not have yet are refused with a clear message instead of being
silently ignored. SIGTERM drains: /health turns 503, new requests get 503, running requests finish
(bounded by --drain-timeout), then the process exits 0. If the model fails to load or the engine loop dies,
the process exits 1 at once (as vLLM does), so that Kubernetes restarts it rather than keeping a pod that
answers 503 forever.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flotilla.engine.config import EngineArgs
from flotilla.engine.model_loader import BUNDLED_MODEL_ID
from flotilla.engine.server.reasoning import PARSERS as REASONING_PARSERS
from flotilla.engine.server.tool_parsers import PARSERS as TOOL_PARSERS

logger = logging.getLogger("flotilla.engine.cli")


def _serve_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="start the OpenAI-compatible server",
                       description="Serve MODEL (a Hugging Face folder, a .gguf file, or the bundled "
                                   f"{BUNDLED_MODEL_ID} when omitted) over an OpenAI-compatible API.")
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--api-key", default=None, help="also read from FLOTILLA_API_KEY or VLLM_API_KEY")
    p.add_argument("--tokenizer", default=None)
    _source_flags(p, "--download-dir")
    p.add_argument("--chat-template", default=None, help="a Jinja template, inline or a file path")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a chat_template in requests (it is code the server runs; off by default)")
    p.add_argument("--chat-template-timeout", type=float, default=10.0,
                   help="seconds one chat-template render may take before the request gets a 400")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="let the model decide when to call tools (tool_choice auto); needs --tool-call-parser")
    p.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS), default=None,
                   help="the format the model writes tool calls in (its family's chat template shows which)")
    p.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS), default=None,
                   help="split the model's thinking into reasoning_content")
    p.add_argument("--max-n", type=int, default=128,
                   help="most completions (n) one request may ask for; OpenAI's limit is 128")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--quantization", "-q", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--swap-space", type=float, default=4.0, help="GiB of host memory for --preemption-mode swap")
    p.add_argument("--preemption-mode", choices=["recompute", "swap"], default="recompute")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over N ranks, one process each (N GPUs with NCCL; on CPU, gloo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="run the shapes the server will meet before /health turns 200 (--no-warmup: skip)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: every step runs eagerly (GPU)")
    p.add_argument("--compilation-config", "-O", dest="compilation_config", default=None,
                   help='JSON, e.g. \'{"cudagraph_mode": "FULL_AND_PIECEWISE"}\' (NONE, PIECEWISE, FULL_DECODE_ONLY, '
                        'the default, or FULL_AND_PIECEWISE) and "max_cudagraph_capture_size"')
    p.add_argument("--runner", choices=["auto", "generate", "pooling"], default="auto",
                   help="pooling: serve embeddings (/v1/embeddings); auto: pooling for a bare ...Model architecture")
    p.add_argument("--task", choices=["auto", "generate", "embed", "embedding"], default="auto",
                   help="vLLM's older spelling: embed means --runner pooling")
    p.add_argument("--pooler-config", "--override-pooler-config", dest="pooler_config", default=None,
                   help='JSON, e.g. \'{"pooling_type": "MEAN", "normalize": false}\' (LAST, MEAN or CLS)')
    p.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters on the base model")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help='adapters served from the start: NAME=PATH or JSON {"name": ..., "path": ..., '
                        '"base_model_name": ...}; PATH: a folder, a Hugging Face repo id or s3://')
    p.add_argument("--max-loras", type=int, default=1, help="adapters in one batch (one device slot each)")
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--max-cpu-loras", type=int, default=None, help="adapters kept in host memory (>= --max-loras)")
    p.add_argument("--disable-log-requests", action="store_true")
    p.add_argument("--max-queue-len", type=int, default=None,
                   help="answer 503 while this many requests wait to be scheduled")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="seconds SIGTERM waits for running requests before exiting")
    p.add_argument("--device", default="auto")
    p.add_argument("--uvicorn-log-level", default="warning")
    return p


def _source_flags(p: argparse.ArgumentParser, *download_dir_flags: str) -> None:
    """Where remote weights come from (vLLM's flag names); shared by serve and download."""
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hugging Face repo")
    p.add_argument(*download_dir_flags, dest="download_dir", default=None,
                   help="Hugging Face cache to download into and read from (default: HF_HOME's hub cache)")
    p.add_argument("--hf-token", default=None, help="token for private or gated repos (default: HF_TOKEN)")


def _download_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("download", help="download a model into a cache, as serve would",
                       description="Make MODEL (ORG/NAME[@REV], hf://..., s3://BUCKET/PREFIX) local in the cache "
                                   "--to names, the same way `flotilla serve` does, and print the folder.")
    p.add_argument("model")
    _source_flags(p, "--to", "--download-dir")
    p.add_argument("--report", default=None, metavar="FILE",
                   help="write one JSON line here: the folder, its bytes and seconds, or the error")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flotilla", description="Flotilla inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _download_parser(sub)
    return parser


def download(ns: argparse.Namespace) -> int:
    """Fetch as serve would; a GGUF file is also converted, so that a read-only shared cache holds everything
    an engine reads. ``--report FILE`` gets one JSON line: the folder, its bytes and the seconds taken, or the
    error (a loader Job points it at /dev/termination-log, where the operator reads it)."""
    from flotilla.engine.model_source import ModelSourceError, fetch, parse_model_uri, size_bytes

    started = time.monotonic()
    try:
        path = fetch(parse_model_uri(ns.model, ns.revision), ns.download_dir, ns.hf_token)
        fetched = size_bytes(path)
        if path.suffix == ".gguf":
            from flotilla.engine.model_loader import convert_gguf

            path = convert_gguf(path)
    except (ModelSourceError, OSError) as e:
        message = str(e) if isinstance(e, ModelSourceError) else f"model: {e}"
        _report(ns.report, {"error": message})
        print(f"flotilla download: {message}", file=sys.stderr)
        return 1
    _report(ns.report, {"path": str(path), "bytes": fetched, "seconds": round(time.monotonic() - started, 1)})
    print(path)
    return 0


def _report(file: str | None, fields: dict[str, Any]) -> None:
    if file:
        with open(file, "w") as f:
            f.write(json.dumps(fields) + "\n")


def engine_args_from_cli(ns: argparse.Namespace) -> EngineArgs:
    """Map flags to ``EngineArgs``; refuse the ones whose feature is not built."""
    if ns.kv_cache_dtype not in ("auto",):
        raise SystemExit(f"--kv-cache-dtype {ns.kv_cache_dtype} is not supported yet (only auto)")
    if ns.quantization not in (None, "gguf"):
        raise SystemExit(f"--quantization {ns.quantization} is not supported yet (GGUF files are dequantized)")
    model = ns.model or ns.model_flag
    return EngineArgs(
        model=model, tokenizer=ns.tokenizer, dtype=ns.dtype, max_model_len=ns.max_model_len,
        max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens, block_size=ns.block_size,
        gpu_memory_utilization=ns.gpu_memory_utilization, num_gpu_blocks_override=ns.num_gpu_blocks_override,
        swap_space=ns.swap_space, preemption_mode=ns.preemption_mode, enable_prefix_caching=ns.enable_prefix_caching,
        enable_chunked_prefill=ns.enable_chunked_prefill, load_format=ns.load_format, seed=ns.seed,
        device=ns.device, served_model_name=(ns.served_model_name or [None])[0], enforce_eager=ns.enforce_eager,
        compilation_config=ns.compilation_config,
        revision=ns.revision, download_dir=ns.download_dir, hf_token=ns.hf_token,
        tensor_parallel_size=ns.tensor_parallel_size, warmup=ns.warmup, runner=ns.runner, task=ns.task,
        pooler_config=ns.pooler_config, enable_lora=ns.enable_lora, max_loras=ns.max_loras,
        max_lora_rank=ns.max_lora_rank, max_cpu_loras=ns.max_cpu_loras,
    )


def parse_lora_modules(values: list[str] | None) -> list[dict[str, str | None]]:
    """``--lora-modules`` as vLLM takes it: ``NAME=PATH`` or a JSON object with ``name``, ``path`` and optionally
    ``base_model_name``; each as ``{"name", "path", "base_model_name"}``."""
    modules = []
    for value in values or ():
        if value.lstrip().startswith("{"):
            try:
                spec = json.loads(value)
            except json.JSONDecodeError as e:
                raise SystemExit(f"--lora-modules: {value!r} is not JSON ({e})") from None
            if not isinstance(spec, dict) or not spec.get("name") or not spec.get("path"):
                raise SystemExit(f"--lora-modules: {value!r} needs \"name\" and \"path\"")
            modules.append({"name": spec["name"], "path": spec["path"], "base_model_name": spec.get("base_model_name")})
            continue
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--lora-modules: {value!r} is not NAME=PATH")
        modules.append({"name": name, "path": path, "base_model_name": None})
    names = [m["name"] for m in modules]
    if len(set(names)) != len(names):
        raise SystemExit(f"--lora-modules: a name appears twice ({', '.join(names)})")
    return modules


def _chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    return path.read_text() if path.is_file() else value


def serve(ns: argparse.Namespace) -> int:
    import uvicorn

    from flotilla.engine.async_engine import AsyncLLMEngine
    from flotilla.engine.llm_engine import LLMEngine
    from flotilla.engine.lora.request import LoRARequest
    from flotilla.engine.server.api import ServerState, build_app

    args = engine_args_from_cli(ns)
    try:
        args.validate()
    except ValueError as e:
        raise SystemExit(str(e)) from e
    model_name = args.model or BUNDLED_MODEL_ID
    lora_modules = parse_lora_modules(ns.lora_modules)
    if lora_modules and not args.enable_lora:
        raise SystemExit("--lora-modules needs --enable-lora")
    if ns.max_n < 1 or ns.chat_template_timeout <= 0:
        raise SystemExit("--max-n must be >= 1 and --chat-template-timeout > 0")
    if ns.enable_auto_tool_choice and ns.tool_call_parser is None:
        raise SystemExit("--enable-auto-tool-choice needs --tool-call-parser (one of "
                         f"{', '.join(sorted(TOOL_PARSERS))}): the format the model writes its tool calls in")
    state = ServerState(
        served_model_names=ns.served_model_name or [model_name],
        model_path=model_name,
        api_key=ns.api_key or os.environ.get("FLOTILLA_API_KEY") or os.environ.get("VLLM_API_KEY") or None,
        chat_template=_chat_template(ns.chat_template),
        trust_request_chat_template=ns.trust_request_chat_template,
        chat_template_timeout=ns.chat_template_timeout,
        max_n=ns.max_n,
        log_requests=not ns.disable_log_requests,
        tool_call_parser=ns.tool_call_parser if ns.enable_auto_tool_choice else None,
        reasoning_parser=ns.reasoning_parser,
        allow_runtime_lora=os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", os.environ.get(
            "FLOTILLA_ALLOW_RUNTIME_LORA_UPDATING", "")).strip().lower() in ("1", "true", "yes"),
    )
    app = build_app(state)
    server = _DrainingServer(uvicorn.Config(app, host=ns.host, port=ns.port, log_level=ns.uvicorn_log_level,
                                            timeout_graceful_shutdown=ns.drain_timeout),
                             state, ns.drain_timeout)
    failure: list[str] = []

    def fail(why: str) -> None:
        failure.append(why)
        state.draining = True  # /health 503 until the process is gone
        server.exit_now()

    def load() -> None:
        try:
            engine = LLMEngine(args)
            for m in lora_modules:  # before the server reports ready: a bad adapter fails the start
                try:
                    engine.add_lora(LoRARequest(m["name"], engine.lora.new_id(), m["path"], m["base_model_name"]))
                except ValueError as e:
                    raise ValueError(f"--lora-modules {m['name']}: {e}") from None
            state.engine = AsyncLLMEngine(
                engine, max_queue_len=ns.max_queue_len,
                on_dead=lambda e: fail(f"the engine loop died: {type(e).__name__}: {e}"))
            logger.info("serving %s on http://%s:%d/v1", state.served_model_names[0], ns.host, ns.port)
        except Exception as e:
            logger.exception("model load failed")
            state.load_error = str(e)
            fail(f"model load failed: {e}")

    threading.Thread(target=load, name="flotilla-load", daemon=True).start()
    server.run()
    if state.engine is not None:
        state.engine.shutdown()
    if failure:
        print(f"flotilla serve: {failure[0]}; exiting so that the supervisor restarts the server", file=sys.stderr)
        return 1
    return 0


class _DrainingServer:
    """uvicorn's server with a drain phase in front of its graceful shutdown."""

    def __init__(self, config: Any, state: Any, drain_timeout: float) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(inner, sig: int, frame: Any) -> None:  # noqa: N805 - uvicorn's signature
                if state.draining or sig not in (signal.SIGTERM, signal.SIGINT):
                    return uvicorn.Server.handle_exit(inner, sig, frame)  # second signal: exit now
                state.draining = True
                logger.info("draining: /health is 503, finishing running requests")
                threading.Thread(target=self._drain, daemon=True).start()

        self.server = Server(config)
        self.state = state
        self.drain_timeout = drain_timeout

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while time.monotonic() < deadline:
            engine = self.state.engine
            if engine is None or engine.errored is not None or engine.num_unfinished() == 0:
                break  # a dead engine finishes nothing: waiting for it would only delay the exit
            time.sleep(0.05)
        self.server.should_exit = True

    def exit_now(self, grace: float = 5.0) -> None:
        """Stop serving without a drain (nothing more can finish). In-flight requests have been handed their
        error; they get ``grace`` seconds to write it before the remaining connections are dropped."""
        self.server.should_exit = True
        timer = threading.Timer(grace, lambda: setattr(self.server, "force_exit", True))
        timer.daemon = True
        timer.start()

    def run(self) -> None:
        self.server.run()


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    # `download` is a step in a loader Job or a script: its stderr is the one line of an error, nothing more.
    logging.basicConfig(level=logging.INFO if ns.command == "serve" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpx2"):  # one line per HTTP request the hub client makes
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if ns.command == "serve":
        from flotilla.engine.attention import block_unused_triton

        block_unused_triton()
        return serve(ns)
    if ns.command == "download":
        return download(ns)
    return 2


if __name__ == "__main__":
    sys.exit(main())
