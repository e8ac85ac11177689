"""The house's rules, checked on the source: data flows one way and the seam is torch-free.

request -> chat (templates, parsers, agent) -> Backend seam -> engine -> models/tokenizers.  A
lower layer importing a higher one, or the chat layer loading torch, would tie the layers back
together (a remote Backend must be usable without torch installed)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src" / "glmkit"

# what each package may import from glmkit (besides itself, errors and the torch-free leaves)
ALLOWED = {
    "tokenizers": set(),
    "models": {"tokenizers"},
    "sandbox": set(),
    "engine": {"models"},
    "chat": {"engine", "tokenizers", "sandbox"},
    "server": {"engine", "chat", "sandbox", "tokenizers", "models", "chat_model", "knowledge"},   # it serves a ChatModel (and retrieves from knowledge bases)
    # data for training (the chat layer's format, never the server's store) and the model blocks it trains
    "finetune": {"chat", "tokenizers", "models"},
    "knowledge": {"models"},          # the embedding model; never the server
}


def glmkit_imports(path: Path) -> set[str]:
    """The top-level glmkit packages a module imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(SRC).parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                parts = list(base) + (node.module.split(".") if node.module else [])
                if not node.module:        # `from .. import x`: x is a package or module
                    parts += [node.names[0].name]
            elif node.module and node.module.startswith("glmkit"):
                parts = node.module.split(".")[1:]
            else:
                continue
            if parts:
                found.add(parts[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("glmkit.")}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_downward(package):
    # the leaf modules errors.py, version.py and migrations.py (which import nothing of glmkit's)
    leaves = {"errors", "version", "__version__", "migrations", package}
    wrong = {}
    for path in sorted((SRC / package).rglob("*.py")):
        bad = glmkit_imports(path) - ALLOWED[package] - leaves
        if bad:
            wrong[str(path.relative_to(SRC))] = sorted(bad)
    assert not wrong, f"imports that run back up or sideways: {wrong}"


@pytest.mark.parametrize("leaf", ["errors", "version", "migrations"])
def test_leaf_modules_import_nothing_of_glmkit(leaf):
    assert glmkit_imports(SRC / f"{leaf}.py") == set()


def test_the_chat_layer_and_the_seam_load_without_torch():
    # the chat layer, and fine-tuning's data and export (training itself needs torch)
    chat_modules = sorted(f"glmkit.chat.{p.stem}" for p in (SRC / "chat").glob("*.py") if p.stem != "__init__")
    chat_modules += ["glmkit.finetune.data", "glmkit.finetune.export"]
    code = ("import sys\n"
            f"for m in {chat_modules + ['glmkit.engine.requests', 'glmkit.engine.text']!r}:\n"
            "    __import__(m)\n"
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "print(len(loaded))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0", "the chat layer imported torch"
    # and loading a model does bring it in (the check above can fail)
    out = subprocess.run([sys.executable, "-c", "import sys, glmkit.engine.scheduler; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr
