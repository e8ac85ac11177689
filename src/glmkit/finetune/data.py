"""ChatGLM3's fine-tuning data: the official format read and checked, and a conversation as token
ids with the labels a causal-LM loss reads.

The format (ChatGLM3's finetune_demo): JSON Lines, one record per line,

    {"tools"?: [...], "conversations": [{"role": "system"|"user"|"assistant"|"tool"|"observation", ...}]}

- system / user / observation: `content` (a string).  A system message may carry `tools` (the
  ChatGLM3 history form); a record's top-level `tools` (the demo's form) become a first system
  message, `Answer the following questions ...` + the tools as JSON, as the model was trained.
- assistant: `content`, and `metadata` for a call written in ChatGLM3's own history form (a tool
  name, or `interpreter` for code) followed by `observation` turns.
- tool: a call and its result in one turn, `name`, `parameters` (an object) and `observation`
  (any JSON value; text as is, anything else as JSON).  It becomes an assistant segment named
  after the tool, holding a fenced `tool_call(...)` (written as chat.glm3 writes a call back into
  a prompt), and an observation turn.
- `loss` (optional, on assistant and tool turns): false leaves that turn out of the loss (e.g. code
  the person ran rather than the model).  Only assistant turns are ever learned.

A bad record is reported as `FILE:LINE: what is wrong`.
"""

from __future__ import annotations

import json
import keyword
from pathlib import Path

from ..chat.glm3 import TOOLS_PREAMBLE, tool_call_message
from ..chat.messages import validate_messages
from ..chat.tool_calls import ToolCall
from ..errors import GlmkitError

ROLES = ("system", "user", "assistant", "tool", "observation")
IGNORE = -100            # the label a causal-LM loss skips (PyTorch's cross_entropy ignore_index)
MAX_ERRORS = 20          # read_conversations(all_errors=True) lists at most this many

# keys that belong to one role only: on another, most likely a mistake worth a line number
_ROLE_KEYS = {"tools": ("system",), "metadata": ("assistant",), "name": ("tool",), "parameters": ("tool",),
              "observation": ("tool",)}


class _Bad(ValueError):
    """What is wrong with one record (the caller adds FILE:LINE)."""


# -- reading -------------------------------------------------------------------------------------
def read_conversations(path: str | Path, all_errors: bool = False) -> list[dict]:
    """The checked records of a JSON Lines file (blank lines skipped).  The first bad line raises a
    GlmkitError `FILE:LINE: what is wrong`; with `all_errors`, every bad line is read first and
    the error lists them (up to MAX_ERRORS), one per line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GlmkitError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise GlmkitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise GlmkitError(f"{path}: cannot read it ({e.strerror})") from None
    if text.lstrip().startswith("["):
        raise GlmkitError(f"{path}:1: expected JSON Lines (one {{\"conversations\": [...]}} object per line), "
                          f"not one JSON array")
    records, errors = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            try:
                obj = json.loads(line)
            except ValueError as e:        # JSONDecodeError; a number too long to convert
                raise _Bad(f"not valid JSON ({getattr(e, 'msg', e)})") from None
            except RecursionError:
                raise _Bad("not valid JSON (nested too deeply)") from None
            records.append(check_record(obj))
        except _Bad as e:
            errors.append(f"{path}:{lineno}: {e}")
            if not all_errors:
                raise GlmkitError(errors[0]) from None
    if errors:
        more = f"\n... and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise GlmkitError(f"{len(errors)} bad line{'s' if len(errors) > 1 else ''}:\n"
                          + "\n".join(errors[:MAX_ERRORS]) + more)
    if not records:
        raise GlmkitError(f"{path}: no conversations in it")
    return records


def check_record(obj) -> dict:
    """One record, checked and normalised (only the keys used, `loss` made explicit on assistant
    and tool turns); _Bad (a ValueError) says what is wrong."""
    if not isinstance(obj, dict):
        raise _Bad(f"expected an object {{\"conversations\": [...]}}, got {_kind(obj)}")
    if "conversations" not in obj:
        raise _Bad("no \"conversations\" key")
    conv = obj["conversations"]
    if not isinstance(conv, list) or not conv:
        raise _Bad("\"conversations\" must be a non-empty list of messages")
    record: dict = {}
    if "tools" in obj:
        if not isinstance(obj["tools"], list):
            raise _Bad(f"\"tools\" must be a list, got {_kind(obj['tools'])}")
        record["tools"] = obj["tools"]
    messages = [_check_message(m, i) for i, m in enumerate(conv)]
    _check_order(messages, has_top_tools="tools" in record)
    record["conversations"] = messages
    return record


def _check_message(m, i: int) -> dict:
    where = f"conversations[{i}]"
    if not isinstance(m, dict):
        raise _Bad(f"{where}: expected an object, got {_kind(m)}")
    role = m.get("role")
    if role not in ROLES:
        raise _Bad(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    where = f"{where} ({role})"
    for key, roles in _ROLE_KEYS.items():
        if key in m and role not in roles:
            raise _Bad(f"{where}: {key!r} belongs on a {' or '.join(roles)} turn only")
    out: dict = {"role": role}
    if role == "tool":
        name = m.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _Bad(f"{where}: a tool call needs a \"name\" (the tool called)")
        if "\n" in name or name.strip() != name:
            raise _Bad(f"{where}: the tool name must be one line without surrounding spaces")
        params = m.get("parameters")
        if not isinstance(params, dict):
            raise _Bad(f"{where}: \"parameters\" must be an object of the call's arguments, got {_kind(params)}")
        bad = [k for k in params if not k.isidentifier() or keyword.iskeyword(k)]
        if bad:
            raise _Bad(f"{where}: parameter {bad[0]!r} cannot be written as tool_call({bad[0]}=...)")
        if "observation" not in m:
            raise _Bad(f"{where}: a tool call needs the \"observation\" it gave back")
        out.update(name=name, parameters=params, observation=m["observation"])
    else:
        content = m.get("content")
        if not isinstance(content, str):
            raise _Bad(f"{where}: \"content\" must be a string, got {_kind(content)}")
        out["content"] = content
    if "metadata" in m:
        md = m["metadata"]
        if not isinstance(md, str) or "\n" in md:
            raise _Bad(f"{where}: \"metadata\" must be a one-line string (a tool name, or interpreter)")
        if md.strip():
            out["metadata"] = md.strip()
    if "tools" in m:
        if not isinstance(m["tools"], list):
            raise _Bad(f"{where}: \"tools\" must be a list, got {_kind(m['tools'])}")
        out["tools"] = m["tools"]
    loss = m.get("loss", role in ("assistant", "tool"))
    if not isinstance(loss, bool):
        raise _Bad(f"{where}: \"loss\" must be true or false")
    if loss and role not in ("assistant", "tool"):
        raise _Bad(f"{where}: only assistant and tool turns are learned; \"loss\": true is not allowed here")
    if role in ("assistant", "tool"):
        out["loss"] = loss
    return out


def _check_order(messages: list[dict], has_top_tools: bool) -> None:
    for i, m in enumerate(messages):
        where = f"conversations[{i}] ({m['role']})"
        if m["role"] == "system" and i > 0:
            raise _Bad(f"{where}: a system message may only come first (and only once)")
        if m["role"] == "system" and has_top_tools and "tools" in m:
            raise _Bad(f"{where}: tools are given twice (on the record and on its system message)")
        if m["role"] == "observation":
            before = messages[i - 1] if i else None
            if not (before and before["role"] == "assistant" and "metadata" in before):
                raise _Bad(f"{where}: an observation must follow an assistant turn that calls a tool "
                           f"(one with \"metadata\"); write a call and its result as one \"tool\" turn")
    if not any(m.get("loss") for m in messages):
        raise _Bad("nothing to learn: no assistant or tool turn (or all have \"loss\": false)")


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


# -- tokenizing ----------------------------------------------------------------------------------
def to_messages(record: dict) -> list[dict]:
    """A checked record as ChatGLM3 history messages (chat.messages' shape) plus `loss` (bool):
    top-level tools as the first system message, each tool turn as its call and observation."""
    out: list[dict] = []
    if "tools" in record:
        out.append({"role": "system", "content": TOOLS_PREAMBLE, "tools": record["tools"], "loss": False})
    for m in record["conversations"]:
        if m["role"] == "tool":
            call = tool_call_message(ToolCall("", m["name"], m["parameters"]))
            obs = m["observation"]
            out.append({**call, "loss": m["loss"]})
            out.append({"role": "observation", "loss": False,
                        "content": obs if isinstance(obs, str) else json.dumps(obs, ensure_ascii=False)})
        else:
            out.append({"loss": False, **m})
    return out


def tokenize_conversation(record: dict, chat_format, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one record (checked here if it was not read by read_conversations),
    in ChatGLM3's format exactly as glmkit prompts the model (chat.glm3: [gMASK] sop, then per
    message its role id, metadata line and content), then eos; both cut to `max_length`.

    Labels follow the Hugging Face convention (labels[i] is the target at position i; the model
    shifts them by one itself) and are IGNORE everywhere except where the model writes:

    a token is learned when the token before it belongs to an assistant turn with loss.  So the
    model learns an assistant turn's metadata line (a tool's name, `interpreter`, or the empty line
    of plain text), its content, and the one token that ends the turn: `<|assistant|>` before a
    further segment of the same reply, `<|observation|>` after a call, `<|user|>`, or the final
    eos -- exactly the ids glmkit's engine stops on, so a tuned model still stops where it should.
    The `<|assistant|>` that opens a reply is not learned: at inference it is the prompt's cue.
    System, user and observation tokens are never learned (an observation is the tool's text).

    This is the official demo's rule (finetune_demo's process_batch, and its earlier
    preprocess_utils, shift the turn mask by one: `[False, *loss_masks]`), except that there any
    role other than system and user is learned by default; here only assistant turns are."""
    if not hasattr(chat_format, "encode_turn"):
        raise GlmkitError(f"chatglm3-finetune data is tokenized in ChatGLM3's chat format; this model's format "
                          f"is {getattr(chat_format, 'name', type(chat_format).__name__)!r}")
    if max_length is not None and max_length < 1:
        raise GlmkitError("max_length must be at least 1")
    try:
        record = check_record(record)
    except _Bad as e:
        raise GlmkitError(str(e)) from None
    messages = to_messages(record)
    ids = list(chat_format.prefix)
    learned = [False] * len(ids)        # per position: does this token belong to a learned turn?
    checked = validate_messages([{k: v for k, v in m.items() if k != "loss"} for m in messages])
    for m, clean in zip(messages, checked):
        part = chat_format.encode_turn(clean)
        ids += part
        learned += [m["loss"]] * len(part)
    ids.append(chat_format.tok.eos_id)
    labels = [IGNORE] + [ids[i] if learned[i - 1] else IGNORE for i in range(1, len(ids))]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels
