"""`glmkit models` on a folder of good, broken and non-model entries (issue 13, item 5), through the
real command; parameter counts checked against the models as loaded."""

import json
import shutil
import subprocess

import pytest
import torch

import glmkit
from conftest import TINY, TINY_32K, glmkit_bin
from glmkit.models.inventory import describe, parameter_count
from glmkit.models.quantize import QuantConfig


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from glmkit.models import quantized_checkpoint
    from test_gguf import write_gguf
    import gguf
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(TINY, root / "chatglm3-tiny")
    shutil.copytree(TINY_32K, root / "chatglm3-tiny-32k")
    quantized_checkpoint.write(TINY, root / "tiny-int4", QuantConfig(4, 32))
    write_gguf(root / "little.gguf", gguf.GGMLQuantizationType.Q8_0)
    transformers = pytest.importorskip("transformers")
    from test_hf_families import QWEN_TEMPLATE, byte_level_tokenizer
    tok = byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    cfg = transformers.Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(root / "qwen-tiny")
    tok.save(str(root / "qwen-tiny" / "tokenizer.json"))
    (root / "qwen-tiny" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                          "chat_template": QWEN_TEMPLATE}))
    quantized_checkpoint.write(root / "qwen-tiny", root / "qwen-int8", QuantConfig(8))
    # a LoRA adapter for the ChatGLM3 directory, as PEFT saves one (adapter_config.json, safetensors)
    from safetensors.torch import save_file
    (root / "tiny-lora").mkdir()
    (root / "tiny-lora" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query_key_value"],
        "base_model_name_or_path": str(root / "chatglm3-tiny")}))
    prefix = "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(4, 64, dtype=torch.bfloat16),
               f"{prefix}.lora_B.weight": torch.zeros(96, 4, dtype=torch.bfloat16)},
              str(root / "tiny-lora" / "adapter_model.safetensors"))
    # what must be skipped, each with its reason
    (root / "lora-no-weights").mkdir()
    (root / "lora-no-weights" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a model")
    (root / "bad-json").mkdir()
    (root / "bad-json" / "config.json").write_text("{not json")
    (root / "unknown-arch").mkdir()
    (root / "unknown-arch" / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    shutil.copytree(TINY, root / "missing-shard")
    (root / "missing-shard" / "model-00002-of-00002.safetensors").unlink()
    (root / "truncated.gguf").write_bytes((root / "little.gguf").read_bytes()[:5000])
    (root / "random.gguf").write_bytes(b"not gguf at all")
    return root


def run_models(*args, env_extra=None):
    import os
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "GLMKIT_MODELS_DIR")}
    env.update(env_extra or {})
    return subprocess.run([glmkit_bin(), "models", *args], capture_output=True, text=True, env=env, timeout=120)


def test_lists_good_models_and_says_why_others_are_skipped(tree):
    r = run_models("--models-dir", str(tree), "-v", "--json")
    assert r.returncode == 0, r.stderr
    found = {json.loads(line)["path"].rsplit("/", 1)[-1]: json.loads(line) for line in r.stdout.splitlines()}
    assert {"chatglm3-tiny", "chatglm3-tiny-32k", "tiny-int4", "little.gguf", "qwen-tiny"} <= set(found)
    assert found["tiny-int4"]["precision"] == "int4 g32" and found["tiny-int4"]["layout"] == "glmkit quantized"
    assert found["little.gguf"]["precision"] == "Q8_0" and found["little.gguf"]["layout"] == "GGUF"
    assert found["qwen-tiny"]["family"] == "qwen2" and found["qwen-tiny"]["context"] == 512
    assert (found["qwen-int8"]["family"], found["qwen-int8"]["precision"]) == ("qwen2", "int8")
    assert found["qwen-int8"]["parameters"] == found["qwen-tiny"]["parameters"]
    assert found["chatglm3-tiny"]["found"] == str(tree)
    assert any(m["found"] == "default" for m in found.values())          # the embedded default is listed too
    skipped = {line.split(":", 1)[0].removeprefix("skipped ").rsplit("/", 1)[-1]: line for line in r.stderr.splitlines()}
    assert set(skipped) == {"notes", "bad-json", "unknown-arch", "missing-shard", "truncated.gguf", "random.gguf",
                            "lora-no-weights"}
    assert "adapter with no weights" in skipped["lora-no-weights"]
    lora = found["tiny-lora"]
    assert (lora["family"], lora["layout"], lora["parameters"], lora["precision"]) == \
        ("chatglm3", "LORA adapter r=4", 4 * 64 + 96 * 4, "bf16")
    assert lora["base"] == str(tree / "chatglm3-tiny")
    assert "no config.json" in skipped["notes"]
    assert "not valid JSON" in skipped["bad-json"]
    assert "gpt_neox" in skipped["unknown-arch"]
    assert "missing" in skipped["missing-shard"] and "model-00002-of-00002.safetensors" in skipped["missing-shard"]
    assert "not a GGUF file" in skipped["random.gguf"]
    assert all(len(line.splitlines()) == 1 for line in skipped.values())


def test_table_and_environment_folder(tree):
    r = run_models(env_extra={"GLMKIT_MODELS_DIR": str(tree)})
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "FAMILY", "LAYOUT", "PARAMS"]
    assert any("chatglm3-tiny " in line and "ChatGLM directory" in line for line in lines)
    assert "skipped; -v says why" in r.stderr


@pytest.mark.parametrize("name", ["chatglm3-tiny", "tiny-int4", "little.gguf", "qwen-tiny"])
def test_parameter_counts_equal_the_loaded_models(tree, name):
    info = describe(tree / name)
    m = glmkit.load(tree / name, quantize="none") if name != "tiny-int4" else glmkit.load(TINY)
    loaded = {id(p): p.numel() for p in m.model.parameters()}        # a tied output layer counts once
    assert info.parameters == sum(loaded.values()) == parameter_count(m.config)
    assert info.context == m.config.context_length and info.bytes > 0
