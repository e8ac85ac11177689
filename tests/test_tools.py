"""Tool definitions, the safe parser against a hostile corpus, built-in tools and the agent loop."""

import json
import time
from pathlib import Path
from typing import Annotated, Literal

import pytest

import glmkit
from glmkit.chat.agent import Agent
from glmkit.chat.builtin_tools import BUILTIN, calculator, convert_units
from glmkit.chat.tool_calls import ToolCallError, format_tool_call, parse_tool_call
from glmkit.chat.tool_definitions import Tool, as_tool, tool
from glmkit.chat.tools import load_tool_file, run_tool


# -- parser -----------------------------------------------------------------------------------

def test_official_forms():
    assert parse_tool_call(' ```python\ntool_call(symbol="10111")\n```') == {"symbol": "10111"}
    assert parse_tool_call("```python\ntool_call(symbol=\"10111\", unit='CNY')\n```") == {"symbol": "10111", "unit": "CNY"}
    assert parse_tool_call("tool_call(a=1, b=-2.5, c=True, d=None, e=[1, (2, 3)], f={'k': 'v'})") == \
        {"a": 1, "b": -2.5, "c": True, "d": None, "e": [1, [2, 3]], "f": {"k": "v"}}
    assert parse_tool_call("```\ntool_call()\n```") == {}
    args = {"city": "北京", "n": 3, "tags": ["a", "b"], "opt": None}
    assert parse_tool_call(format_tool_call(args)) == args


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


def test_run_tool_validates_times_out_and_catches():
    ok = run_tool(as_tool(get_weather), {"city": "Paris"})
    assert ok.ok and json.loads(ok.observation)["city"] == "Paris"
    bad = run_tool(as_tool(get_weather), {"city": 3})
    assert not bad.ok and "city" in bad.error

    @tool(timeout=0.5)
    def slow() -> str:
        time.sleep(3)
        return "late"

    @tool
    def broken() -> str:
        raise RuntimeError("database is down")

    t0 = time.monotonic()
    late = run_tool(as_tool(slow), {})
    assert not late.ok and "within" in late.error and time.monotonic() - t0 < 2
    boom = run_tool(as_tool(broken), {})
    assert not boom.ok and "database is down" in boom.observation


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
    agent = Agent(tiny, tools=[get_weather], max_steps=3)
    script = [_script(tiny, 'get_weather\n ```python\ntool_call(city="Paris")\n```'),
              _script(tiny, "\n巴黎现在21度。")]
    events = list(agent.run("巴黎天气怎么样？", script=script, temperature=0, max_new_tokens=60))
    kinds = [k for i, k in enumerate(e.kind for e in events) if i == 0 or events[i - 1].kind != k]
    assert kinds == ["tool_call", "tool_result", "text", "done"]
    assert events[0].arguments == {"city": "Paris"} and events[1].result.ok
    assert "".join(e.text for e in events if e.kind == "text") == "巴黎现在21度。"
    roles = [(m["role"], m.get("metadata", "")) for m in agent.messages]
    assert roles == [("system", ""), ("user", ""), ("assistant", "get_weather"), ("observation", ""), ("assistant", "")]
    assert json.loads(agent.messages[3]["content"])["city"] == "Paris"


def test_agent_max_steps_and_failing_tools(tiny32k):
    tiny = tiny32k
    @tool
    def flaky(x: int) -> int:
        """Always fails."""
        raise ValueError("nope")

    agent = Agent(tiny, tools=[flaky], max_steps=2)
    call = _script(tiny, "flaky\n ```python\ntool_call(x=1)\n```")
    events = list(agent.run("go", script=[call, call, call], temperature=0, max_new_tokens=40))
    results = [e for e in events if e.kind == "tool_result"]
    assert len(results) == 2 and all(not r.result.ok for r in results)
    assert "nope" in results[0].result.observation
    assert any(e.kind == "error" and "max_steps" in e.text for e in events)
    # a refused call (code, not literals) is an error observation, not an exception
    agent2 = Agent(tiny, tools=[flaky], max_steps=1)
    evil = _script(tiny, "flaky\n ```python\ntool_call(x=__import__('os').getpid())\n```")
    ev2 = list(agent2.run("go", script=[evil], temperature=0, max_new_tokens=60))
    assert any(e.kind == "error" and "literal" in e.text for e in ev2)
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
    assert proc.stdout.strip() and "has no ChatGLM3 tool protocol; it is asked for <tool_call> JSON instead" in proc.stderr


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
    agent = Agent(tiny32k, tools=[schema_only], max_steps=2, observer=person)
    script = [_script(tiny32k, 'track\n ```python\ntool_call(symbol="10111")\n```'), _script(tiny32k, "\n12412元。")]
    events = list(agent.run("查股票", script=script, temperature=0, max_new_tokens=60))
    assert seen == [("track", {"symbol": "10111"})]
    assert agent.messages[3] == {"role": "observation", "content": '{"price": 12412}'}
    assert "".join(e.text for e in events if e.kind == "text") == "12412元。"
