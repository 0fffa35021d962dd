"""An MCP server for the tests (`chat --mcp`, `tool_servers`): the demo model's one tool, and with `--failing` a
second one that always fails. Run as a script: over stdio, or with `--port N` over HTTP."""

import sys

from mcp.server.mcpserver import MCPServer

server = MCPServer("weather")


@server.tool()
def get_weather(city: str) -> str:
    """The weather now in a city"""
    return "Sunny, 21 C" if city else "which city?"


if "--failing" in sys.argv:

    @server.tool()
    def forecast(days: int) -> str:
        """The weather to come"""
        raise ValueError(f"no forecast for {days} days")


if __name__ == "__main__":
    if "--port" in sys.argv:  # over HTTP (streamable HTTP, at /mcp), not stdio
        server.run("streamable-http", port=int(sys.argv[sys.argv.index("--port") + 1]))
    else:
        server.run()
