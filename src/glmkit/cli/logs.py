"""`glmkit logs`: the terminal chat's log (cli/chat_log.py): the latest exchanges, a search, one
conversation, as text or JSON."""

from __future__ import annotations

import json
import sys

from .chat_log import ChatLog, log_path
from .options import default_data_dir
from .options import positive


def add_parser(sub) -> None:
    lg = sub.add_parser("logs", help="show or search the chats logged by `glmkit chat`",
                        description="Show the latest exchanges of `glmkit chat` (logged unless --no-log), search "
                                    "them, or show one conversation.")
    lg.set_defaults(run=cmd_logs)
    lg.add_argument("-n", "--count", type=positive, default=3, metavar="N", help="how many exchanges (default 3)")
    lg.add_argument("-q", "--query", metavar="TEXT", help="only exchanges whose prompt or reply has all these words")
    lg.add_argument("--cid", metavar="ID", help="the whole conversation with this id (or the start of it)")
    lg.add_argument("--json", action="store_true", help="print a JSON array of the exchanges")
    lg.add_argument("--data-dir", metavar="DIR", default=None,
                    help="where the log is (default: $GLMKIT_DATA_DIR, else ~/.local/share/glmkit)")
    lg.add_argument("--path", action="store_true", help="print the log file's path and exit")


def cmd_logs(args) -> int:
    path = log_path(args.data_dir or default_data_dir())
    if args.path:
        print(path)
        return 0
    try:
        log = ChatLog(path, create=False)     # looking must not create a log
    except FileNotFoundError:
        return _empty(args, f"no chats logged yet ({path} does not exist); `glmkit chat` logs each exchange")
    try:
        if args.cid:
            rows = log.conversation(log.find_conversation(args.cid))
        elif args.query is not None:
            rows = log.search(args.query, args.count)
        else:
            rows = log.recent(args.count)
    finally:
        log.close()
    if not rows:
        return _empty(args, f"no logged exchange matches {args.query!r}" if args.query is not None
                      else f"no chats logged yet in {path}")
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    for r in rows:
        print(render(r))
    return 0


def _empty(args, message: str) -> int:
    """Nothing to show: `[]` for a program reading --json, a sentence (on stderr) for a person."""
    if args.json:
        print("[]")
    print(message, file=sys.stderr)
    return 0


def render(r: dict) -> str:
    """One exchange as Markdown-ish text, as `llm logs` shows them."""
    tokens = ""
    if r["input_tokens"] is not None:
        tokens = f" · {r['input_tokens']} → {r['output_tokens']} tokens"
    head = (f"## {r['datetime_utc']} · {r['model']} · conversation {r['conversation_id']}{tokens}"
            f" · {r['duration_ms'] / 1000:.1f} s")
    parts = [head, ""]
    if r["system"]:
        parts += ["System:", r["system"], ""]
    parts += ["Prompt:", r["prompt"], "", "Reply:", r["reply"]]
    if r["finish_reason"] == "length":
        parts.append("[the reply reached the token limit]")
    parts.append("")
    return "\n".join(parts)
