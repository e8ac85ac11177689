"""Tool definitions, the safe parser against a hostile corpus, built-in tools and the agent loop."""

import json
import os
import time
from pathlib import Path
from typing import Annotated, Literal

import pytest
from conftest import scripted

import glmkit
from glmkit.chat.agent import Agent, Finished, Observation, RefusedStep, TextDelta, ToolCallStep
from glmkit.chat.builtin_tools import BUILTIN, calculator, convert_units
from glmkit.chat.glm3 import tool_call_message
from glmkit.chat.tool_calls import RefusedCall, ToolCall, ToolCallError, parse_tool_call
from glmkit.chat.tool_definitions import Tool, as_tool, tool
from glmkit.chat.tools import load_tool_file, run_tool


# -- parser -----------------------------------------------------------------------------------

def test_official_forms():
    assert parse_tool_call(' ```python\ntool_call(symbol="10111")\n```') == {"symbol": "10111"}
    assert parse_tool_call("```python\ntool_call(symbol=\"10111\", unit='CNY')\n```") == {"symbol": "10111", "unit": "CNY"}
    assert parse_tool_call("tool_call(a=1, b=-2.5, c=True, d=None, e=[1, (2, 3)], f={'k': 'v'})") == \
        {"a": 1, "b": -2.5, "c": True, "d": None, "e": [1, [2, 3]], "f": {"k": "v"}}
    assert parse_tool_call("```\ntool_call()\n```") == {}
    args = {"city": "北京", "n": 3, "tags": ["a", "b"], "opt": None, "ok": True, "x": -2.5, "d": {"k": [1]}}
    message = tool_call_message(ToolCall("call_1", "lookup", args))   # how ChatGLM3 is shown an API client's call
    assert message["role"] == "assistant" and message["metadata"] == "lookup"
    assert parse_tool_call(message["content"]) == args


HOSTILE = [
    "tool_call(x=__import__('os').system('touch /tmp/glmkit-pwned'))",
    "tool_call(x=open('/etc/passwd').read())",
    "tool_call(x=().__class__.__bases__[0].__subclasses__())",
    "tool_call(x=os.system('id'))",
    "tool_call(x=eval('1+1'))",
    "tool_call(x=exec('import os'))",
    "tool_call(x=(lambda: 1)())",
    "tool_call(x=lambda: 1)",
    "tool_call(x=[i for i in range(10)])",
    "tool_call(x={i: i for i in range(3)})",
    "tool_call(x=f'{1+1}')",
    "tool_call(x=a.b.c)",
    "tool_call(x=globals())",
    "tool_call(x=__builtins__)",
    "tool_call(**{'x': 1})",
    "tool_call(1, 2)",
    "tool_call(x=1, x=2)",
    "other_call(x=1)",
    "tool_call(x=1); import os",
    "import os",
    "tool_call(x=1)\ntool_call(y=2)",
    "tool_call(x=" + "[" * 200 + "]" * 200 + ")",
    "tool_call(x=" + "[" * 5000 + "]" * 5000 + ")",
    "tool_call(x='" + "a" * 30000 + "')",
    "tool_call(x=9**9**9)",
    "tool_call(x=1e999)",
    "tool_call(x={1, 2})",
    "tool_call(x=b'bytes')",
    "tool_call(x=1j)",
    "tool_call(x={1: 'int key'})",
    "tool_call(x=(yield))",
    "tool_call(x=await y)",
    "tool_call(x=1 if True else 2)",
    "tool_call(x=[*range(3)])",
    "tool_call(х=1)\u202e",                      # unicode tricks: a bidi override after the call
    "tool_call(x='\\u202e')  # <|assistant|> fake",
    "```python\ntool_call(x=1)",                 # unterminated fence
    "<|assistant|>interpreter\n```python\nimport os\n```",
    "",
    "tool_call(x=(1).__class__)",
    "tool_call(a=0x" + "f" * 3600 + ")",         # huge integers in any form, lone surrogates, non-finite
    "tool_call(a=" + "1" * 4301 + ")",
    "tool_call(a=-0b" + "1" * 64 + ")",
    'tool_call(city="\\ud800")',
    "tool_call(x={'\\udc00': [1]})",
    "tool_call(x=-1e999)",
]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_corpus_is_refused_without_running(text):
    marker = Path("/tmp/glmkit-pwned")
    marker.unlink(missing_ok=True)
    try:
        result = parse_tool_call(text)
    except ToolCallError as e:
        assert str(e)  # a readable reason, fit for an observation
    else:
        # the only acceptable successes are plain data (e.g. a fake marker inside a string)
        json.dumps(result, allow_nan=False, ensure_ascii=False).encode("utf-8")
        assert all(isinstance(k, str) for k in result)
    assert not marker.exists()


def test_hostile_corpus_size():
    assert len(HOSTILE) >= 30


def test_no_eval_or_exec_of_model_output_anywhere_in_the_package():
    """No call of eval/exec (builtins or any object's) in glmkit's code; ast.literal_eval is fine."""
    import ast
    src = Path(glmkit.__file__).parent
    offenders = []
    for f in src.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                fn = node.func
                builtin = isinstance(fn, ast.Name) and fn.id in ("eval", "exec", "compile", "__import__")
                via_module = (isinstance(fn, ast.Attribute) and fn.attr in ("eval", "exec", "compile")
                              and isinstance(fn.value, ast.Name) and fn.value.id in ("builtins", "__builtins__"))
                if builtin or via_module:
                    offenders.append(f"{f.relative_to(src)}:{node.lineno}")
    assert offenders == []


# -- tool definitions ----------------------------------------------------------------------

@glmkit.tool
def get_weather(city: Annotated[str, "city name"], unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """Current weather for a city.

    Longer explanation that is not part of the description."""
    return {"city": city, "temperature": 21, "unit": unit}


def test_schema_from_type_hints():
    t = as_tool(get_weather)
    assert t.name == "get_weather" and t.description == "Current weather for a city."
    assert t.parameters == {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "city name"},
        "unit": {"enum": ["celsius", "fahrenheit"], "type": "string", "default": "celsius"}}}


def test_run_tool_validates_times_out_and_catches(tmp_path):
    ok = run_tool(as_tool(get_weather), {"city": "Paris"})
    assert ok.ok and json.loads(ok.observation)["city"] == "Paris"
    bad = run_tool(as_tool(get_weather), {"city": 3})
    assert not bad.ok and "city" in bad.error
    pid_file = tmp_path / "pid"

    @tool(timeout=0.5)
    def slow() -> str:
        pid_file.write_text(str(os.getpid()))
        time.sleep(60)
        return "late"

    @tool
    def broken() -> str:
        raise RuntimeError("database is down")

    @tool
    def crashing() -> str:
        os._exit(7)              # takes the interpreter down: only its worker's

    t0 = time.monotonic()
    late = run_tool(as_tool(slow), {})
    assert time.monotonic() - t0 < 10
    assert not late.ok and late.error == "tool slow did not finish within 0.5 s (it was stopped)"
    pid = int(pid_file.read_text())
    assert pid != os.getpid() and not os.path.exists(f"/proc/{pid}")    # killed, not abandoned
    boom = run_tool(as_tool(broken), {})
    assert not boom.ok and "RuntimeError: database is down" in boom.observation
    crash = run_tool(as_tool(crashing), {})
    assert not crash.ok and "crashed" in crash.error and "exit code 7" in crash.error
    assert run_tool(as_tool(get_weather), {"city": "Oslo"}).ok       # and the next call runs as usual


def test_an_agent_continues_after_a_tool_is_stopped(tiny32k):
    """The agent gets an error observation for a call killed at its timeout, and answers."""
    from glmkit.chat.agent import Agent, Finished, Observation
    from glmkit.chat.scripted import ScriptedBackend

    @tool(timeout=0.5)
    def hang(x: int) -> int:
        """never returns"""
        time.sleep(60)
        return x
    script = 'hang\n ```python\ntool_call(x=1)\n```'
    model = tiny32k.with_backend(ScriptedBackend(tiny32k.backend, [script]))
    events = list(Agent(model, [hang], max_steps=1).run("go", max_new_tokens=40, temperature=0))
    [obs] = [e for e in events if isinstance(e, Observation)]
    assert not obs.result.ok and "did not finish within 0.5 s" in obs.result.observation
    assert isinstance(events[-1], Finished) and events[-1].reason == "answered"


def test_long_observations_are_truncated():
    @tool
    def big() -> str:
        return "x" * 100_000
    r = run_tool(as_tool(big), {})
    assert len(r.observation) < 5000 and "truncated" in r.observation


def test_tools_from_files(tmp_path):
    py = tmp_path / "my_tools.py"
    py.write_text("import glmkit\n@glmkit.tool\ndef add(a: int, b: int) -> int:\n    'Add.'\n    return a + b\n")
    [t] = load_tool_file(py)
    assert t.name == "add" and run_tool(t, {"a": 2, "b": 3}).value == 5
    js = tmp_path / "tools.json"
    js.write_text(json.dumps([{"name": "track", "description": "d", "parameters": {"type": "object"}}]))
    [s] = load_tool_file(js)
    assert s.function is None and not run_tool(s, {}).ok
    yml = tmp_path / "tools.yaml"
    yml.write_text("tools:\n  - name: lookup\n    description: find\n    parameters: {type: object}\n")
    assert load_tool_file(yml)[0].name == "lookup"
    with pytest.raises(glmkit.GlmkitError):
        load_tool_file(tmp_path / "missing.py")


def test_builtin_tools():
    assert calculator(expression="(3 + 4) * 2 ** 3")["result"] == 56
    assert convert_units(value=100, from_unit="C", to_unit="F")["result"] == 212
    for evil in ("__import__('os')", "().__class__", "9 ** 9 ** 9", "open('x')"):
        r = run_tool(as_tool(calculator), {"expression": evil})
        assert not r.ok
    assert {as_tool(t).name for t in BUILTIN} == {"calculator", "current_time", "convert_units", "random_number"}


# -- agent loop (tiny ChatGLM3 fixture, decoding constrained to a script) ------------------

def _script(model, *segments: str) -> list[int]:
    from glmkit.chat.scripted import scripted_reply_ids
    return scripted_reply_ids(model.tokenizer, "<|assistant|>".join(segments))


def test_agent_call_observation_answer(tiny32k):
    tiny = tiny32k  # its 32k context holds the tool schema; chatglm3-tiny's 256 tokens do not
    script = [_script(tiny, 'get_weather\n ```python\ntool_call(city="Paris")\n```'),
              _script(tiny, "\n巴黎现在21度。")]
    agent = Agent(scripted(tiny, *script), tools=[get_weather], max_steps=3)
    events = list(agent.run("巴黎天气怎么样？", temperature=0, max_new_tokens=60))
    kinds = [k for i, k in enumerate(type(e) for e in events) if i == 0 or type(events[i - 1]) is not k]
    assert kinds == [ToolCallStep, Observation, TextDelta, Finished]
    call = events[0].call
    assert call.name == "get_weather" and call.arguments == {"city": "Paris"} and call.id.startswith("call_")
    assert events[1].call == call and events[1].result.ok
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "巴黎现在21度。"
    assert events[-1] == Finished("answered")
    roles = [(m["role"], m.get("metadata", "")) for m in agent.messages]
    assert roles == [("system", ""), ("user", ""), ("assistant", "get_weather"), ("observation", ""), ("assistant", "")]
    assert json.loads(agent.messages[3]["content"])["city"] == "Paris"


def test_agent_runs_every_call_of_a_reply_in_order(tiny32k):
    """ChatGLM3 writes two calls as two assistant segments of one reply: both run, in the order
    written, each followed by its observation, before the model answers."""
    script = [_script(tiny32k, 'get_weather\n ```python\ntool_call(city="Paris")\n```',
                      'get_weather\n ```python\ntool_call(city="Oslo", unit="fahrenheit")\n```'),
              _script(tiny32k, "\n两个城市都查到了。")]
    agent = Agent(scripted(tiny32k, *script), tools=[get_weather], max_steps=3)
    events = list(agent.run("巴黎和奥斯陆？", temperature=0, max_new_tokens=60))
    steps = [e for e in events if not isinstance(e, TextDelta)]
    assert [type(e) for e in steps] == [ToolCallStep, Observation, ToolCallStep, Observation, Finished]
    paris, oslo = steps[0].call, steps[2].call
    assert paris.arguments == {"city": "Paris"} and oslo.arguments == {"city": "Oslo", "unit": "fahrenheit"}
    assert paris.id != oslo.id and steps[1].call == paris and steps[3].call == oslo
    assert [json.loads(e.result.observation)["city"] for e in steps[1:4:2]] == ["Paris", "Oslo"]
    assert steps[-1] == Finished("answered")
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "两个城市都查到了。"
    roles = [(m["role"], m.get("metadata", "")) for m in agent.messages]
    assert roles == [("system", ""), ("user", ""), ("assistant", "get_weather"), ("assistant", "get_weather"),
                     ("observation", ""), ("observation", ""), ("assistant", "")]
    assert [json.loads(m["content"])["unit"] for m in agent.messages[4:6]] == ["celsius", "fahrenheit"]


def test_agent_max_steps_and_failing_tools(tiny32k):
    tiny = tiny32k
    @tool
    def flaky(x: int) -> int:
        """Always fails."""
        raise ValueError("nope")

    call = _script(tiny, "flaky\n ```python\ntool_call(x=1)\n```")
    agent = Agent(scripted(tiny, call, call, call), tools=[flaky], max_steps=2)
    events = list(agent.run("go", temperature=0, max_new_tokens=40))
    results = [e for e in events if isinstance(e, Observation)]
    assert len(results) == 2 and all(not r.result.ok for r in results)
    assert "nope" in results[0].result.observation
    assert events[-1] == Finished("max_steps")
    # a refused call (code, not literals) is an error observation, not an exception
    evil = _script(tiny, "flaky\n ```python\ntool_call(x=__import__('os').getpid())\n```")
    agent2 = Agent(scripted(tiny, evil), tools=[flaky], max_steps=1)
    ev2 = list(agent2.run("go", temperature=0, max_new_tokens=60))
    [refused] = [e for e in ev2 if isinstance(e, RefusedStep)]
    assert isinstance(refused.call, RefusedCall) and refused.call.name == "flaky" and "literal" in refused.call.reason
    [result] = [e for e in ev2 if isinstance(e, Observation)]
    assert result.call == refused.call and not result.result.ok
    observations = [m["content"] for m in agent2.messages if m["role"] == "observation"]
    assert len(observations) == 1 and "refused" in observations[0]
    assert agent2.messages[-1]["role"] == "assistant"     # the model answers after the refusal


def test_cli_tools_builtin_one_shot(clean_env):
    """`glmkit chat --tools builtin -p ...` runs end to end: the reply on stdout, tool steps (if the
    model calls any) on stderr.  The default model has no ChatGLM3 protocol: it says which convention it asks for instead."""
    import subprocess
    from conftest import glmkit_bin
    proc = subprocess.run([glmkit_bin(), "chat", "--tools", "builtin", "-p", "What is 2+2?", "--temperature", "0",
                           "--max-new-tokens", "30"], capture_output=True, text=True, timeout=300, env=clean_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "has no tool protocol of its own; it is asked for <tool_call> JSON instead" in proc.stderr


def test_cli_manual_mode_reads_observations(clean_env, tmp_path):
    """--manual with a schema file: the person types the observation (driven through a pty)."""
    import pexpect
    from conftest import TINY_32K, glmkit_bin
    schema = tmp_path / "tools.json"
    schema.write_text(json.dumps([{"name": "track", "description": "stock price",
                                   "parameters": {"type": "object", "properties": {"symbol": {"type": "string"}}}}]))
    child = pexpect.spawn(glmkit_bin(), ["chat", "--model", str(TINY_32K), "--tools", str(schema), "--manual",
                                         "--temperature", "0", "--max-new-tokens", "8"],
                          env=clean_env, encoding="utf-8", timeout=60)
    child.expect("tools: track")
    child.expect("You: ")
    child.sendline("hello")
    child.expect("You: ")      # the random model answers without calling: the session goes on
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_agent_manual_observer_supplies_observations(tiny32k):
    from glmkit.chat.tools import ToolResult
    seen = []

    def person(name, args):
        seen.append((name, args))
        return ToolResult(True, '{"price": 12412}')

    schema_only = Tool("track", "stock price", {"type": "object", "properties": {"symbol": {"type": "string"}}})
    script = [_script(tiny32k, 'track\n ```python\ntool_call(symbol="10111")\n```'), _script(tiny32k, "\n12412元。")]
    agent = Agent(scripted(tiny32k, *script), tools=[schema_only], max_steps=2, observer=person)
    events = list(agent.run("查股票", temperature=0, max_new_tokens=60))
    assert seen == [("track", {"symbol": "10111"})]
    assert agent.messages[3] == {"role": "observation", "content": '{"price": 12412}'}
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "12412元。"
    assert events[-1] == Finished("answered")


def test_agent_hands_over_calls_it_cannot_run(tiny32k):
    """A tool given only as a schema (an API client's own function) is not run: its calls end the
    run, handed over in Finished; a call of a tool with a function in the same reply still runs."""
    schema_only = Tool("track", "stock price", {"type": "object", "properties": {"symbol": {"type": "string"}},
                                                "required": ["symbol"]})
    script = [_script(tiny32k, 'track\n ```python\ntool_call(symbol="10111")\n```',
                      'get_weather\n ```python\ntool_call(city="Paris")\n```',
                      'track\n ```python\ntool_call(symbol="20222")\n```',
                      'track\n ```python\ntool_call(code=1)\n```')]       # fails the schema: refused here
    agent = Agent(scripted(tiny32k, *script), tools=[schema_only, get_weather], max_steps=2)
    events = list(agent.run("查股票和天气", temperature=0, max_new_tokens=200))
    steps = [e for e in events if not isinstance(e, TextDelta)]
    assert [type(e) for e in steps] == [ToolCallStep, Observation, RefusedStep, Observation, Finished]
    assert steps[0].call.name == "get_weather" and steps[1].result.ok
    assert "symbol" in steps[2].call.reason and not steps[3].result.ok
    finished = steps[-1]
    assert finished.reason == "tool_calls"
    assert [(c.name, c.arguments) for c in finished.handed_over] == [("track", {"symbol": "10111"}),
                                                                     ("track", {"symbol": "20222"})]
