import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# `glmkit` commands started by tests decode eagerly: a background compilation in each would cost a
# minute of CPU per process (tests/test_compiled_step.py tests the compiled step)
os.environ.setdefault("GLMKIT_NO_COMPILE", "1")

# `glmkit chat -p` reads piped stdin as part of the prompt (as `llm` does), and every subprocess a
# test starts inherits this process's stdin.  pytest's fd capture gives tests an empty one, but not
# under -s: whatever the runner gave pytest (a CI pipe that never closes would make each such chat
# wait for ever) is replaced here too.  A test that pipes text in says so with input=.
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)

# one GGUF start cache (models/gguf_cache.py) for the whole run, outside the user's ~/.cache: the
# first default-model load converts the file once and every later one, in-process or a test's
# server, starts from it.  Removed when the run ends (pytest_unconfigure).
_OWN_CACHE = "GLMKIT_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["GLMKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="glmkit-test-cache-")


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["GLMKIT_CACHE_DIR"], ignore_errors=True)

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "chatglm3-tiny"          # safetensors shards
TINY_32K = FIXTURES / "chatglm3-tiny-32k"  # pickle shards, rope_ratio 50
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"


def glmkit_bin() -> str:
    """The installed console script next to the running interpreter."""
    return str(Path(sys.executable).with_name("glmkit"))


def screenshot(page, name: str) -> None:
    """A browser test's screenshot, kept in test-artifacts/; GLMKIT_UPDATE_SCREENSHOTS=1 also
    rewrites the README's copies in docs/ (the committed images are made this way)."""
    import shutil
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"console-{name}.png"))
    if os.environ.get("GLMKIT_UPDATE_SCREENSHOTS") and name in ("chat", "tool", "code", "login"):
        shutil.copy(ARTIFACTS / f"console-{name}.png", Path(__file__).parent.parent / "docs" / f"console-{name}.png")


def reference(path: Path) -> dict:
    return json.loads((path / "reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny():
    import glmkit
    return glmkit.load(TINY)


@pytest.fixture(scope="session")
def tiny32k():
    import glmkit
    return glmkit.load(TINY_32K)


@pytest.fixture(scope="session")
def smol():
    """The embedded default model as users get it (its Q4_1 blocks on the int4 kernel)."""
    import glmkit
    return glmkit.load(None)


@pytest.fixture(scope="session")
def smol_float():
    """The same weights dequantized to float32, for exact comparisons."""
    import glmkit
    return glmkit.load(None, quantize="none")


@pytest.fixture
def clean_env():
    env = dict(os.environ)
    env.pop("MODEL_PATH", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def scripted(model, *replies):
    """`model` generating through a ScriptedBackend: its next generations are forced to `replies`
    (token ids or script texts), in order, then it runs freely."""
    from glmkit.chat.scripted import ScriptedBackend
    return model.with_backend(ScriptedBackend(model.backend, replies))


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server for the run (postgres_helpers.py); skipped, saying why, where
    PostgreSQL or psycopg is not installed."""
    from postgres_helpers import postgres_server
    with postgres_server() as server:
        if isinstance(server, str):
            pytest.skip(server)
        yield server
