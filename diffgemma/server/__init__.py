"""The HTTP server: OpenAI-compatible routes, request batching, the playground page."""

from __future__ import annotations

from ..api import DiffGemma
from .app import ServerOptions, create_app


def serve(model: DiffGemma, host: str = "127.0.0.1", port: int = 8000, options: ServerOptions | None = None) -> None:
    """Run the server until interrupted (binds to localhost unless told otherwise)."""
    import uvicorn

    uvicorn.run(create_app(model, options), host=host, port=port, log_level="info")


__all__ = ["ServerOptions", "create_app", "serve"]
