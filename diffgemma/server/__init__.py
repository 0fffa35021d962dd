"""The HTTP server: OpenAI-compatible routes (and Anthropic's, Ollama's, llama.cpp's and TGI's), request batching,
the playground page."""

from __future__ import annotations

import socket
import sys

from ..api import DiffGemma
from ..errors import DiffGemmaError
from .app import create_app
from .service import ServerOptions


def check_address(host: str, port: int) -> None:
    """Refuse an address this machine cannot listen on (a port another program holds, a host name that is none
    of its own), naming it: checked before a model loads, which may take minutes."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise DiffGemmaError(f"--host {host}: no such address ({err.strerror})") from None
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
        try:
            probe.bind(address)
        except OSError as err:
            raise DiffGemmaError(
                f"cannot listen on {host} port {port}: {err.strerror} (choose another --port)"
            ) from None


def serve(model: DiffGemma, host: str = "127.0.0.1", port: int = 8000, options: ServerOptions | None = None) -> None:
    """Run the server until interrupted (binds to localhost unless told otherwise)."""
    import uvicorn

    options = options or ServerOptions()
    shown = f"[{host}]" if ":" in host else host
    root = f"http://{shown}:{port}"
    served = ", ".join([options.model_name, *model.adapters])  # (the adapters: models of their own, by name)
    others = f"Ollama's, llama.cpp's and TGI's clients: {root}; the playground: {root}/"
    print(f"diffgemma: serving {served} at {root}/v1 ({others})")
    if host not in ("127.0.0.1", "localhost", "::1") and not options.api_key:
        exposed = f"{host} is reachable beyond this machine and no --api-key is set: anyone who can reach it can use it"
        print(f"diffgemma: warning: {exposed}", file=sys.stderr)
    uvicorn.run(create_app(model, options), host=host, port=port, log_level="info")


__all__ = ["ServerOptions", "check_address", "create_app", "serve"]
