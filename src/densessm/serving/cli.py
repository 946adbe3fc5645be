"""``densessm serve MODEL_DIR``: load a model strictly, start the engine, serve it over HTTP with uvicorn.

Only the parser is built at import; the web stack is imported when the command runs, so the ``serve`` extra is
needed only to serve.
"""

from __future__ import annotations

import argparse
import copy
import errno
import ipaddress
import logging
import os
import re
import signal
import socket
import sys
import threading
from pathlib import Path

from densessm.argtypes import finite_float, positive_int
from densessm.errors import UsageError
from densessm.generation import check_quantize
from densessm.inference import QUANTIZE_CHOICES, prepare_for_decoding
from densessm.loading import check_weights, load_causal_lm, load_tokenizer_dir, read_config
from densessm.runtime import DTYPES, resolve_device

log = logging.getLogger("densessm.serve")

API_KEY_ENV = "DENSESSM_API_KEY"
UNBOUNDED_CONTEXT = 8192  # --max-model-len for a model without positions (DenseMamba): a bound on work, not memory
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """``"1GiB"``, ``"512MiB"``, ``"800MB"``, ``"0"`` -> a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 2GiB, 0)")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def add_serve_parser(sub) -> None:
    """Register ``densessm serve``."""
    parser = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (continuous batching, prompt-state cache)",
        description="Serve a saved DenseRetNet / DenseMamba over the OpenAI API: /v1/completions, "
        "/v1/chat/completions, /v1/models, /health, /metrics. Needs the `serve` extra.",
    )
    parser.add_argument("model_dir", help="directory written by save_pretrained (with tokenizer files)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: MODEL_DIR)")
    parser.add_argument("--served-model-name", help="the model's name in the API (default: MODEL_DIR's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}; prefer the variable: "
        "a flag shows in the process list)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--no-prepack", action="store_true", help="on CPU, keep PyTorch's linear layers (default: oneDNN-prepacked)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="compile the decode step (CUDA graphs on a GPU; compiles per batch size)"
    )
    parser.add_argument(
        "--quantize", choices=QUANTIZE_CHOICES, help="int8 weights (CPU, float32 activations): faster decoding"
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-batch", type=positive_int, default=16, help="completions decoded together (default 16)")
    limits.add_argument(
        "--max-queue", type=positive_int, default=64, help="requests waiting for the batch before 429 (default 64)"
    )
    limits.add_argument(
        "--max-model-len",
        type=positive_int,
        help=f"prompt + completion tokens (default: max_position_embeddings, or {UNBOUNDED_CONTEXT} without)",
    )
    limits.add_argument("--max-prompt-tokens", type=positive_int, help="prompt tokens (default: max-model-len - 1)")
    limits.add_argument(
        "--max-tokens", type=positive_int, default=1024, help="max_tokens a request may ask (default 1024)"
    )
    limits.add_argument(
        "--max-n", type=positive_int, help="completions per prompt, n (default: 8, or --max-batch if smaller)"
    )
    limits.add_argument(
        "--max-request-bytes", type=parse_bytes, default=4 * 2**20, help="request body size (default 4MiB)"
    )
    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--prefill-chunk",
        type=positive_int,
        default=256,
        help="prompt tokens read between two decode steps; also the prompt cache's block (default 256)",
    )
    engine.add_argument(
        "--prefix-cache",
        type=parse_bytes,
        default=2**30,
        help="memory for cached prompt states, e.g. 2GiB; 0 turns the cache off (default 1GiB)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=finite_float,
        default=60.0,
        help="seconds to let running requests finish after Ctrl-C / SIGTERM (default 60)",
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=run_serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads' long wait is over, so a taken port fails fast."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UsageError(f"--host {host}: not an address this machine can bind ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRNOTAVAIL:  # a valid address, but of another machine
            raise UsageError(f"--host {host}: not an address of this machine ({err.strerror})") from None
        raise OSError(
            f"cannot listen on {host}:{port}: {err.strerror} (is another server running? try --port)"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _check(args: argparse.Namespace, max_position_embeddings: int) -> None:
    if args.port < 0 or args.port > 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.shutdown_timeout < 0:
        raise UsageError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise UsageError("--served-model-name is empty: name the model as clients will ask for it, or drop the flag")
    if args.max_request_bytes < 1:
        raise UsageError(
            f"--max-request-bytes must be at least 1 byte, got {args.max_request_bytes}: every request would be refused"
        )
    args.max_model_len = args.max_model_len or max_position_embeddings
    if args.max_model_len < 2:
        raise UsageError(
            f"--max-model-len must be >= 2 (a prompt token and a completion token), got {args.max_model_len}"
        )
    args.max_prompt_tokens = args.max_prompt_tokens or args.max_model_len - 1
    if args.max_prompt_tokens >= args.max_model_len:
        raise UsageError(
            f"--max-prompt-tokens {args.max_prompt_tokens} leaves no room to answer within --max-model-len "
            f"{args.max_model_len}"
        )
    args.max_n = args.max_n or min(8, args.max_batch)
    if args.max_n > args.max_batch:
        raise UsageError(
            f"--max-n {args.max_n} is more than --max-batch {args.max_batch}: such a request could never run"
        )
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError(f"the API key (--api-key or ${API_KEY_ENV}) is empty")
    if args.api_key is not None:
        # a header value is printable ASCII, its outer whitespace dropped: any other key no request could match
        unsendable = sorted({c for c in args.api_key if not " " <= c <= "~"})
        if unsendable or args.api_key != args.api_key.strip():
            what = ", ".join(repr(c) for c in unsendable[:4]) if unsendable else "whitespace at an end"
            raise UsageError(
                f"the API key (--api-key or ${API_KEY_ENV}) holds {what}: a client's 'Authorization: Bearer KEY' "
                "header carries printable ASCII without outer whitespace, so no request could match it; use such "
                "a key (a trailing newline or space from a file is the usual cause)"
            )


def run_serve(args: argparse.Namespace) -> None:
    # imported here, not at the top: the web stack (app, engine metrics) is the optional `serve` extra
    try:
        import uvicorn
    except ImportError as err:
        raise ImportError(f"densessm serve needs the web stack: pip install 'densessm[serve]' ({err})") from None
    from transformers.utils.logging import disable_progress_bar

    from densessm.serving.app import ServerSettings, create_app
    from densessm.serving.engine import Engine, EngineConfig
    from densessm.serving.metrics import ServerMetrics

    device = resolve_device(args.device)
    check_quantize(args, device, DTYPES[args.dtype])
    model_dir = Path(args.model_dir)
    config = read_config(model_dir)
    check_weights(model_dir, config)  # before the tokenizer and the port: a broken model directory is named first
    _check(args, getattr(config, "max_position_embeddings", None) or UNBOUNDED_CONTEXT)
    if not _is_loopback(args.host) and args.api_key is None:
        log.warning(
            "serving on %s without an API key: anyone who reaches this address can use the model (set $%s)",
            args.host,
            API_KEY_ENV,
        )
    tokenizer = load_tokenizer_dir(args.tokenizer or model_dir)  # never runs code shipped with it
    if len(tokenizer) > config.vocab_size:  # served, but a prompt holding the extra tokens fails (a 500)
        log.warning(
            "the tokenizer has %d tokens, beyond the model's vocabulary of %d: prompts holding the extra ones will "
            "be refused as a server error (pass the tokenizer the model was trained with: --tokenizer DIR)",
            len(tokenizer),
            config.vocab_size,
        )
    sock = _bind(args.host, args.port)
    disable_progress_bar()  # a server's log is read later: one line per event, no progress bars
    model = load_causal_lm(model_dir, dtype=DTYPES[args.dtype], device=device, config=config)
    prepare_for_decoding(model, args.quantize, prepack=not args.no_prepack, compiled=args.compile)
    metrics = ServerMetrics(args.max_batch)
    engine = Engine(
        model,
        copy.deepcopy(tokenizer),  # the engine thread decodes with its own copy: a fast tokenizer is not shared
        EngineConfig(
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            prefill_chunk=args.prefill_chunk,
            prefix_cache_bytes=args.prefix_cache,
            max_model_len=args.max_model_len,
            compile=args.compile,
        ),
        metrics,
    )
    settings = ServerSettings(
        model_name=args.served_model_name or model_dir.resolve().name,
        api_key=args.api_key,
        max_model_len=args.max_model_len,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        max_n=args.max_n,
        max_request_bytes=args.max_request_bytes,
    )
    host, port = sock.getsockname()[:2]
    state_mib = engine.state_size / 2**20
    cache = engine.prefix_cache
    cache_note = f"{cache.capacity} states ({args.prefix_cache / 2**20:.0f} MiB)" if cache.enabled else "off"

    weights = f"{args.dtype}, int8 weights" if args.quantize else args.dtype

    def ready() -> None:
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        print(
            f"densessm serve: {settings.model_name} ({config.model_type}, {weights}, {device}) at {url}/v1 "
            f"- state {state_mib:.2f} MiB per sequence, batch {args.max_batch}, context {args.max_model_len}, "
            f"prompt cache {cache_note}",
            file=sys.stderr,
            flush=True,
        )

    app = create_app(engine, tokenizer, settings, metrics, on_ready=ready)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=args.log_level,
            # a backstop only: at --shutdown-timeout the engine ends the open requests itself (see _serve)
            timeout_graceful_shutdown=args.shutdown_timeout + SHUTDOWN_BACKSTOP,
            lifespan="on",
        )
    )
    _serve(server, sock, engine, args.shutdown_timeout)


SHUTDOWN_BACKSTOP = 10.0
"""Seconds uvicorn waits beyond ``--shutdown-timeout`` before it cancels what is left: by then the engine has
ended every open request with an answer the client can read."""


def _serve(server, sock: socket.socket, engine, shutdown_timeout: float) -> None:
    """uvicorn in a thread, the engine's loop in this (the main) thread, which loaded the model: one OpenMP team
    does all the model's work (see :meth:`Engine.run`). Ctrl-C and SIGTERM start uvicorn's graceful shutdown
    (a second Ctrl-C forces it); requests still running ``shutdown_timeout`` seconds later end with a 503 (an
    error event and ``[DONE]`` in a stream): cancelled by uvicorn, they ended in a bare "Internal Server Error"
    and a cut stream. Once it is done, the signal takes its usual course (exit status 130 for Ctrl-C,
    termination for SIGTERM)."""
    captured: list[int] = []

    def on_signal(sig: int, frame) -> None:
        if not captured:
            timer = threading.Timer(shutdown_timeout, engine.stop)
            timer.daemon = True
            timer.start()
        captured.append(sig)
        server.handle_exit(sig, frame)

    def http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            engine.stop()  # also when uvicorn ends without its shutdown hook (a forced exit, a failed start)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="densessm-http")
    try:
        engine.run(on_start=thread.start)
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if captured:
        signal.raise_signal(captured[0])
    if not server.started:
        raise RuntimeError("the server did not start (see the log above)")


__all__ = ["API_KEY_ENV", "add_serve_parser", "parse_bytes", "run_serve"]
