"""Tool calls as data: the types every parser produces, the one rule for what a call may hold,
and ChatGLM3's `tool_call(...)` parser.

A parser (here, and the protocols' in chat.protocols) turns what the model wrote into a ToolCall,
a CodeCall or a RefusedCall; nothing downstream (the agent, the API, the console) reads a call's
text again.  How a call is written back into a prompt is each chat format's business (chat.glm3,
chat.template).

ChatGLM3 writes a call as a fenced block holding `tool_call(name=value, ...)` under a segment
whose metadata line names the tool.  The official code hands that text to the `eval` builtin,
so anyone who can steer the model can run Python on the host.  Here it is parsed with `ast`: only keyword arguments
whose values are literals (strings, numbers, booleans, None, lists, tuples, dicts) are accepted;
anything else is refused with a reason the model can read in an observation.  Nothing is ever
evaluated.

`check_literal` is the one rule for what a parsed call may hold, shared with the template models'
JSON calls (chat.protocols): plain JSON data that any client can decode exactly and that encodes
as strict UTF-8 JSON.
"""

from __future__ import annotations

import ast
import math
import re
import secrets
from dataclasses import dataclass

MAX_CALL_CHARS = 20_000    # a call's text (so everything it can hold) is at most this long
MAX_DEPTH = 32             # containers nested in a call's arguments, the arguments object included
MAX_INT = 2**53 - 1        # |n| <= MAX_INT: integers a JSON client (JavaScript, float64) reads exactly

INT_ERROR = f"tool call integers must be between -{MAX_INT} and {MAX_INT} (|n| < 2**53)"
DEPTH_ERROR = f"tool call arguments are nested too deeply (more than {MAX_DEPTH} levels)"
_SURROGATE = re.compile("[\ud800-\udfff]")   # a str holding one cannot be encoded as UTF-8


INTERPRETER = "interpreter"   # the name code runs under, in ChatGLM3's protocol and in every event


class ToolCallError(ValueError):
    """A tool call that cannot be accepted; the message is safe to show to the model and user."""


def new_call_id() -> str:
    """An id in OpenAI's form, by which a result is matched to its call."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    """A call to a named tool, its arguments plain JSON data that passed check_literal."""
    id: str
    name: str
    arguments: dict


@dataclass(frozen=True)
class CodeCall:
    """Code the model wants the interpreter to run (checked by check_code)."""
    id: str
    code: str

    @property
    def name(self) -> str:
        return INTERPRETER


@dataclass(frozen=True)
class RefusedCall:
    """A call that is not accepted: never run; the reason goes to the model and the user."""
    id: str
    name: str             # the tool it named, or "?" when not even that could be read
    reason: str
    written: str = ""     # what the model wrote, where a client is shown it instead of a call


Call = ToolCall | CodeCall | RefusedCall


def check_literal(value, depth: int = 0):
    """A parsed call's value as plain JSON data (tuples become lists), or ToolCallError: None,
    bools, integers with |n| <= MAX_INT, finite floats, strings without surrogate code points,
    lists, and dicts with such string keys, at most MAX_DEPTH containers deep."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if -MAX_INT <= value <= MAX_INT:
            return value
        raise ToolCallError(INT_ERROR)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        raise ToolCallError("tool call numbers must be finite (no NaN or Infinity)")
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise ToolCallError("tool call text may not contain lone surrogates (U+D800 to U+DFFF)")
        return value
    if depth >= MAX_DEPTH:     # checked before descending, so this recursion is at most MAX_DEPTH deep
        raise ToolCallError(DEPTH_ERROR)
    if isinstance(value, (list, tuple)):
        return [check_literal(v, depth + 1) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ToolCallError("tool call dictionary keys must be strings")
        return {check_literal(k): check_literal(v, depth + 1) for k, v in value.items()}
    raise ToolCallError(f"tool call arguments may not contain {type(value).__name__} values")


def json_int(digits: str) -> int:
    """json.loads' parse_int: a digit string too long for any allowed integer is refused before
    int() sees it (past 4300 digits int() raises ValueError, and it is quadratic below that)."""
    if len(digits) > 20:
        raise ToolCallError(INT_ERROR)
    return int(digits)


def check_code(code: str) -> str:
    """Code for the interpreter, from either protocol: stripped, bounded, UTF-8 encodable."""
    code = code.strip()
    if len(code) > MAX_CALL_CHARS:
        raise ToolCallError(f"code is longer than {MAX_CALL_CHARS} characters")
    return check_literal(code)


_LANG = re.compile(r"[A-Za-z0-9_+-]*")


def find_fence(text: str, langs=None, limit: int | None = None, start: int = 0):
    """(where its ``` starts, the code inside) for the first fenced block opened at or after
    `start` and before `limit`, or None.

    A linear scan: backtracking regexes took quadratic time on long blank runs and many unclosed
    fences.  An opener is the last ``` on a line, followed by nothing but a language name (one of
    `langs` if given) and blanks; the block runs to the next ```, as the regex it replaces did."""
    limit = len(text) if limit is None else limit
    line = start
    while line < limit:
        nl = text.find("\n", line)
        if nl < 0:
            return None
        i = text.rfind("```", line, min(nl, limit + 2))
        if i >= 0:
            lang = text[i + 3:nl].strip(" \t")
            if _LANG.fullmatch(lang) and (langs is None or lang in langs):
                j = text.find("```", nl + 1)
                return None if j < 0 else (i, text[nl + 1:j])
        line = nl + 1
    return None


def extract_code(content: str) -> str:
    """The code inside the first fenced block (or the bare text if there is no fence)."""
    if len(content) > MAX_CALL_CHARS:
        raise ToolCallError(f"tool call is longer than {MAX_CALL_CHARS} characters")
    fence = find_fence(content)
    if fence:
        return check_code(fence[1])
    if "```" in content:
        raise ToolCallError("tool call has an unterminated code fence")
    return check_code(content)


def parse_tool_call(content: str) -> dict:
    """`tool_call(a=1, b="x")` (possibly fenced) -> {"a": 1, "b": "x"}; ToolCallError otherwise."""
    code = extract_code(content)       # bounded and free of surrogates before the parser sees it
    if not code:
        raise ToolCallError("tool call is empty")
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError as e:
        if "integer string conversion" in str(e.msg):        # a decimal literal past 4300 digits
            raise ToolCallError(INT_ERROR) from None
        if "too many nested" in str(e.msg):
            raise ToolCallError(DEPTH_ERROR) from None
        raise ToolCallError(f"tool call is not valid syntax ({e.msg})") from None
    except ValueError as e:
        raise ToolCallError(f"tool call is not valid syntax ({e})") from None
    except (RecursionError, MemoryError):
        raise ToolCallError(DEPTH_ERROR) from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.func.id != "tool_call":
        raise ToolCallError("expected exactly one call of the form tool_call(name=value, ...)")
    if call.args:
        raise ToolCallError("tool_call takes keyword arguments only")
    args = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise ToolCallError("tool_call does not accept **kwargs")
        if kw.arg in args:
            raise ToolCallError(f"argument {kw.arg!r} is given twice")
        try:
            # literals only: never runs code.  Its recursion is bounded: the tokenizer refuses
            # brackets nested past 200 levels, and no other literal nests.
            args[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            raise ToolCallError(f"argument {kw.arg!r} is not a literal value "
                                f"(only strings, numbers, booleans, None, lists and dicts)") from None
    return check_literal(args)


def validate_arguments(arguments: dict, schema: dict | None) -> None:
    """Check arguments against a tool's JSON Schema (ToolCallError naming the first problem)."""
    if not schema:
        return
    import jsonschema

    from .json_schema import SchemaRefused, validate   # bounded, and never fetches a remote $ref
    try:
        validate(arguments, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(map(str, e.absolute_path)) or "arguments"
        raise ToolCallError(f"invalid arguments at {where}: {e.message}") from None
    except SchemaRefused as e:
        raise ToolCallError(f"the tool's parameter schema is unusable: {e}") from None
