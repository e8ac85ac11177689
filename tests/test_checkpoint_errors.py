"""Broken or hostile checkpoints give one clear error naming the file, and no traceback."""

import json
import shutil
import subprocess

import pytest
import torch

import glmkit
from conftest import TINY, TINY_32K, glmkit_bin


@pytest.fixture
def copy_of(tmp_path):
    def make(src):
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst
    return make


def run_cli(model_dir, env):
    return subprocess.run([glmkit_bin(), "chat", "--model", str(model_dir), "-p", "hi", "--max-new-tokens", "2"],
                          capture_output=True, text=True, timeout=120, env=env)


def assert_clean_failure(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    for n in needles:
        assert n in proc.stderr, proc.stderr


def test_truncated_safetensors_shard(copy_of, clean_env):
    d = copy_of(TINY)
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:5000])
    assert_clean_failure(run_cli(d, clean_env), "model-00002-of-00002.safetensors")


def test_truncated_pickle_shard(copy_of, clean_env):
    d = copy_of(TINY_32K)
    shard = d / "pytorch_model-00001-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:3000])
    assert_clean_failure(run_cli(d, clean_env), "pytorch_model-00001-of-00002.bin")


def test_missing_shard(copy_of, clean_env):
    d = copy_of(TINY)
    (d / "model-00001-of-00002.safetensors").unlink()
    assert_clean_failure(run_cli(d, clean_env), "model-00001-of-00002.safetensors", "missing")


def test_wrong_shape(copy_of):
    d = copy_of(TINY)
    cfg = json.loads((d / "config.json").read_text())
    cfg["ffn_hidden_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(glmkit.CheckpointError, match="shape"):
        glmkit.load(d)


def test_unknown_architecture(copy_of, clean_env):
    d = copy_of(TINY)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"           # (llama, mistral and qwen2 load: tests/test_hf_families.py)
    (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_failure(run_cli(d, clean_env), "config.json", "unsupported architecture")


def test_missing_and_extra_keys(copy_of):
    from safetensors.torch import load_file, save_file
    d = copy_of(TINY)
    shard = d / "model-00002-of-00002.safetensors"
    sd = load_file(shard)
    sd.pop("transformer.output_layer.weight")
    save_file(sd, shard)
    with pytest.raises(glmkit.CheckpointError, match="missing tensors output.weight"):
        glmkit.load(d)
    sd["transformer.encoder.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(sd, shard)
    with pytest.raises(glmkit.CheckpointError, match="unexpected tensor"):
        glmkit.load(d)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_objects_is_refused(copy_of, capfd):
    d = copy_of(TINY_32K)
    shard = d / "pytorch_model-00002-of-00002.bin"
    sd = torch.load(shard, weights_only=True)
    sd["transformer.encoder.final_layernorm.weight"] = Evil()
    torch.save(sd, shard)
    with pytest.raises(glmkit.CheckpointError, match="refused for safety"):
        glmkit.load(d)
    assert "pwned" not in capfd.readouterr().out


def test_python_files_in_checkpoint_are_never_run(copy_of, tmp_path):
    d = copy_of(TINY)
    marker = tmp_path / "ran"
    for name in ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py"):
        (d / name).write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    glmkit.load(d)
    assert not marker.exists()


def test_missing_path_and_bad_dtype(clean_env, tmp_path):
    proc = subprocess.run([glmkit_bin(), "chat", "--model", str(tmp_path / "nope"), "-p", "hi"],
                          capture_output=True, text=True, timeout=60, env=clean_env)
    assert_clean_failure(proc, "no such file or directory")
    with pytest.raises(glmkit.CheckpointError, match="no CUDA"):
        if torch.cuda.is_available():
            pytest.skip("has a GPU")
        glmkit.load(TINY, device="cuda")
