"""`glmkit models`: the checkpoints this machine has, described from their metadata."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the models here: family, parameters, context, precision, size",
                       description="List the embedded default model, $MODEL_PATH, and every checkpoint in the "
                                   "--models-dir folders (and $GLMKIT_MODELS_DIR, separated by ':'): ChatGLM "
                                   "and transformers directories, glmkit-quantized checkpoints, GGUF files and "
                                   "PEFT adapters (LoRA). "
                                   "Nothing is loaded: the figures come from each checkpoint's metadata.")
    p.set_defaults(run=cmd_models)
    p.add_argument("--models-dir", action="append", metavar="DIR", help="a folder of models (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="also list what was skipped, and why")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def _human(n: float, units) -> str:
    for unit in units[:-1]:
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}{units[-1]}"


def cmd_models(args) -> int:
    from ..models.inventory import discover, models_dirs
    found, skipped = discover(models_dirs(args.models_dir))
    if args.json:
        for m in found:
            print(json.dumps(m.as_dict(), ensure_ascii=False))
    else:
        rows = [("NAME", "FAMILY", "LAYOUT", "PARAMS", "CONTEXT", "PRECISION", "SIZE", "PATH")]
        rows += [(m.name, m.family, m.layout, _human(m.parameters, ["", "K", "M", "B"]), str(m.context or "-"),
                  m.precision, _human(m.bytes, [" B", " kB", " MB", " GB"]),
                  m.path + (f"  (adapter for {m.base})" if m.base else "")) for m in found]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if not found:
            print("no models found (pass --models-dir DIR, or set $MODEL_PATH)")
    if skipped and args.verbose:
        for path, why in skipped:
            print(f"skipped {path}: {why}", file=sys.stderr)
    elif skipped and not args.json:
        print(f"({len(skipped)} folder(s) skipped; -v says why)", file=sys.stderr)
    return 0
