"""Console conversations (the server's store) as ChatGLM3 fine-tuning records (data.py's format),
split into train and dev.

The store keeps ChatGLM3's history as the console's turns wrote it (server/console_turns.py): user
and assistant messages; a call as an assistant segment whose metadata names the tool (or
`interpreter` for code) followed by an `observation`; code the person ran marked `by: user`; a
reply cut short marked `stopped`.  What the model saw but the store does not keep is put back: the
conversation's system prompt (chat mode), the code interpreter's system prompt (code mode), the
tools listing (tool mode, from --tools as the server was given them).

- a tool call that parses, with its observation -> one `tool` turn (name, parameters, observation);
- code, and a call that does not parse -> an assistant turn with its metadata and the observation;
- the person's own code, a refused call's text and a stopped reply are kept as turns but not
  learned (`"loss": false`).
A conversation is left out (and counted, with the reason) when it has nothing to learn, when its
steps are not in ChatGLM3's form (answered by another model family), or when it made tool calls
and the tools it was offered are unknown (no --tools).  Nothing here reads the store's files: the
caller passes a store (`list(owner)`, `get(owner, id)`), so the owner scoping is the store's.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from ..chat.protocols import GLM3_INTERPRETER_SYSTEM
from ..chat.tool_calls import INTERPRETER, ToolCallError, parse_tool_call
from ..errors import GlmkitError
from .data import _Bad, check_record

TRAIN, DEV = "train.jsonl", "dev.jsonl"


def conversation_record(conv: dict, tools: list[dict] | None = None) -> tuple[dict | None, str]:
    """(record, "") for a stored conversation (Store.get's dict), or (None, why it is left out).
    `tools`: the flat tool specs its tool mode offered, if known."""
    stored = conv.get("messages") or []
    turns: list[dict] = []
    mode = conv.get("mode")
    system = (conv.get("settings") or {}).get("system") if mode == "chat" else None
    if isinstance(system, str) and system.strip():
        turns.append({"role": "system", "content": system})
    elif mode == "code":
        turns.append({"role": "system", "content": GLM3_INTERPRETER_SYSTEM})
    record: dict = {}
    calls = 0
    i = 0
    while i < len(stored):
        m = stored[i]
        role, content, metadata = m["role"], m["content"], (m.get("metadata") or "").strip()
        extras = m.get("extras") or {}
        after = stored[i + 1] if i + 1 < len(stored) else None
        if role == "user":
            turns.append({"role": "user", "content": content})
        elif role == "assistant" and not metadata:
            turns.append({"role": "assistant", "content": content, **_not_learned(extras.get("stopped"))})
        elif role == "assistant":
            calls += 1
            observed = after is not None and after["role"] == "observation"
            arguments = None
            if metadata != INTERPRETER and observed:
                try:
                    arguments = parse_tool_call(content)
                except ToolCallError:
                    arguments = None              # a refused call: kept, not learned
            if arguments is not None:
                turns.append({"role": "tool", "name": metadata, "parameters": arguments,
                              "observation": after["content"], **_not_learned(extras.get("stopped"))})
                i += 2
                continue
            refused = metadata != INTERPRETER and observed
            turns.append({"role": "assistant", "metadata": metadata, "content": content,
                          **_not_learned(refused or extras.get("by") == "user" or extras.get("stopped"))})
        elif role == "observation":
            if not (turns and turns[-1]["role"] == "assistant" and turns[-1].get("metadata")):
                return None, "tool steps not in ChatGLM3's form (another model family answered)"
            turns.append({"role": "observation", "content": content})
        else:
            return None, f"a stored message with role {role!r}"
        i += 1
    if mode == "tool" and calls:
        if tools is None:
            return None, "tool calls, but the tools offered are unknown (pass --tools as serve was given it)"
        record["tools"] = tools
    if not any(t["role"] in ("assistant", "tool") and t.get("loss", True) for t in turns):
        return None, "nothing to learn (no assistant reply)"
    record["conversations"] = turns
    try:
        check_record(record)              # what is written is what the loader accepts
    except _Bad as e:
        return None, str(e)               # a hand-edited store, say
    return record, ""


def _not_learned(flag) -> dict:
    return {"loss": False} if flag else {}


def split(ids: list[str], dev_fraction: float, seed: int) -> set[str]:
    """The ids that go to dev: ordered by a hash of (seed, id), the first round(n * fraction) --
    at least one when there are two or more and the fraction is above 0, never all of them.  The
    same store, seed and fraction give the same split on every run and machine."""
    if not 0 <= dev_fraction < 1:
        raise GlmkitError("--dev-fraction must be at least 0 and below 1")
    n = len(ids)
    k = round(n * dev_fraction)
    if dev_fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    ranked = sorted(ids, key=lambda cid: hashlib.sha256(f"{seed}:{cid}".encode()).hexdigest())
    return set(ranked[:k])


def export(store, owner: str, out_dir: str | Path, tools: list[dict] | None = None, dev_fraction: float = 0.1,
           seed: int = 0) -> dict:
    """Write `owner`'s conversations to out_dir/train.jsonl and out_dir/dev.jsonl (oldest first in
    each); returns the counts: {"train", "dev", "skipped": {reason: n}}."""
    records: dict[str, dict] = {}
    skipped: Counter = Counter()
    for summary in sorted(store.list(owner), key=lambda c: (c["created"], c["id"])):
        try:
            conv = store.get(owner, summary["id"])
        except KeyError:                  # deleted meanwhile
            continue
        record, reason = conversation_record(conv, tools)
        if record is None:
            skipped[reason] += 1
        else:
            records[conv["id"]] = record
    dev = split(list(records), dev_fraction, seed)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write(out / TRAIN, [r for cid, r in records.items() if cid not in dev])
        _write(out / DEV, [r for cid, r in records.items() if cid in dev])
    except OSError as e:
        raise GlmkitError(f"{out}: cannot write the data there ({e.strerror})") from None
    return {"train": len(records) - len(dev), "dev": len(dev), "skipped": dict(skipped)}


def _write(path: Path, records: list[dict]) -> None:
    """One record per line, replaced whole (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
