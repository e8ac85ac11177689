"""The GGUF start cache (models/gguf_cache.py): a cached load is the same model as an uncached
one, a changed file is re-read, and a damaged cache is rebuilt with a note, never trusted."""

import json
import os
import shutil

import pytest
import torch

import glmkit
from glmkit.models.gguf_llama import GGUFFile

gguf = pytest.importorskip("gguf")
from test_gguf import Q, write_gguf  # noqa: E402  (the tiny GGUF files of every type)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("GLMKIT_CACHE_DIR", str(root))
    return root


def logits(m, text="hello there, how are you?"):
    ids = m.encode_chat([{"role": "user", "content": text}])
    m.model.setup_caches(1, len(ids))
    return m.model(torch.tensor([ids]), torch.zeros(1, dtype=torch.long))[0]


def entries(root):
    return sorted(p.name for p in (root / "gguf").iterdir()) if (root / "gguf").exists() else []


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_cached_load_is_the_same_model(tmp_path, cache, capsys, monkeypatch, qtype):
    path = write_gguf(tmp_path / "m.gguf", qtype)
    first = glmkit.load(path)
    assert "first load of m.gguf" in capsys.readouterr().err
    assert len(entries(cache)) == 1
    with monkeypatch.context() as m:
        m.setattr(GGUFFile, "__init__", lambda self, p: (_ for _ in ()).throw(AssertionError("reader opened")))
        second = glmkit.load(path)
    assert capsys.readouterr().err == ""                         # no note on a cache hit
    assert torch.equal(logits(first), logits(second))
    assert second.tokenizer.encode("héllo <|im_end|>") == first.tokenizer.encode("héllo <|im_end|>")
    assert second.tokenizer.decode(range(3, 200)) == first.tokenizer.decode(range(3, 200))
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert second.encode_chat(chat) == first.encode_chat(chat)              # the template came back too


def test_default_model_cached_gives_identical_logits_and_replies(cache, capsys, monkeypatch):
    uncached = glmkit.load(None)
    assert "first load of SmolLM2" in capsys.readouterr().err
    monkeypatch.setattr(GGUFFile, "__init__", lambda self, p: (_ for _ in ()).throw(AssertionError("reader opened")))
    cached = glmkit.load(None)
    assert torch.equal(logits(uncached), logits(cached))
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert cached.chat(chat, temperature=0, max_new_tokens=12) == uncached.chat(chat, temperature=0, max_new_tokens=12)


def test_a_changed_file_is_read_again(tmp_path, cache, capsys):
    path = write_gguf(tmp_path / "m.gguf", Q.Q4_0)
    glmkit.load(path)
    stamp = os.stat(path)
    # different weights, same size and modification time: only the content tells
    other = write_gguf(tmp_path / "other.gguf", Q.Q4_0, seed=1)
    assert other.stat().st_size == stamp.st_size
    shutil.copyfile(other, path)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    capsys.readouterr()
    reloaded = glmkit.load(path)
    assert "has changed" in capsys.readouterr().err
    assert torch.equal(logits(reloaded), logits(glmkit.load(other)))
    assert len(entries(cache)) == 2                               # path.gguf's entry (rebuilt) and other.gguf's


def _garbage_manifest(d):
    (d / "manifest.json").write_text("{not json", encoding="utf-8")


def _manifest_for_another_model(d):
    m = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
    m["config"]["dim"] *= 2
    (d / "manifest.json").write_text(json.dumps(m), encoding="utf-8")


def _truncated_weights(d):
    w = d / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-100])


def _weights_overwritten(d):
    w = d / "weights.safetensors"
    w.write_bytes(b"\xff" * w.stat().st_size)                      # same size: the header itself is garbage


def _tokenizer_damaged(d):
    m = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
    m["tokenizer"]["hf"] = "[]"
    (d / "manifest.json").write_text(json.dumps(m), encoding="utf-8")


@pytest.mark.parametrize("damage", [_garbage_manifest, _manifest_for_another_model, _truncated_weights,
                                    _weights_overwritten, _tokenizer_damaged], ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_cache_is_rebuilt_with_a_note(tmp_path, cache, capsys, damage):
    path = write_gguf(tmp_path / "m.gguf", Q.Q4_0)
    good = logits(glmkit.load(path))
    (entry,) = (cache / "gguf").iterdir()
    damage(entry)
    capsys.readouterr()
    rebuilt = glmkit.load(path)
    err = capsys.readouterr().err
    assert "the cached copy of m.gguf is not used" in err and "rebuilding it" in err
    assert torch.equal(logits(rebuilt), good)
    # and the rebuilt entry is good again: the next load is quiet
    assert torch.equal(logits(glmkit.load(path)), good)
    assert capsys.readouterr().err == ""


def test_an_unwritable_cache_costs_only_the_speed(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory would go")
    monkeypatch.setenv("GLMKIT_CACHE_DIR", str(blocker / "cache"))
    path = write_gguf(tmp_path / "m.gguf", Q.Q4_0)
    m = glmkit.load(path)
    assert "could not cache m.gguf" in capsys.readouterr().err
    monkeypatch.setenv("GLMKIT_CACHE_DIR", str(tmp_path / "good"))
    assert torch.equal(logits(m), logits(glmkit.load(path)))          # the same model, only slower to start


def test_not_cached_when_requantized_or_float(tmp_path, cache):
    path = write_gguf(tmp_path / "m.gguf", Q.Q4_0)
    glmkit.load(path, quantize="int8")
    glmkit.load(path, quantize="none")
    glmkit.load(write_gguf(tmp_path / "f.gguf", Q.F32))
    assert entries(cache) == []
