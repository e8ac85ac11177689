"""A GGUF file's second start: converted once, then memory-mapped.

Reading a GGUF file costs seconds that a 90 MB model should not: the `gguf` reader builds its
field list (the vocabulary is read through tens of thousands of numpy memmap slices) and
dequantizes with numpy.  So the first load of a GGUF file as it comes (no --quantize, on CPU)
keeps what it produced under the cache directory ($GLMKIT_CACHE_DIR, else
$XDG_CACHE_HOME/glmkit or ~/.cache/glmkit), in gguf/<hash of the file's path>-<dtype>/:

    manifest.json        cache format version, the file's key, the config, the tokenizer (its
                         `tokenizers` JSON and byte table), the chat template, each tensor's form
    weights.safetensors  the tensors exactly as the loader's build() receives them: float
                         tensors, and quantized ones as codes + scales (+ their dense values in
                         the load dtype, which build() would make anyway, and int4 codes in the
                         CPU kernel's packed layout too)

Later loads read the manifest and memory-map the weights, and never open the GGUF reader.

The key is a hash of the file's size, modification time and first and last MiB, so a file
replaced or edited in place gets a new key and its entry is rebuilt (reading all of a large file
to hash it would cost what the cache saves).  An entry that does not read back (bad JSON, a
truncated or foreign weights file, a missing tensor, a shape that does not fit) is never
trusted: one note on stderr, and it is rebuilt from the GGUF file.  What the cache does not
catch is a flipped bit inside tensor data, just as nothing catches one in the GGUF file itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ..version import __version__
from .config import ModelConfig
from .quantize import QTensor, int4_fits, pack_int4


FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
MAX_FILE_BYTES = 2 << 30   # larger files: the copy would cost more disk and memory than the start it saves
EDGE_BYTES = 1 << 20       # hashed at each end of the file


class CacheUnusable(Exception):
    """An entry that must not be used; the message says why (shown in the rebuild note)."""


def cache_root() -> Path:
    explicit = os.environ.get("GLMKIT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "glmkit"


def applies(path: Path, device: str, quant) -> bool:
    """Whether this load may use (and write) the cache: a GGUF file loaded as it comes on CPU.
    (--quantize re-quantizes from float values that the cache does not keep.)"""
    return quant is None and torch.device(device).type == "cpu" and path.stat().st_size <= MAX_FILE_BYTES


def file_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{FORMAT_VERSION}:{__version__}:{torch.__version__}:{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(EDGE_BYTES))
        if st.st_size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, st.st_size - EDGE_BYTES))
            h.update(f.read())
    return h.hexdigest()


def entry_dir(path: Path, dtype: torch.dtype) -> Path:
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{where}-{str(dtype).removeprefix('torch.')}"


def note(text: str) -> None:
    # on a terminal, from the start of a cleared line: the loading spinner may be on this one
    clear = "\r\033[K" if sys.stderr.isatty() else ""
    print(f"{clear}glmkit: {text}", file=sys.stderr, flush=True)


class Entry:
    """A cache entry that read back: its manifest checked, its weights file opened (mmap)."""

    def __init__(self, path: Path, dtype: torch.dtype):
        self.dir = entry_dir(path, dtype)
        manifest = self.dir / MANIFEST
        if not manifest.exists():
            raise FileNotFoundError(manifest)
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
            if not isinstance(m, dict):
                raise CacheUnusable("the manifest is not a JSON object")
            if m.get("format_version") != FORMAT_VERSION:
                raise CacheUnusable(f"written by another cache format ({m.get('format_version')!r})")
            if m.get("key") != file_key(path):
                raise CacheUnusable("the GGUF file has changed since it was cached")
            self.config = ModelConfig(**m["config"])
            self.tokenizer_state = m["tokenizer"]
            self.chat_template = m["chat_template"]
            self.forms: dict[str, dict] = m["tensors"]
            weights = self.dir / WEIGHTS
            if weights.stat().st_size != m["weights_bytes"]:
                raise CacheUnusable(f"{WEIGHTS} has {weights.stat().st_size} bytes, the manifest says {m['weights_bytes']}")
        except CacheUnusable:
            raise
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise CacheUnusable(f"unreadable manifest or weights ({type(e).__name__}: {e})") from None
        self.weights = weights

    def tokenizer(self):
        from ..tokenizers.gguf_bpe import GGUFBPETokenizer
        try:
            return GGUFBPETokenizer.from_state(self.tokenizer_state)
        except Exception as e:
            raise CacheUnusable(f"its vocabulary does not build a tokenizer ({type(e).__name__}: {e})") from None

    def iter_state(self) -> Iterator[tuple[Path, str, object]]:
        """As GGUFFile.iter_state yields them; CacheUnusable if the weights do not read back."""
        from safetensors import safe_open
        try:
            with safe_open(str(self.weights), framework="pt") as st:
                stored = set(st.keys())
                for name, form in self.forms.items():
                    parts = {part: st.get_tensor(f"{name}/{part}") for part in form["parts"]
                             if f"{name}/{part}" in stored}
                    if len(parts) != len(form["parts"]):
                        raise CacheUnusable(f"{WEIGHTS} lacks parts of {name}")
                    if form["kind"] == "float":
                        yield self.weights, name, parts["value"]
                    else:
                        yield self.weights, name, QTensor(form["bits"], parts["q"], parts["scales"],
                                                          form["group_size"], parts.get("dense"), parts.get("packed"))
        except CacheUnusable:
            raise
        except Exception as e:   # safetensors raises its own errors for a bad header or a short file
            raise CacheUnusable(f"{WEIGHTS} does not read back ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def lookup(path: Path, dtype: torch.dtype) -> Entry | None:
    """The usable entry for this file and dtype, or None (a bad one is noted and removed)."""
    try:
        return Entry(path, dtype)
    except FileNotFoundError:
        return None
    except CacheUnusable as e:
        discard(path, dtype, f"the cached copy of {path.name} is not used: {e}; rebuilding it")
        return None


def discard(path: Path, dtype: torch.dtype, why: str) -> None:
    note(why)
    shutil.rmtree(entry_dir(path, dtype), ignore_errors=True)


class Recorder:
    """Passes a GGUF file's tensors on to build() while keeping what the cache needs; `save()`
    after the build succeeded (a failed load writes nothing)."""

    def __init__(self, path: Path, dtype: torch.dtype):
        self.path, self.dtype = path, dtype
        self.tensors: dict[str, torch.Tensor] = {}
        self.forms: dict[str, dict] = {}

    def wrap(self, state) -> Iterator:
        for file, name, t in state:
            self._keep(name, t)
            yield file, name, t

    def _keep(self, name: str, t) -> None:
        if isinstance(t, QTensor):
            parts = {"q": t.q, "scales": t.scales}
            if t.bits == 4 and int4_fits(*t.shape, t.group_size):
                # the kernel's layout: packing is most of what a cached start would still spend
                parts["packed"] = pack_int4(t.q, torch.device("cpu"))
            if t.dense is not None:
                # build() uses a dense copy only as .to(dtype): the same values, kept at half the size
                parts["dense"] = t.dense.to(self.dtype)
            self.forms[name] = {"kind": "quantized", "bits": t.bits, "group_size": t.group_size, "parts": list(parts)}
        else:
            parts = {"value": t}
            self.forms[name] = {"kind": "float", "parts": ["value"]}
        for part, value in parts.items():
            self.tensors[f"{name}/{part}"] = value.contiguous()

    def save(self, cfg: ModelConfig, tokenizer_state: dict, chat_template: str | None) -> None:
        """Write the entry beside its final place and rename it there: an entry is either whole or
        absent, and two processes loading at once do not mix theirs (the second one's rename finds
        the first's entry there, which is as good).  A process that was reading the entry being
        replaced may find it gone and rebuild it once more.  A cache that cannot be written
        (read-only home, full disk) costs only the speed-up: one note."""
        from safetensors.torch import save_file
        final = entry_dir(self.path, self.dtype)
        tmp = None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
            save_file(self.tensors, str(tmp / WEIGHTS))
            manifest = {"format_version": FORMAT_VERSION, "key": file_key(self.path), "source": str(self.path),
                        "glmkit_version": __version__, "config": dataclasses.asdict(cfg), "tokenizer": tokenizer_state,
                        "chat_template": chat_template, "tensors": self.forms,
                        "weights_bytes": (tmp / WEIGHTS).stat().st_size}
            (tmp / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
            if final.exists():              # a stale or damaged entry: moved aside whole, then removed
                aside = Path(tempfile.mkdtemp(prefix=final.name + ".old.", dir=final.parent))
                with contextlib.suppress(FileNotFoundError):
                    os.replace(final, aside)
                shutil.rmtree(aside, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)      # another process put its entry there first
        except OSError as e:
            note(f"could not cache {self.path.name} for faster starts ({e}); it loads from the GGUF file each time")
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            self.tensors.clear()
