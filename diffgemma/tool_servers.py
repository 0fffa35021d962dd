"""Tools from MCP servers (the Model Context Protocol's): each server a command run as a subprocess that speaks
the protocol on its standard input and output, or the URL of one that speaks it over HTTP (its streamable HTTP
transport), its tools offered to the model as any others are (OpenAI's shape), the model's calls run on it. Needs
the `mcp` package (`pip install mcp`, or the `mcp` extra).

The protocol's client is asyncio; a chat is not, so the servers live on an event loop of their own, on a thread,
for as long as the `ToolServers` block runs, and each call waits for its answer there. A started server's own
output (its logs; a failing tool's traceback) is kept apart from the chat, and its last lines told if it fails to
start.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import tempfile
import threading
from typing import IO, Any

from .errors import DiffGemmaError
from .toolcalls import TOOL_NAME

CALL_TIMEOUT = 300.0  # seconds a tool call may take before the model is told it timed out
START_TIMEOUT = 60.0  # seconds a server may take to start and list its tools


class ServerTool:
    """One tool of a running server, as a function the chat's tool loop calls (`run_tool_calls`); `openai_tool`
    is how it is offered (`check_tools` takes it as given)."""

    def __init__(self, servers: ToolServers, session: Any, listed: Any) -> None:
        self.__name__ = listed.name
        self._servers, self._session = servers, session
        if not TOOL_NAME.fullmatch(listed.name):
            raise DiffGemmaError(f"its tool {listed.name!r} has a name no call can write")
        schema = _field(listed, "input_schema", "inputSchema") or {"type": "object", "properties": {}}
        schema = _without_titles(dict(schema))
        # in the order a Python function's tool is offered (`function_tool`): the two kinds read alike in a prompt
        schema = {key: schema[key] for key in ("type", "properties", "required") if key in schema} | schema
        function = {"name": listed.name, "description": listed.description or "", "parameters": schema}
        self.openai_tool = {"type": "function", "function": function}

    def __call__(self, **arguments: Any) -> str:
        result = self._servers.wait(self._session.call_tool(self.__name__, arguments), CALL_TIMEOUT)
        parts = [getattr(part, "text", None) or f"[{getattr(part, 'type', 'content')}]" for part in result.content]
        text = "\n".join(parts)
        if _field(result, "is_error", "isError"):  # (the tool loop tells the model what went wrong)
            raise RuntimeError(text or "the tool failed")
        return text


class ToolServers:
    """MCP servers started from `commands` (each a command line, or an http(s) URL: a server already running) for
    the length of a `with` block; `tools`, all their tools (two of one name are refused)."""

    def __init__(self, commands: list[str]) -> None:
        self.commands = commands
        self.tools: list[ServerTool] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ended: asyncio.Future | None = None
        self._logs = contextlib.ExitStack()  # each started server's standard error: a file, kept until the end

    def __enter__(self) -> ToolServers:
        if not self.commands:
            return self
        try:
            from mcp import ClientSession, StdioServerParameters  # noqa: F401 - checked here, used on the loop
        except ImportError:
            raise DiffGemmaError("MCP servers need the `mcp` package: pip install mcp") from None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="diffgemma-mcp", daemon=True)
        self._thread.start()
        try:
            self.wait(self._start(), START_TIMEOUT)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is None:
            return
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            with contextlib.suppress(Exception):  # (a server that will not close is left to its exit)
                asyncio.run_coroutine_threadsafe(asyncio.wait_for(self._ended, 10), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=15)
        if not self._thread.is_alive():
            self._loop.close()
        self._loop = None
        self._logs.close()

    def wait(self, work: Any, timeout: float) -> Any:
        """`work` (a coroutine) run on the servers' loop, its result once it is done (at most `timeout` s)."""
        future = asyncio.run_coroutine_threadsafe(work, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer in {timeout:g} s") from None

    async def _start(self) -> None:
        """Each server started and its tools listed; the servers then run until the block ends (`_serve`)."""
        self._stop = asyncio.Event()
        started = asyncio.get_running_loop().create_future()
        self._ended = asyncio.ensure_future(self._serve(started))
        await started

    async def _serve(self, started: asyncio.Future) -> None:
        from mcp import ClientSession

        command, log = "", None
        try:
            async with contextlib.AsyncExitStack() as stack:
                for command in self.commands:
                    connection, log = self._transport(command)
                    streams = await stack.enter_async_context(connection)
                    session = await stack.enter_async_context(ClientSession(streams[0], streams[1]))
                    await session.initialize()
                    listed = await session.list_tools()
                    self._add([ServerTool(self, session, tool) for tool in listed.tools])
                started.set_result(None)
                await self._stop.wait()
        except Exception as err:  # (once started, a server's failure to close is left to the process's exit)
            if not started.done():
                said = _last_lines(log) if log is not None else ""
                started.set_exception(DiffGemmaError(f"MCP server `{command}`: {_reason(err)}{said}"))

    def _transport(self, command: str) -> tuple[Any, IO[str] | None]:
        """(the protocol's streams to a server, the file its standard error goes to): over HTTP to a URL (no file),
        else over the standard input and output of the command, started (the `mcp` package yields (read, write),
        and in some versions more after them)."""
        if command.startswith(("http://", "https://")):
            from mcp.client import streamable_http

            connect = getattr(streamable_http, "streamable_http_client", None) or streamable_http.streamablehttp_client
            return connect(command), None
        from mcp import StdioServerParameters
        from mcp.client.stdio import stdio_client

        words = shlex.split(command)
        if not words:
            raise DiffGemmaError("an empty command")
        file = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")  # noqa: SIM115 - closed with the block
        log = self._logs.enter_context(file)
        return stdio_client(StdioServerParameters(command=words[0], args=words[1:]), errlog=log), log

    def _add(self, tools: list[ServerTool]) -> None:
        names = {tool.__name__ for tool in self.tools}
        for tool in tools:
            if tool.__name__ in names:
                raise DiffGemmaError(f"a tool named {tool.__name__!r} is offered already")
            names.add(tool.__name__)
        self.tools += tools


def _last_lines(log: IO[str], count: int = 3) -> str:
    """What a server said last on its standard error, to tell with its failure ("" if nothing)."""
    log.seek(0)
    lines = [line.rstrip() for line in log.read().splitlines() if line.strip()][-count:]
    return f" (it said: {' | '.join(lines)})" if lines else ""


def _without_titles(schema: Any) -> Any:
    """A JSON schema without the `title` keys some servers' schema makers write on every object and property
    (noise in the prompt); a property named "title" stays."""
    if isinstance(schema, dict):
        return {
            key: (
                {name: _without_titles(value) for name, value in part.items()}
                if key == "properties" and isinstance(part, dict)
                else _without_titles(part)
            )
            for key, part in schema.items()
            if key != "title"
        }
    if isinstance(schema, list):
        return [_without_titles(part) for part in schema]
    return schema


def _field(item: Any, *names: str) -> Any:
    """A protocol object's field by the first of `names` it has (the `mcp` package renamed them between
    versions: `input_schema` was `inputSchema`)."""
    return next((getattr(item, name) for name in names if hasattr(item, name)), None)


def _reason(err: BaseException) -> str:
    """An error's message, through the exception groups the protocol's task groups raise (ours as it is)."""
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    if isinstance(err, DiffGemmaError):
        return str(err)
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
