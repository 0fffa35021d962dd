"""The HTTP server: OpenAI-compatible routes (and Anthropic's messages), request batching, the playground page."""

from __future__ import annotations

import sys

from ..api import DiffGemma
from .app import create_app
from .service import ServerOptions


def serve(model: DiffGemma, host: str = "127.0.0.1", port: int = 8000, options: ServerOptions | None = None) -> None:
    """Run the server until interrupted (binds to localhost unless told otherwise)."""
    import uvicorn

    options = options or ServerOptions()
    shown = f"[{host}]" if ":" in host else host
    print(
        f"diffgemma: serving {options.model_name} at http://{shown}:{port}/v1 (the playground at http://{shown}:{port}/)"
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not options.api_key:
        exposed = f"{host} is reachable beyond this machine and no --api-key is set: anyone who can reach it can use it"
        print(f"diffgemma: warning: {exposed}", file=sys.stderr)
    uvicorn.run(create_app(model, options), host=host, port=port, log_level="info")


__all__ = ["ServerOptions", "create_app", "serve"]
