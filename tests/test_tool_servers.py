"""Tools from MCP servers (`tool_servers`, `chat --mcp`), over the protocol with a real server (tests/assets)."""

import sys
from pathlib import Path

import pytest
from assets.make_demo_model import WEATHER_ANSWER, WEATHER_QUESTION, WEATHER_RESULT, WEATHER_TOOL
from test_cli import DEMO, run

from diffgemma.errors import DiffGemmaError
from diffgemma.tool_servers import ToolServers
from diffgemma.toolcalls import ToolCall, check_tools, run_tool_calls

pytest.importorskip("mcp")
SERVER = f"{sys.executable} {Path(__file__).parent / 'assets' / 'weather_mcp.py'}"


def test_a_servers_tools_are_offered_and_called_as_python_ones_are():
    with ToolServers([f"{SERVER} --failing"]) as servers:
        weather, forecast = servers.tools
        # offered as a Python function with its signature is (the schema's titles dropped, its keys in that order)
        assert check_tools([weather]) == [WEATHER_TOOL]
        assert weather(city="Paris") == WEATHER_RESULT
        calls = [ToolCall("get_weather", {"city": "Paris"}), ToolCall("forecast", {"days": 3})]
        answers = [message["content"] for message in run_tool_calls(calls, [weather, forecast])[1:]]
        # a tool that fails: the model is told so, as for a Python tool that raises
        assert answers[0] == WEATHER_RESULT and answers[1].startswith("error: RuntimeError: Error executing tool")


@pytest.mark.parametrize(
    ("commands", "says"),
    [
        (["no-such-server --x"], "MCP server `no-such-server --x`: FileNotFoundError"),
        ([f"{sys.executable} -c 'import sys; sys.exit(3)'"], "Connection closed"),
        ([""], "an empty command"),
        ([SERVER, SERVER], "a tool named 'get_weather' is offered already"),
    ],
)
def test_a_server_that_does_not_start_is_one_error(commands, says):
    with pytest.raises(DiffGemmaError) as refused, ToolServers(commands):
        pass
    assert says in str(refused.value)


def test_chat_with_an_mcp_server(capsys, tmp_path):
    """`chat --mcp COMMAND`: the server's tools are the model's, each call run on it, as `--tools` runs a file's;
    a command that does not start, a tool offered by both, and --file with --mcp are one line, exit 2."""
    code, out, _ = run(capsys, "chat", WEATHER_QUESTION, "--mcp", SERVER, "--model", DEMO, "--seed", "0")
    assert code == 0 and out.splitlines() == [f"[tool] get_weather(city='Paris') -> {WEATHER_RESULT}", WEATHER_ANSWER]
    tools = tmp_path / "weather.py"
    tools.write_text('def get_weather(city: str) -> str:\n    """The weather now in a city"""\n    return "Rain"\n')
    for argv, message in (
        (["--mcp", "no-such-server"], "MCP server `no-such-server`: FileNotFoundError"),
        (["--mcp", SERVER, "--tools", str(tools)], "--tools and --mcp both offer a tool named 'get_weather'"),
        (["--mcp", SERVER, "--file", str(tools)], "--file answers many conversations"),
    ):
        code, _, err = run(capsys, "chat", *(["hi"] if "--file" not in argv else []), *argv, "--model", DEMO)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, argv


def test_without_the_mcp_package_it_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mcp", None)  # (as if not installed: importing it fails)
    with pytest.raises(DiffGemmaError, match="need the `mcp` package: pip install mcp"), ToolServers([SERVER]):
        pass
    with ToolServers([]) as none:  # no server asked for: nothing needed
        assert none.tools == []
