"""Both tool-call parsers (ChatGLM3's `tool_call(...)` and the template models' `<tool_call>{json}`)
against hostile model output: huge numbers, lone surrogates, non-finite floats, deep nesting, and
inputs built to make a backtracking scanner quadratic.  A parser either returns plain data that
encodes as strict UTF-8 JSON or refuses with ToolCallError (a RefusedCall from the protocols'
parsers), in time linear in the input."""

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from glmkit.chat.formats import ReplyEvent
from glmkit.chat.protocols import (INTERPRETER, MAX_CALLS_PER_REPLY, MAX_SCAN_CHARS, GLM3Protocol, TaggedCallParser,
                                   TaggedProtocol)
from glmkit.chat.tool_calls import (MAX_DEPTH, MAX_INT, CodeCall, RefusedCall, ToolCall, ToolCallError, check_literal,
                                   extract_code, parse_tool_call)

TOOLS = {"t", INTERPRETER}


def strict_json(v):
    json.dumps(v, allow_nan=False, ensure_ascii=False).encode("utf-8")   # raises if not plain data


def budget(text: str) -> float:
    """Seconds a parse may take: linear in the input, generous for a loaded 2-core machine."""
    return 0.05 + 0.05 * len(text) / 1000


def timed(fn, text):
    """fn(text)'s outcome and time; a slow run is measured again (the faster counts) so one
    scheduling hiccup is not a failure, while a quadratic scan is slow both times."""
    best = None
    for _ in range(2):
        t0 = time.perf_counter()
        try:
            out = ("ok", fn(text))
        except ToolCallError as e:
            out = ("refused", str(e))
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
        if best < budget(text):
            break
    assert best < budget(text), f"{best:.2f}s for {len(text)} chars"
    return out


def check_call(call):
    """A call is either refused with a readable reason or carries plain data."""
    strict_json([call.id, call.name])
    if isinstance(call, RefusedCall):     # (`written` is the model's text, shown like any other)
        strict_json(call.reason)
    elif isinstance(call, CodeCall):
        strict_json(call.code)
    else:
        assert isinstance(call, ToolCall)
        strict_json(call.arguments)


def check_calls(calls):
    for call in calls:
        check_call(call)


# -- the reproductions from the issue (D8, D12) ----------------------------------------------

def test_tagged_huge_decimal_integer_is_refused():
    call = TaggedProtocol.parse('{"name":"t","arguments":{"a":' + "1" * 4301 + "}}", {"t"})
    assert isinstance(call, RefusedCall) and "integer" in call.reason


def test_glm3_huge_hex_integer_is_refused():
    with pytest.raises(ToolCallError, match="integer"):
        parse_tool_call("tool_call(a=0x" + "f" * 3600 + ")")


@pytest.mark.parametrize("text", ['tool_call(city="\\ud800")', 'tool_call(city="\ud800")',
                                  "tool_call(city={'\\udc00': 1})", 'tool_call(c=[["\\ud83d\\ude00"]])'])
def test_glm3_lone_surrogates_are_refused(text):
    with pytest.raises(ToolCallError, match="surrogate"):
        parse_tool_call(text)


@pytest.mark.parametrize("body", ['{"name":"t","arguments":{"city":"\\ud800"}}',
                                  '{"name":"t","arguments":{"\\udfff":1}}',
                                  '{"name":"t","arguments":"{\\"a\\": [\\"\\\\ud800\\"]}"}',
                                  '{"name":"\\ud800","arguments":{}}'])
def test_tagged_lone_surrogates_are_refused(body):
    call = TaggedProtocol.parse(body, {"t"})
    assert isinstance(call, RefusedCall) and "surrogate" in call.reason
    strict_json(call.name)


def test_tagged_surrogate_pair_escape_is_one_character():
    assert TaggedProtocol.parse('{"name":"t","arguments":{"s":"\\ud83d\\ude00"}}', {"t"}).arguments == {"s": "😀"}


@pytest.mark.parametrize("lit", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_tagged_non_finite_numbers_are_refused(lit):
    call = TaggedProtocol.parse('{"name":"t","arguments":{"a":' + lit + "}}", {"t"})
    assert isinstance(call, RefusedCall) and "finite" in call.reason


@pytest.mark.parametrize("make", [
    lambda: "<tool_call>x" + " " * 25000 + "y",                   # the 5.9 s case
    lambda: "<tool_call>" * 20000,
    lambda: "```python\n" + " " * 25000 + "x",
    lambda: "```python" + " " * 25000 + "x\n",
    lambda: "```python\n" * 10000,
    lambda: "`" * 60000,
    lambda: "```" + " \t" * 20000,
])
def test_tagged_find_calls_is_linear(make):
    text = make()
    check_calls(timed(lambda t: TaggedProtocol().find_calls([{"content": t}], TOOLS), text)[1])


@pytest.mark.parametrize("make", [
    lambda: '<tool_call>{"name": "t"}</tool_call>' * 4000,        # far more calls than a reply may make
    lambda: "```python\nx\n```\n" * 8000,
    lambda: ("<tool_call></tool_call>```python\n" + " " * 3000) * 30,   # each kind found past the other's blocks
    lambda: "```python\n<tool_call>" * 8000,
])
def test_tagged_find_calls_is_linear_with_many_calls(make):
    text = make()
    calls = timed(lambda t: TaggedProtocol().find_calls([{"content": t}], TOOLS), text)[1]
    check_calls(calls)
    assert len(calls) <= MAX_CALLS_PER_REPLY + 1


@pytest.mark.parametrize("make", [
    lambda: "```" + " " * 19000 + "x",
    lambda: "```python\n" + " " * 19000 + "x",
    lambda: "```\n" * 4900,
    lambda: "```" * 6600,
    lambda: "```x" + " " * 19000 + "\n```",
])
def test_glm3_fence_scan_is_linear(make):
    timed(extract_code, make())
    check_calls(timed(lambda t: GLM3Protocol().find_calls([{"metadata": "t", "content": t}], TOOLS), make())[1])


def test_streamed_call_without_closer_is_refused_at_the_cap():
    """The streaming filter searches only new text for the closer, and a call that can no longer
    close within MAX_CALL_CHARS is refused while streaming, not held to the end of the reply."""
    p = TaggedCallParser(None, {"t": None})
    chunks = ["<tool_call>"] + ["  \n "] * 20_000
    t0 = time.perf_counter()
    out = [e for c in chunks for e in p.filter([ReplyEvent("text", c)])]
    assert time.perf_counter() - t0 < budget("".join(chunks))
    [refused] = [item for item in out if not isinstance(item, str)]
    assert isinstance(refused, RefusedCall) and "longer than" in refused.reason
    assert refused.written == "<tool_call>"        # what the model wrote (blanks stripped), without a closer


def test_one_rule_for_both_parsers():
    """The same values are accepted or refused, with the same reason, whichever protocol carries them."""
    for lit, ok in [(str(MAX_INT), True), (str(-MAX_INT), True), (str(MAX_INT + 1), False), (str(-MAX_INT - 1), False),
                    ("1e308", True), ("1e999", False), ('"\\ud800"', False), ('"\\u00e9"', True),
                    ("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1), True), ("[" * MAX_DEPTH + "]" * MAX_DEPTH, False)]:
        call = TaggedProtocol.parse('{"name": "t", "arguments": {"a": %s}}' % lit, {"t"})
        try:
            glm3, why = parse_tool_call(f"tool_call(a={lit})"), None
        except ToolCallError as e:
            glm3, why = None, str(e)
        assert isinstance(call, ToolCall) == (why is None) == ok, lit
        assert getattr(call, "reason", None) == why and (glm3 is None or glm3 == call.arguments), lit
    assert check_literal((1, [2.5, {"k": None}])) == [1, [2.5, {"k": None}]]
    for bad in [{1: 2}, {"a": {1, 2}}, b"x", 1j, ..., float("nan"), 2**53, "\udc00", {"\ud800": 1}]:
        with pytest.raises(ToolCallError):
            check_literal(bad)


def test_a_call_past_the_scan_cap_is_refused():
    [call] = TaggedProtocol().find_calls([{"content": "x" * MAX_SCAN_CHARS + '<tool_call>{"name": "t"}'}], TOOLS)
    assert isinstance(call, RefusedCall) and "first" in call.reason
    tail = "```python\nprint(1)\n```"
    [call] = TaggedProtocol().find_calls([{"content": "x" * MAX_SCAN_CHARS + tail}], TOOLS)
    assert isinstance(call, RefusedCall) and "first" in call.reason
    assert TaggedProtocol().find_calls([{"content": "x" * MAX_SCAN_CHARS + tail}], {"t"}) == []
    [call] = TaggedProtocol().find_calls([{"content": "x" * (MAX_SCAN_CHARS - 20) + tail}], TOOLS)
    assert call.code == "print(1)"
    # calls before the cap are kept; the one past it is refused after them
    both = '<tool_call>{"name": "t", "arguments": {}}</tool_call>' + "x" * MAX_SCAN_CHARS + tail
    first, late = TaggedProtocol().find_calls([{"content": both}], TOOLS)
    assert first.name == "t" and first.arguments == {} and "first" in late.reason


# -- generated hostile inputs, both parsers ---------------------------------------------------

SIZES = st.one_of(st.integers(0, 100), st.sampled_from([1000, 4301, 10_000, 30_000]))   # big ones often
BIG_NUMBERS = st.tuples(st.sampled_from([          # huge integers in every literal form, and floats past 1e308
    "1{}", "-9{}", "0x{}", "-0x{}", "0o7{}", "0b1{}", "1_0{}", "{}.5", "1e{}", "-1e{}", "1E{}", "0.{}1e-400",
]), SIZES).map(lambda fn: fn[0].format(("1" if fn[0][:2] in ("0o", "0b") else "9") * fn[1]))
ODD_VALUES = st.sampled_from([
    "NaN", "Infinity", "-Infinity", "nan", "inf", "1e999", "-1e999", "1e308", "-0.0", "0", "1j", "9**9**9",
    str(MAX_INT), str(-MAX_INT), str(MAX_INT + 1), str(-MAX_INT - 1), hex(MAX_INT + 1), "float('nan')",
    '"\\ud800"', '"\ud800"', "'\\udfff'", '"\\ud83d\\ude00"', "'\\ud83d\\ude00'", '"\\u0000"', '"😀"',
    '"x"', "'y'", "b'x'", '"unclosed', "true", "True", "null", "None", "[]", "{}", "()", "set()", "...",
])
LEAVES = st.one_of(ODD_VALUES, BIG_NUMBERS, st.integers(-2**70, 2**70).map(str), st.floats().map(repr),
                   st.text(max_size=10).map(json.dumps))
KEYS = st.one_of(st.sampled_from(['"k"', '"\\ud800"', "'\\udc00'", "1", "None"]), st.text(max_size=5).map(json.dumps))
LITERALS = st.recursive(LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
    st.lists(st.tuples(KEYS, inner), max_size=3).map(lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"),
    st.tuples(st.sampled_from(["[", "{\"a\": ", "("]), SIZES, inner).map(   # deep nesting
        lambda oni: oni[0] * oni[1] + oni[2] + {"[": "]", "(": ")"}.get(oni[0], "}") * oni[1])),
    max_leaves=5)
CALLS = st.tuples(st.sampled_from([                # a call in each form either parser meets, around a literal
    "tool_call(a={})", " ```python\ntool_call(a={})\n```", "```\ntool_call(b=1, a={})", "{}",
    '<tool_call>{{"name": "t", "arguments": {{"a": {}}}}}</tool_call>', '<tool_call>\n{{"name": "t", "arguments": {{"a": {}}}}}',
    '{{"name": "t", "arguments": {{"a": {}}}}}', '{{"name": "t", "arguments": "{{\\"a\\": {}}}"}}', '{{"name": {}}}',
    "```python\nprint({})\n```", "```py\n{}"]), LITERALS).map(lambda fl: fl[0].format(fl[1]))
RUNS = st.tuples(                                  # long runs between openers and closers: what backtracking chokes on
    st.sampled_from(["", "<tool_call>x", "<tool_call>", "```", "```python", "```python\n", "tool_call(a=", "`"]),
    st.sampled_from([" ", "\t", "\n", " \t", "<tool_call>", "</tool_call>", "```", "```\n", "```python\n", "`",
                     "[", "{", "(", "-", "\ud800", "9", "\\", "x"]),
    st.one_of(SIZES, st.just(60_000)),
    st.sampled_from(["", "y", "x\n", "```", "</tool_call>", ")", "]"])).map(lambda r: r[0] + r[1] * r[2] + r[3])
BLANKS = st.tuples(                                # the 5.9 s shape: an opener, blanks, then no closer
    st.sampled_from(["<tool_call>x", "<tool_call>", "```python\n", "```python", "```", "tool_call(a="]),
    st.sampled_from([" ", "\t", "\n", " \t", "\r\n"]), st.sampled_from([10_000, 30_000, 60_000]),
    st.sampled_from(["y", "x\n", "```", ")"])).map(lambda r: r[0] + r[1] * r[2] + r[3])
NOISE = st.one_of(st.just(""), st.text(max_size=30), st.sampled_from(["\ud800", "\n", "<tool_call>", "```"]), RUNS, BLANKS)
HOSTILE_TEXT = st.one_of(st.tuples(NOISE, CALLS, NOISE).map("".join),
                         st.lists(st.one_of(CALLS, RUNS, NOISE), min_size=1, max_size=4).map("".join))


def _streamed(text, size):
    p = TaggedCallParser(None, {"t": None})
    out = [e for i in range(0, len(text), size) for e in p.filter([ReplyEvent("text", text[i:i + size])])]
    return out + p.filter([], final=True)


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(HOSTILE_TEXT, st.integers(1, 400))
def test_hostile_text_is_refused_or_plain_data_in_linear_time(text, chunk):
    kind, args = timed(parse_tool_call, text)
    if kind == "ok":
        strict_json(args)
    for name in ("t", INTERPRETER):
        check_calls(timed(lambda t: GLM3Protocol().find_calls([{"metadata": name, "content": t}], TOOLS), text)[1])
    check_calls(timed(lambda t: TaggedProtocol().find_calls([{"content": t}], TOOLS), text)[1])
    check_call(timed(lambda t: TaggedProtocol.parse(t, {"t"}), text)[1])
    items = timed(lambda t: _streamed(t, chunk), text)[1]
    # what the stream takes out of the text is a call: plain data, or refused with what was written
    for item in items:
        if not isinstance(item, str):
            check_call(item)
            assert item.name == "t" if isinstance(item, ToolCall) else item.written.startswith("<tool_call>")
    # and the calls it finds are those that reading the whole reply finds, with the same data,
    # unless a cap applied (the stream cuts an over-long block where a chunk ends, not at its closer)
    whole = TaggedProtocol().find_calls([{"content": text}], {"t"})
    capped = any("longer than" in c.reason for c in items + whole if isinstance(c, RefusedCall))
    if not capped and len(text) < MAX_SCAN_CHARS and len(whole) <= MAX_CALLS_PER_REPLY:
        assert [(c.name, c.arguments) for c in items if isinstance(c, ToolCall)] == \
            [(c.name, c.arguments) for c in whole if isinstance(c, ToolCall)]
