"""The HTTP server: OpenAI-compatible routes, request batching, the playground page."""

from __future__ import annotations

from ..api import DiffGemma
from .app import ServerOptions, create_app


def serve(model: DiffGemma, host: str = "127.0.0.1", port: int = 8000, options: ServerOptions | None = None) -> None:
    """Run the server until interrupted (binds to localhost unless told otherwise)."""
    import uvicorn

    name = (options or ServerOptions()).model_name
    shown = f"[{host}]" if ":" in host else host
    print(f"diffgemma: serving {name} at http://{shown}:{port}/v1 (the playground at http://{shown}:{port}/)")
    uvicorn.run(create_app(model, options), host=host, port=port, log_level="info")


__all__ = ["ServerOptions", "create_app", "serve"]
