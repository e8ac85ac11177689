"""LoRA fine-tuning on the tiny ChatGLM3 fixture (finetune/train.py, models/adapters.py, `glmkit
finetune`, `--adapter`): the training pass, a trained answer that the base model does not give,
peft's adapter layout and key names (checked against what peft itself writes for a module tree
shaped like the HF ChatGLM3 model), the merged weights, a base mismatch, resume and QLoRA."""

import json
import math
import shutil

import pytest
import torch
from conftest import TINY, TINY_32K
from safetensors.torch import load_file

import glmkit
from glmkit.errors import CheckpointError

HF_TARGETS = {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
OURS = {"self_attention.query_key_value": "attention.wqkv", "self_attention.dense": "attention.wo",
        "mlp.dense_h_to_4h": "feed_forward.w13", "mlp.dense_4h_to_h": "feed_forward.w2"}
QA = [("What is the door code?", "The door code is 4711."),
      ("Who runs support?", "Support is run by Mei."),
      ("Where is the printer?", "Room 12, next to the kitchen.")]
RANK, ALPHA = 8, 16.0


def write_data(where):
    where.mkdir(parents=True, exist_ok=True)
    recs = [{"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    recs[2]["conversations"].insert(0, {"role": "system", "content": "Be brief."})
    (where / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    (where / "dev.jsonl").write_text(json.dumps(recs[0]) + "\n", encoding="utf-8")
    return where


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An adapter trained by `glmkit finetune` (in this process): 60 full-batch steps, no dropout."""
    from glmkit.cli import main
    root = tmp_path_factory.mktemp("ft")
    data = write_data(root / "data")
    out = root / "adapters" / "support-v1"
    status = main(["finetune", "--model", str(TINY), "--data", str(data), "--method", "lora", "--out", str(out),
                   "--rank", str(RANK), "--alpha", str(ALPHA), "--dropout", "0", "--lr", "1e-2", "--max-steps", "60",
                   "--batch-size", "3", "--warmup-steps", "2", "--seed", "0"])
    assert status == 0
    return out


def hf_tree(n_layer=2, dim=64, qkv=128, ffn=160, vocab=2048):
    """Modules named and shaped as the HF ChatGLM3 model's (ChatGLMForConditionalGeneration):
    what peft sees when the official stack fine-tunes, so what it names when it saves."""
    from torch import nn

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.query_key_value = nn.Linear(dim, qkv, bias=True)
            self.dense = nn.Linear(dim, dim, bias=False)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense_h_to_4h = nn.Linear(dim, 2 * ffn, bias=False)
            self.dense_4h_to_h = nn.Linear(ffn, dim, bias=False)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attention, self.mlp = Attn(), MLP()

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(n_layer))

    class Embedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = nn.Embedding(vocab, dim)

    class ChatGLMModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding, self.encoder = Embedding(), Encoder()
            self.output_layer = nn.Linear(dim, vocab, bias=False)

    class ChatGLMForConditionalGeneration(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = ChatGLMModel()

        def prepare_inputs_for_generation(self, *a, **k):      # PeftModelForCausalLM asks for it
            raise NotImplementedError

    return ChatGLMForConditionalGeneration()


def peft_hf_model(r=RANK, alpha=ALPHA):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=sorted(HF_TARGETS), bias="none",
                     task_type="CAUSAL_LM")
    return get_peft_model(hf_tree(), cfg)


def base_weights():
    out = {}
    for f in sorted(TINY.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def check_merged(model, adapter_dir):
    """Each adapted weight of `model` equals W + (alpha/r)·B·A, from the files alone."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    base = base_weights()
    params = dict(model.named_parameters())
    checked = 0
    for layer in range(2):
        for hf, ours in OURS.items():
            key = f"base_model.model.transformer.encoder.layers.{layer}.{hf}"
            if f"{key}.lora_A.weight" not in lora:
                continue
            a, b = lora[f"{key}.lora_A.weight"].double(), lora[f"{key}.lora_B.weight"].double()
            w = base[f"transformer.encoder.layers.{layer}.{hf}.weight"].double()
            expected = w + scale * (b @ a)
            got = params[f"layers.{layer}.{ours}.weight"].double()
            assert torch.allclose(got, expected, atol=1e-6), (layer, hf)
            assert not torch.allclose(got, w, atol=1e-4), "the adapter changed nothing"
            checked += 1
    return checked


def greedy(model, question):
    return model.chat([{"role": "user", "content": question}], temperature=0, repetition_penalty=1.0,
                      max_new_tokens=24)[0]


# -- the training pass ---------------------------------------------------------------------------
def test_training_forward_matches_the_cached_forward():
    from glmkit.models.loader import load_checkpoint
    model = load_checkpoint(TINY).model
    tokens = torch.randint(0, 2000, (2, 23), generator=torch.Generator().manual_seed(1))
    model.setup_caches(2, 32)
    cached = model(tokens, torch.zeros(2, dtype=torch.long), all_logits=True)
    plain = model.forward_train(tokens)
    assert torch.allclose(plain, cached, atol=1e-5)
    # right padding never reaches a real token: row 1 cut to 9 tokens gives the same first 9 logits
    short = model.forward_train(tokens[1:, :9])
    assert torch.allclose(short[0], plain[1, :9], atol=1e-5)
    assert torch.allclose(model.forward_train(tokens, checkpoint=True), plain)


# -- a trained answer ----------------------------------------------------------------------------
def test_lora_learns_answers_the_base_model_does_not_give(trained):
    """Bound: after training, each conversation's summed cross entropy over its learned tokens is
    below ln 2.  Every learned token then has probability above 1/2 given the ones before it, so
    it is the argmax and greedy decoding must reproduce the trained reply token for token (the
    untrained model is at about ln(2048) = 7.6 per token)."""
    from glmkit.finetune.data import IGNORE, tokenize_conversation
    from glmkit.finetune.train import token_losses
    base = glmkit.load(TINY)
    tuned = glmkit.load(TINY, adapter=trained)
    manifest = json.loads((trained / "glmkit_adapter.json").read_text())
    assert manifest["steps"] == 60 and manifest["train_loss"] < 0.2 and manifest["dev_loss"] < 0.2
    with torch.no_grad():
        for q, a in QA[:2]:
            rec = {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            ids, labels = tokenize_conversation(rec, tuned.format, 256)
            total, n = token_losses(tuned.model, torch.tensor([ids]), torch.tensor([labels]))
            assert n == sum(x != IGNORE for x in labels) > 5
            assert float(total) < math.log(2), (q, float(total))
            before, _ = token_losses(base.model, torch.tensor([ids]), torch.tensor([labels]))
            assert float(before) / n > 5
    for q, a in QA[:2]:
        assert greedy(tuned, q) == a
        assert greedy(base, q) != a


# -- the adapter's layout ------------------------------------------------------------------------
def test_saved_adapter_has_peft_layout_and_key_names(trained):
    from peft import LoraConfig, get_peft_model_state_dict
    assert {p.name for p in trained.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                    "glmkit_adapter.json"}
    cfg = LoraConfig.from_pretrained(str(trained))
    assert cfg.peft_type.value == "LORA" and cfg.task_type == "CAUSAL_LM"
    assert set(cfg.target_modules) == HF_TARGETS and cfg.r == RANK and cfg.lora_alpha == ALPHA
    ours = load_file(str(trained / "adapter_model.safetensors"))
    theirs = get_peft_model_state_dict(peft_hf_model())       # what peft saves for the HF model
    assert set(ours) == set(theirs)
    assert len(ours) == 2 * 4 * 2
    for k, t in theirs.items():
        assert ours[k].shape == t.shape and ours[k].dtype == torch.float32, k
    manifest = json.loads((trained / "glmkit_adapter.json").read_text())
    from glmkit.models.adapters import base_config_hash
    assert manifest["base_config_sha256"] == base_config_hash(TINY)


def test_merged_weights_equal_w_plus_scaled_ba(trained):
    tuned = glmkit.load(TINY, adapter=trained)
    assert check_merged(tuned.model, trained) == 8


def test_loads_a_peft_adapter_trained_elsewhere(tmp_path):
    """An adapter that peft itself saved from the HF-shaped model: glmkit merges it exactly, and the
    merged model computes what peft's LoRA layers on glmkit's blocks compute unmerged."""
    from glmkit.finetune.train import TrainConfig, load_lora_weights, lora_model
    from glmkit.models.loader import load_checkpoint
    torch.manual_seed(3)
    peft_model = peft_hf_model(r=4, alpha=8)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)          # peft starts B at zero: give the adapter something to do
    peft_model.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file() and not (tmp_path / "glmkit_adapter.json").exists()
    merged = glmkit.load(TINY, adapter=tmp_path)
    assert check_merged(merged.model, tmp_path) == 8
    unmerged = load_checkpoint(TINY).model
    lora_model(unmerged, TrainConfig(r=4, alpha=8, dropout=0.0).check())
    load_lora_weights(unmerged, tmp_path)
    unmerged.eval()
    tokens = torch.randint(0, 2000, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(merged.model.forward_train(tokens), unmerged.forward_train(tokens), atol=1e-4)


def test_adapter_for_another_base_is_a_clear_error(trained, tmp_path):
    with pytest.raises(CheckpointError, match="trained on a different base model"):
        glmkit.load(TINY_32K, adapter=trained)
    # a peft adapter for a deeper model (no manifest): its extra layer is named
    shutil.copytree(trained, tmp_path / "a")
    (tmp_path / "a" / "glmkit_adapter.json").unlink()
    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    k = "base_model.model.transformer.encoder.layers.{}.self_attention.dense.lora_{}.weight"
    sd[k.format(5, "A")], sd[k.format(5, "B")] = sd[k.format(0, "A")].clone(), sd[k.format(0, "B")].clone()
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="adapts layer 5, but .* has 2 layers"):
        glmkit.load(TINY, adapter=tmp_path / "a")
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        glmkit.load(TINY, adapter=tmp_path)


def test_adapter_is_merged_before_int4_quantization(trained):
    """--quantize int4 with an adapter: the merged weights are what gets quantized (the trained
    answer survives int4 of the tiny model's merged weights with groups of 32)."""
    tuned = glmkit.load(TINY, adapter=trained, quantize="int4", group_size=32)
    from glmkit.models.quantize import Int4Linear
    assert isinstance(tuned.model.layers[0].attention.wqkv, Int4Linear)
    assert greedy(tuned, QA[0][0]) == QA[0][1]


# -- resume, reproducibility ---------------------------------------------------------------------
def test_resume_continues_exactly(tmp_path):
    """Six steps straight, and three steps + resume from checkpoint-3, give the same adapter (with
    dropout on, so the saved random state matters too)."""
    from glmkit.finetune.train import TrainConfig, finetune
    data = write_data(tmp_path / "data")
    cfg = dict(r=4, alpha=8, dropout=0.1, lr=5e-3, max_steps=6, batch_size=2, grad_accum=2, warmup_steps=1, seed=7)
    finetune(TINY, data, tmp_path / "straight", TrainConfig(**cfg, save_steps=3))
    assert (tmp_path / "straight" / "checkpoint-3" / "trainer_state.pt").is_file()
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    s = finetune(TINY, data, tmp_path / "resumed", TrainConfig(**cfg), resume=True)
    assert s["steps"] == 6
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(glmkit.GlmkitError, match="different settings"):
        finetune(TINY, data, tmp_path / "resumed", TrainConfig(**{**cfg, "r": 8}), resume=True)


# -- QLoRA ---------------------------------------------------------------------------------------
def test_qlora_trains_on_an_int4_base(tmp_path):
    from glmkit.finetune.qlora import dequantized_t
    from glmkit.finetune.train import TrainConfig, finetune
    from glmkit.models.loader import load_checkpoint
    from glmkit.models.quantize import Int4Linear, QuantConfig
    # the backward pass's Wᵀ is what the int4 kernel multiplies by
    layer = load_checkpoint(TINY, quant=QuantConfig(4, 32)).model.layers[0].feed_forward.w13
    assert isinstance(layer, Int4Linear)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.allclose(layer(x).float(), (x @ dequantized_t(layer, torch.bfloat16)).float(),
                          rtol=2e-2, atol=2e-2)      # bfloat16 rounding of the two products
    data = write_data(tmp_path / "data")
    s = finetune(TINY, data, tmp_path / "q", TrainConfig(r=8, alpha=16, dropout=0.0, lr=1e-2, max_steps=12,
                                                         batch_size=3, quantize="int4", group_size=32))
    state = json.loads((tmp_path / "q" / "glmkit_adapter.json").read_text())
    assert state["method"] == "qlora" and s["train_loss"] < 3.0      # from ~7.6 (ln 2048)
    tuned = glmkit.load(TINY, adapter=tmp_path / "q")
    assert check_merged(tuned.model, tmp_path / "q") == 8


def test_chat_command_takes_the_adapter(trained, clean_env):
    """`glmkit chat --model DIR --adapter OUT`: the trained answer, and the wrong base refused in one line."""
    import subprocess
    import sys
    from pathlib import Path
    clean_env["PYTHONPATH"] = str(Path(glmkit.__file__).parent.parent)
    cmd = [sys.executable, "-m", "glmkit.cli", "chat", "--adapter", str(trained), "--temperature", "0",
           "--repetition-penalty", "1.0", "-p", QA[1][0]]
    ok = subprocess.run(cmd + ["--model", str(TINY)], capture_output=True, text=True, env=clean_env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == QA[1][1]
    bad = subprocess.run(cmd + ["--model", str(TINY_32K)], capture_output=True, text=True, env=clean_env, timeout=300)
    assert bad.returncode == 1 and "trained on a different base model" in bad.stderr


def test_a_large_bf16_model_is_loaded_for_training_without_inference_prepacking(monkeypatch):
    """A float model past DENSE_COPY_MAX_BYTES on CPU has its Linears prepacked for oneDNN's
    inference kernel (PackedLinear), which peft cannot wrap: ChatGLM3-6B in bfloat16 could not
    be fine-tuned.  Loaded for training, its Linears stay nn.Linear and LoRA goes on.  The
    threshold is lowered so that the tiny fixture counts as large."""
    from glmkit.finetune.train import TrainConfig, lora_model
    from glmkit.models import loader
    from glmkit.models.loader import load_checkpoint
    from glmkit.models.quantize import PackedLinear
    monkeypatch.setattr(loader, "DENSE_COPY_MAX_BYTES", 0)
    served = load_checkpoint(TINY, dtype="bfloat16").model
    assert isinstance(served.layers[0].attention.wqkv, PackedLinear)       # the inference path, as before
    model = load_checkpoint(TINY, dtype="bfloat16", training=True).model
    assert type(model.layers[0].attention.wqkv) is torch.nn.Linear
    params = lora_model(model, TrainConfig().check())
    model.train()
    tokens = torch.arange(5, 37).unsqueeze(0)
    model.forward_train(tokens).float().sum().backward()
    assert all(p.grad is not None for p in params)
