"""The session's /commands, for the plain chat and the tools chat alike.

A typed line that starts with "/" is a command and never goes to the model: an unknown one gets
one line saying so.  What a command changes lives in the session (its conversation and system
prompt) and in Settings (the sampling that every later answer uses).  A command's mistake (a bad
value, a file that cannot be read) is one line on stderr; the session goes on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import GlmkitError

# /set NAME VALUE: what each name becomes; --max-new-tokens is the reply's limit, the rest sampling
SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "repetition_penalty": float, "seed": int,
            "max_new_tokens": int}
SAMPLING = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")
ROLES = ("system", "user", "assistant")       # what /load accepts: the text of a conversation, no tool steps


class Settings:
    """The sampling of the session: the options it started with, changed by /set.  Each change
    makes a new SamplingParams through model.params(), which checks it, so a bad value is refused
    with the engine's own message and the previous settings stay."""

    def __init__(self, model, args, params):
        self.model, self.args, self.params = model, args, params
        self.overrides = {k: getattr(args, k) for k in SAMPLING}

    def set(self, name: str, text: str) -> str:
        name = name.replace("-", "_").lower()
        if name not in SETTINGS:
            raise GlmkitError(f"cannot set {name!r}; one of: {', '.join(SETTINGS)}")
        try:
            value = SETTINGS[name](text)
        except ValueError:
            kind = "a whole number" if SETTINGS[name] is int else "a number"
            raise GlmkitError(f"{name} must be {kind}, got {text!r}") from None
        if name == "max_new_tokens":
            if value < 1:
                raise GlmkitError(f"max_new_tokens must be at least 1, got {value}")
            self.args.max_new_tokens = value       # read by every later answer, as the option is
        else:
            params = self.model.params(**{**self.overrides, name: value})     # GlmkitError for a bad value
            self.overrides[name], self.params = value, params
        return f"{name} = {value}"

    def show(self) -> dict:
        p = self.params
        return {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
                "repetition_penalty": p.repetition_penalty, "seed": p.seed,
                "max_new_tokens": self.args.max_new_tokens}


HELP = """Commands:
  /help                 this list
  /system TEXT          set the system prompt (/system alone shows it)
  /set NAME VALUE       temperature, top_p, top_k, repetition_penalty, seed or max_new_tokens
  /show                 the model, its context, the settings and the system prompt
  /tools                the tools the model may call
  /save FILE            write the conversation to FILE (JSON)
  /load FILE            continue the conversation saved in FILE
  /clear                start a new conversation (also: clear)
  /bye                  quit (also: stop, exit, Ctrl-D)
A message that starts with "/" can be sent as a \"\"\" block."""


class Commands:
    """Carries out a session's /commands.  `session` has: clear(), system, set_system(text),
    conversation() (its user/assistant messages), load(messages, system), tool_names(), and
    the log's `conversation_id`.  `extra`: more commands ({"/run": (help line, function(arg))})."""

    def __init__(self, session, model, settings: Settings, extra: dict | None = None):
        self.session, self.model, self.settings = session, model, settings
        self.extra = extra or {}

    def handle(self, line: str) -> bool:
        """Carry out `line`; False when the session should end (/bye)."""
        name, _, arg = line.strip().partition(" ")
        name, arg = name.lower(), arg.strip()
        try:
            if name in ("/bye", "/exit", "/quit"):
                return False
            handler = {"/help": self.help, "/?": self.help, "/system": self.system, "/set": self.set,
                       "/show": self.show, "/tools": self.tools, "/save": self.save, "/load": self.load,
                       "/clear": self.clear}.get(name)
            if handler is not None:
                handler(arg)
            elif name in self.extra:
                self.extra[name][1](arg)
            else:
                print(f"unknown command {name}, /help lists them", file=sys.stderr)
        except GlmkitError as e:
            print(f"[error: {e}]", file=sys.stderr)
        print()
        return True

    def help(self, arg: str) -> None:
        print(HELP)
        for name, (text, _) in self.extra.items():
            print(f"  {name:<21} {text}")

    def system(self, arg: str) -> None:
        if not arg:
            print(f"system prompt: {self.session.system}" if self.session.system else "no system prompt")
            return
        self.session.set_system(arg)
        print("[system prompt set]")

    def set(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        if not name or not value.strip():
            raise GlmkitError(f"usage: /set NAME VALUE, NAME one of {', '.join(SETTINGS)}")
        print(f"[{self.settings.set(name, value.strip())}]")

    def show(self, arg: str) -> None:
        m = self.model
        print(f"model: {m.name}")
        print(f"context: {m.context_length} tokens"
              + (f" (--max-length {self.settings.args.max_length})" if self.settings.args.max_length else ""))
        print("settings: " + ", ".join(f"{k} {v}" for k, v in self.settings.show().items()))
        print(f"system prompt: {self.session.system}" if self.session.system else "system prompt: none")
        print(f"tools: {', '.join(self.session.tool_names()) or 'none'}")
        if self.session.conversation_id:
            print(f"conversation: {self.session.conversation_id}")

    def tools(self, arg: str) -> None:
        names = self.session.tool_names()
        print("tools: " + (", ".join(names) if names else "none"))

    def clear(self, arg: str) -> None:
        self.session.clear()
        print("[conversation cleared]")

    def save(self, arg: str) -> None:
        if not arg:
            raise GlmkitError("usage: /save FILE")
        data = {"model": self.model.name, "system": self.session.system, "messages": self.session.conversation()}
        try:
            Path(arg).expanduser().write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise GlmkitError(f"{arg}: cannot write ({e.strerror})") from None
        print(f"[saved {len(data['messages'])} messages to {arg}]")

    def load(self, arg: str) -> None:
        if not arg:
            raise GlmkitError("usage: /load FILE")
        messages, system = read_conversation(arg)
        self.session.load(messages, system)
        print(f"[loaded {len(messages)} messages from {arg}]")


def read_conversation(path: str) -> tuple[list[dict], str | None]:
    """(messages, system prompt) from a file /save wrote, or a JSON array of messages.  Only role
    and content are kept, as text: a file cannot slip tool calls or template fields into the
    prompt, and its text is encoded as text like anything typed."""
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as e:
        raise GlmkitError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, RecursionError) as e:
        raise GlmkitError(f"{path}: not JSON ({e})") from None
    system = None
    if isinstance(data, dict):
        system, data = data.get("system"), data.get("messages")
        if system is not None and not isinstance(system, str):
            raise GlmkitError(f"{path}: \"system\" must be text")
    if not isinstance(data, list):
        raise GlmkitError(f"{path}: expected a list of messages (or /save's object with \"messages\")")
    messages = []
    for i, m in enumerate(data):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise GlmkitError(f"{path}: message {i + 1} must be {{\"role\": one of {', '.join(ROLES)}, "
                              "\"content\": text}")
        if m["role"] == "system":
            system = m["content"]
        else:
            messages.append({"role": m["role"], "content": m["content"]})
    return messages, system
