"""`glmkit export`: the web console's conversations as fine-tuning data (finetune/export.py):
one owner's conversations -> OUT/train.jsonl and OUT/dev.jsonl in ChatGLM3's finetune format."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import GlmkitError
from .options import default_data_dir

FORMATS = ("chatglm3-finetune",)


def add_parser(sub) -> None:
    ex = sub.add_parser("export", help="write the web console's conversations as fine-tuning data",
                        description="Write one owner's web-console conversations as ChatGLM3 fine-tuning data: "
                                    "OUT/train.jsonl and OUT/dev.jsonl, one {\"conversations\": [...]} per line "
                                    "(the official finetune_demo format), tool and code steps kept as their turns.")
    ex.set_defaults(run=cmd_export)
    ex.add_argument("--format", choices=FORMATS, default=FORMATS[0], help="the data format (default %(default)s)")
    ex.add_argument("--out", metavar="DIR", required=True, help="where train.jsonl and dev.jsonl are written")
    ex.add_argument("--data-dir", metavar="DIR", default=None,
                    help="where `glmkit serve` keeps the console's conversations (default: $GLMKIT_DATA_DIR, "
                         "else ~/.local/share/glmkit)")
    ex.add_argument("--database", metavar="URL", default=None,
                    help="read the conversations from this PostgreSQL database (as `serve --database`) instead")
    who = ex.add_mutually_exclusive_group()
    who.add_argument("--api-key", metavar="KEY", default=None,
                     help="export the conversations of this API key (default $GLMKIT_API_KEY; the key itself "
                          "is not stored, only a hash of it)")
    who.add_argument("--owner", metavar="OWNER", default=None,
                     help="export this owner's conversations: 'local' (a server without API keys, the default) "
                          "or a stored 'key:...' hash")
    ex.add_argument("--tools", metavar="SPEC", default=None,
                    help="the tools serve was given ('builtin' or a tools file): listed in tool conversations, "
                         "which are otherwise left out if they made calls")
    ex.add_argument("--dev-fraction", type=float, default=0.1, metavar="F",
                    help="the share of conversations in dev.jsonl (default %(default)s; at least one when there "
                         "are two or more)")
    ex.add_argument("--seed", type=int, default=0, help="the split's seed (same seed, same split; default 0)")


def cmd_export(args) -> int:
    from ..finetune.export import DEV, TRAIN, export, split
    from ..server.store import Store, owner_of
    split([], args.dev_fraction, args.seed)           # a bad fraction fails before anything is read
    api_key = args.api_key or (None if args.owner else os.environ.get("GLMKIT_API_KEY"))
    owner = owner_of(api_key) if api_key else (args.owner or "local")
    tools = None
    if args.tools:
        from ..chat.tools import load_tools
        tools = [t.spec() for t in load_tools(args.tools)]
    if args.database:
        where = args.database
    else:
        where = Path(args.data_dir or default_data_dir()) / "conversations.db"
        if not where.is_file():                       # reading must not create a store
            raise GlmkitError(f"no console conversations: {where} does not exist (`glmkit serve` keeps them "
                              f"there; --data-dir names another place)")
    store = Store(where)
    try:
        counts = export(store, owner, args.out, tools=tools, dev_fraction=args.dev_fraction, seed=args.seed)
    finally:
        store.close()
    out = Path(args.out)
    skipped = counts["skipped"]
    line = (f"exported {counts['train'] + counts['dev']} conversations of {owner if owner == 'local' else 'that key'}: "
            f"{counts['train']} to {out / TRAIN}, {counts['dev']} to {out / DEV}")
    if skipped:
        line += f"; left out {sum(skipped.values())} (" + "; ".join(f"{n}: {why}" for why, n in skipped.items()) + ")"
    print(line)
    if counts["train"] + counts["dev"] == 0:
        print("nothing to export: no conversation of this owner has an assistant reply to learn", file=sys.stderr)
    return 0
