"""``moecache serve``: an OpenAI-compatible HTTP server for an offloaded MoE model.

--max-context caps prompt + completion tokens per request (default: the model's limit) and is
the context --gpu-memory auto leaves KV-cache room for.

Endpoints: /v1/completions, /v1/chat/completions (streaming or not), /v1/models, /health and
/metrics (Prometheus text: requests, tokens/s, cache hits, misses, ready rate, bytes copied, stall,
experts run on the CPU). Requests are generated one at a time in arrival order, so each answer
equals a solo run with the same seed; at most --max-queue wait (the rest get 429). Chat messages go
through the model's chat template, or for a model without one (the embedded byte-level model) the
plain template: each message as 'role: content' on its own line, then 'assistant:'.

It binds to 127.0.0.1 unless --host says otherwise. With --api-key (or $MOECACHE_API_KEY) every
path but /health needs the header 'Authorization: Bearer KEY'.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import ConfigError
from .model_options import add_model_options, check_model_path, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this bearer key (default: $MOECACHE_API_KEY, else none)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait while one is generated")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the folder's name, or moecache-default)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before the model is loaded."""
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a TCP port; use 1-65535 (0: any free port)")
    if args.max_queue < 1:
        raise ConfigError(f"--max-queue must be >= 1, got {args.max_queue}")
    check_model_path(args)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..serve import TextGenerator, create_app

    check_args(args)
    api_key = args.api_key or os.environ.get("MOECACHE_API_KEY") or None
    loaded = load_model(args, "serve")
    generator = TextGenerator(loaded.model, loaded.encode, loaded.decode, loaded.tokenizer, args.max_context)
    name = args.served_model_name or loaded.name
    if loaded.handle is not None:
        print(loaded.handle.summary().splitlines()[0], file=sys.stderr)
    template = "the model's chat template" if generator.has_chat_template else "the plain chat template"
    print(f"moecache serve: model '{name}', context {generator.max_context} tokens, {template}, "
          f"up to {args.max_queue} waiting, API key {'required' if api_key else 'off'}", file=sys.stderr)
    app = create_app(generator, loaded.handle, model_name=name, max_waiting=args.max_queue, api_key=api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    if loaded.handle is not None:
        loaded.handle.remove()
    return 0
