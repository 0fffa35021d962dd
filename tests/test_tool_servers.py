"""Tools from MCP servers (`tool_servers`, `chat --mcp`), over the protocol with a real server (tests/assets)."""

import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
from assets.make_demo_model import WEATHER_ANSWER, WEATHER_QUESTION, WEATHER_RESULT, WEATHER_TOOL
from server_util import free_port
from test_cli import DEMO, run

from diffgemma.errors import DiffGemmaError
from diffgemma.tool_servers import ToolServers
from diffgemma.toolcalls import ToolCall, check_tools, run_tool_calls

pytest.importorskip("mcp")
ASSET = Path(__file__).parent / "assets" / "weather_mcp.py"
SERVER = f"{sys.executable} {ASSET}"  # (the command line --mcp takes)


def test_a_servers_tools_are_offered_and_called_as_python_ones_are(capfd):
    with ToolServers([f"{SERVER} --failing"]) as servers:
        weather, forecast = servers.tools
        # offered as a Python function with its signature is (the schema's titles dropped, its keys in that order)
        assert check_tools([weather]) == [WEATHER_TOOL]
        assert weather(city="Paris") == WEATHER_RESULT
        calls = [ToolCall("get_weather", {"city": "Paris"}), ToolCall("forecast", {"days": 3})]
        answers = [message["content"] for message in run_tool_calls(calls, [weather, forecast])[1:]]
        # a tool that fails: the model is told so, as for a Python tool that raises
        assert answers[0] == WEATHER_RESULT and answers[1].startswith("error: RuntimeError: Error executing tool")
    assert "no forecast" not in capfd.readouterr().err  # (the server's traceback is its own, kept from the chat)


def test_a_server_over_http_by_its_url():
    """An http(s) URL is a server already running, reached over the protocol's streamable HTTP transport."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ASSET), "--port", str(port)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with ToolServers([f"http://127.0.0.1:{port}/mcp"]) as servers:
                    assert [tool.__name__ for tool in servers.tools] == ["get_weather"]
                    assert servers.tools[0](city="Paris") == WEATHER_RESULT
                break
            except DiffGemmaError as err:  # (not listening yet)
                assert "ConnectError" in str(err) and time.monotonic() < deadline, err
                time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize(
    ("commands", "says"),
    [
        (["no-such-server --x"], "MCP server `no-such-server --x`: FileNotFoundError"),
        ([f"{sys.executable} -c 'import sys; sys.exit(3)'"], "Connection closed"),
        # what a server that fails to start said last is told with its failure
        ([f"{sys.executable} -c 'import not_installed_module'"], "No module named 'not_installed_module')"),
        ([""], "an empty command"),
        ([SERVER, SERVER], "a tool named 'get_weather' is offered already"),
    ],
)
def test_a_server_that_does_not_start_is_one_error(commands, says):
    with pytest.raises(DiffGemmaError) as refused, ToolServers(commands):
        pass
    assert says in str(refused.value)


def test_chat_with_an_mcp_server(capsys, tmp_path, monkeypatch):
    """`chat --mcp COMMAND`: the server's tools are the model's, each call run on it, as `--tools` runs a file's;
    a command that does not start, a tool offered by both, and --file with --mcp are one line, exit 2."""
    code, out, _ = run(capsys, "chat", WEATHER_QUESTION, "--mcp", SERVER, "--model", DEMO, "--seed", "0")
    assert code == 0 and out.splitlines() == [f"[tool] get_weather(city='Paris') -> {WEATHER_RESULT}", WEATHER_ANSWER]
    # /tools lists what the chat offers: the server's tools beside the file's
    (tmp_path / "add.py").write_text('def add(a: int, b: int) -> int:\n    """Add two numbers"""\n    return a + b\n')
    monkeypatch.setattr(sys, "stdin", io.StringIO("/tools\n"))
    code, out, _ = run(capsys, "chat", "--mcp", SERVER, "--tools", str(tmp_path / "add.py"), "--model", DEMO)
    assert code == 0 and out.splitlines() == ["add: Add two numbers", "get_weather: The weather now in a city"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("/tools\n"))
    assert run(capsys, "chat", "--model", DEMO)[1].startswith("(no tools")
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
