"""A real uvicorn server on 127.0.0.1 in a background thread, for the server tests and benchmarks."""

from __future__ import annotations

import threading
import time
from typing import Any

#: The embedded model's architecture at a size that generates quickly on two CPU cores.
SMALL_DEFAULT = dict(hidden_size=64, num_hidden_layers=2, num_experts=8, moe_intermediate_size=32,
                     intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     max_position_embeddings=512)


def small_default_model(seed: int = 0) -> Any:
    from moecache.default_model import default_model

    return default_model(seed=seed, **SMALL_DEFAULT)


class LiveServer:
    """``uvicorn.Server`` running ``app`` on a free port of 127.0.0.1; ``url`` is its base URL."""

    def __init__(self, app: Any):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve_small(*, max_waiting: int = 64, api_key: str | None = None, cache_slots: int = 6,
                max_context: int | None = None) -> tuple[LiveServer, Any]:
    """The small embedded model, offloaded (``cache_slots`` of its 16 experts), served live."""
    from moecache.default_model import decode, encode
    from moecache.runtime import offload
    from moecache.serve import TextGenerator, create_app

    model = small_default_model()
    handle = offload(model, cache_slots=cache_slots, device="cpu")
    gen = TextGenerator(model, encode, decode, None, max_context)
    app = create_app(gen, handle, model_name="moecache-default", max_waiting=max_waiting, api_key=api_key)
    return LiveServer(app), handle
