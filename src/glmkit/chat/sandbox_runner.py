"""The code interpreter's kernel.  THIS FILE RUNS ONLY INSIDE THE SANDBOX (chat/interpreter.py
starts it under bubblewrap with `python -c <this source>`); glmkit never imports it.

It keeps one namespace across cells, runs each cell with the standard library's
InteractiveInterpreter (the last expression is shown like Jupyter's Out), captures stdout/stderr
up to a limit, collects matplotlib figures as PNG, and answers on its own pipe (not stdout) with one JSON
line per cell, so nothing the cell prints can forge a reply."""

import base64
import code
import io
import json
import os
import resource
import sys
import traceback


class CappedText(io.TextIOBase):
    def __init__(self, limit):
        self.limit, self.parts, self.size, self.dropped = limit, [], 0, 0

    def write(self, s):
        room = self.limit - self.size
        if room > 0:
            self.parts.append(s[:room])
            self.size += min(len(s), room)
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def text(self):
        out = "".join(self.parts)
        return out + (f"\n... [output truncated: {self.dropped} more characters]" if self.dropped else "")


def limits(cfg):
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_mb"] * mb, cfg["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["max_procs"], cfg["max_procs"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["max_file_mb"] * mb, cfg["max_file_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_seconds"], cfg["cpu_seconds"]))


def figures():
    if "matplotlib.pyplot" not in sys.modules:
        return []
    plt = sys.modules["matplotlib.pyplot"]
    out = []
    for num in plt.get_fignums():
        buf = io.BytesIO()
        plt.figure(num).savefig(buf, format="png", dpi=80)
        out.append(base64.b64encode(buf.getvalue()).decode())
    plt.close("all")
    return out


class Interp(code.InteractiveInterpreter):
    failed = False

    def showtraceback(self):
        self.failed = True
        super().showtraceback()

    def showsyntaxerror(self, filename=None, **kwargs):
        self.failed = True
        super().showsyntaxerror(filename)


def run_cell(interp, cell):
    import ast
    try:
        tree = ast.parse(cell)
    except SyntaxError:
        interp.failed = True
        traceback.print_exc(limit=0)
        return
    last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    head = tree.body[:-1] if last is not None else tree.body
    if head:
        interp.runsource(ast.unparse(ast.Module(head, [])), "<cell>", "exec")
    if last is not None and not interp.failed:
        interp.runsource(ast.unparse(last), "<cell>", "single")   # shows the value, like Out[n]


def main():
    cfg = json.loads(sys.argv[1])
    limits(cfg)
    os.chdir(cfg["workdir"])
    reply = os.fdopen(cfg["reply_fd"], "w", buffering=1)
    interp = Interp({"__name__": "__main__"})
    real_out, real_err = sys.stdout, sys.stderr
    for line in sys.stdin:
        cell = json.loads(line)["code"]
        out = CappedText(cfg["max_output"])
        sys.stdout = sys.stderr = out
        interp.failed = False
        try:
            run_cell(interp, cell)
        except SystemExit as e:          # exit() in a cell ends the cell, not the kernel
            interp.failed = True
            print(f"SystemExit: {e}")
        except BaseException:            # e.g. MemoryError while formatting
            interp.failed = True
            traceback.print_exc()
        finally:
            sys.stdout, sys.stderr = real_out, real_err
        try:
            images = figures()
        except Exception as e:
            images, interp.failed = [], True
            out.write(f"\n[figure could not be saved: {e}]")
        reply.write(json.dumps({"text": out.text(), "images": images, "error": interp.failed}) + "\n")


main()
