"""P-tuning v2 checkpoints of the official ChatGLM3 demo (models/ptuning.py, `--adapter DIR`).

Each checkpoint is written here in the official layouts, with random prefix weights: config.json with
pre_seq_len (and prefix_projection) beside pytorch_model.bin holding only
transformer.prefix_encoder.embedding.weight (the older demo's trainer), or the whole model in
safetensors shards with an index (finetune_demo/finetune_hf.py).  The reference is computed here,
from the fixture's safetensors by their checkpoint names, with plain torch: the prefix keys/values
made the way the original's get_prompt makes them (view, permute, split in pairs), concatenated
before each layer's keys/values (unrotated), every token attending to all of them, rotary
positions of the prompt from 0."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from safetensors import safe_open
from safetensors.torch import save_file

import glmkit
from glmkit.errors import CheckpointError

BASE = json.loads((TINY / "config.json").read_text())
L, G, D, HIDDEN = BASE["num_layers"], BASE["multi_query_group_num"], BASE["kv_channels"], BASE["hidden_size"]
WIDTH = L * 2 * G * D
PROMPT = [2001, 2003, 2006, 1572, 13, 1000, 1200, 1400, 2007]    # the fixture's [gMASK] sop <|user|> ... <|assistant|>


# -- the reference ---------------------------------------------------------------------------
def base_weights() -> dict:
    sd = {}
    for f in sorted(TINY.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                sd[k] = st.get_tensor(k).float()
    return sd


SD = base_weights()


def get_prompt(emb: torch.Tensor, projection: dict | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The original's PrefixEncoder + get_prompt for batch 1: per layer (keys, values) [P, G, D]."""
    P = emb.shape[0]
    kv = emb.float()
    if projection is not None:
        kv = torch.tanh(kv @ projection["trans.0.weight"].T + projection["trans.0.bias"]) \
            @ projection["trans.2.weight"].T + projection["trans.2.bias"]
    kv = kv[None].view(1, P, L * 2, G, D).permute([2, 1, 0, 3, 4]).split(2)
    return [(pair[0][:, 0], pair[1][:, 0]) for pair in kv]


def reference_logits(ids: list[int], prefix=None) -> torch.Tensor:
    """Logits [T, V] of the ChatGLM3 forward pass over `ids` with `prefix` as every layer's past."""
    T, H = len(ids), BASE["num_attention_heads"]
    eps = BASE["layernorm_epsilon"]
    rot = D // 2                                             # rotary on the first half of each head
    theta = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float) / rot))
    angles = torch.outer(torch.arange(T, dtype=torch.float), theta)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]

    def rope(t):                                             # [T, n, D], interleaved pairs
        xs = t[..., :rot].reshape(T, t.shape[1], rot // 2, 2)
        out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], -1)
        return torch.cat([out.flatten(2), t[..., rot:]], -1)

    def rms(h, w):
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))

    x = SD["transformer.embedding.word_embeddings.weight"][ids]
    for i in range(L):
        p = f"transformer.encoder.layers.{i}."
        qkv = rms(x, SD[p + "input_layernorm.weight"]) @ SD[p + "self_attention.query_key_value.weight"].T \
            + SD[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([H * D, G * D, G * D], -1)
        q, k, v = rope(q.view(T, H, D)), rope(k.view(T, G, D)), v.view(T, G, D)
        if prefix is not None:
            k, v = torch.cat([prefix[i][0], k]), torch.cat([prefix[i][1], v])
        S = k.shape[0]
        k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)
        visible = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        x = x + torch.einsum("hts,shd->thd", probs, v).reshape(T, H * D) @ SD[p + "self_attention.dense.weight"].T
        a, b = (rms(x, SD[p + "post_attention_layernorm.weight"]) @ SD[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, -1)
        x = x + (F.silu(a) * b) @ SD[p + "mlp.dense_4h_to_h.weight"].T
    return rms(x, SD["transformer.encoder.final_layernorm.weight"]) @ SD["transformer.output_layer.weight"].T


def reference_greedy(ids: list[int], n: int, prefix) -> list[int]:
    ids, out = list(ids), []
    for _ in range(n):
        tok = int(reference_logits(ids, prefix)[-1].argmax())
        out.append(tok)
        ids.append(tok)
    return out


# -- checkpoints in the official layouts ------------------------------------------------------
def prefix_weights(pre_seq_len=8, width=WIDTH, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(pre_seq_len, width, generator=g)


def write_bin_checkpoint(out: Path, emb: torch.Tensor, pre_seq_len=None, projection: dict | None = None, **config):
    """The older demo's output: the model's config with pre_seq_len, the prefix encoder alone."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**BASE, "pre_seq_len": emb.shape[0] if pre_seq_len is None else pre_seq_len,
           "prefix_projection": projection is not None, **config}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {"transformer.prefix_encoder.embedding.weight": emb}
    state.update({f"transformer.prefix_encoder.{k}": t for k, t in (projection or {}).items()})
    torch.save(state, out / "pytorch_model.bin")
    return out


def write_full_checkpoint(out: Path, emb: torch.Tensor):
    """finetune_hf.py's output: the whole model (base weights + prefix encoder) in indexed shards,
    and the tokenizer's files (its trainer is given the tokenizer for P-tuning)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(TINY / name, out / name)
    (out / "config.json").write_text(json.dumps({**BASE, "pre_seq_len": emb.shape[0], "prefix_projection": False}))
    names = sorted(SD)
    shards = {"model-00001-of-00002.safetensors": {k: SD[k] for k in names[: len(names) // 2]},
              "model-00002-of-00002.safetensors": {k: SD[k] for k in names[len(names) // 2:]}}
    shards["model-00002-of-00002.safetensors"]["transformer.prefix_encoder.embedding.weight"] = emb
    for name, state in shards.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, state in shards.items() for k in state}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    emb = prefix_weights()
    return write_bin_checkpoint(tmp_path_factory.mktemp("pt") / "ptuning-checkpoint-3000", emb), emb


@pytest.fixture(scope="module")
def tuned(ckpt):
    return glmkit.load(TINY, adapter=ckpt[0])


def all_logits(model, ids: list[int], chunks=(None,)) -> torch.Tensor:
    """glmkit's logits for `ids`, prefilled in the given chunk sizes."""
    m = model.model
    m.setup_caches(1, 64)
    out, at = [], 0
    for size in chunks:
        part = ids[at:] if size is None else ids[at:at + size]
        out.append(m(torch.tensor([part]), torch.tensor([at]), all_logits=True)[0])
        at += len(part)
    return torch.cat(out)


# -- tests -----------------------------------------------------------------------------------
def test_the_reference_is_the_base_model(tiny):
    """Without a prefix the test's reference gives glmkit's logits: it is a fair judge."""
    assert tiny.model.prefix_len == 0
    assert torch.allclose(all_logits(tiny, PROMPT), reference_logits(PROMPT), atol=1e-4, rtol=0)


def test_prefix_logits_equal_the_reference(tuned, ckpt, tiny):
    path, emb = ckpt
    prefix = get_prompt(emb)
    assert tuned.model.prefix_len == 8
    want = reference_logits(PROMPT, prefix)
    got = all_logits(tuned, PROMPT)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    # prefilled in chunks (positions continue; the prefix stays in front)
    assert torch.allclose(all_logits(tuned, PROMPT, chunks=(3, 4, None)), want, atol=1e-4, rtol=0)
    # the prefix matters: the base model's logits are not these
    assert not torch.allclose(all_logits(tiny, PROMPT), want, atol=1e-2)


def test_generation_through_the_engine_equals_the_reference(tuned, ckpt):
    """Greedy tokens through the scheduler (prefill, decode steps, two rows of different lengths
    decoded together, and a prefix-cache hit on the second turn) equal the reference's."""
    prefix = get_prompt(ckpt[1])
    other = PROMPT[:3] + [1500, 1600, 1700, 1800, 1900, 13, 1572, 2007]
    n = 6
    want = [reference_greedy(PROMPT, n, prefix), reference_greedy(other, n, prefix)]
    got = tuned.generate_batch([PROMPT, other], max_new_tokens=n, stop_ids=[], temperature=0, repetition_penalty=1.0)
    assert got == want
    longer = other + want[1] + [2006, 1999, 2007]         # starts with what the second row holds: copied over
    hits = tuned.backend.scheduler.stats.prefix_hits
    assert tuned.generate(longer, max_new_tokens=n, stop_ids=[], temperature=0,
                          repetition_penalty=1.0) == reference_greedy(longer, n, prefix)
    assert tuned.backend.scheduler.stats.prefix_hits > hits


def test_quantized_base_keeps_the_prefix(ckpt):
    """--quantize int8 (bfloat16 activations): the prefix is cast with the model and still applies."""
    model = glmkit.load(TINY, adapter=ckpt[0], quantize="int8")
    assert model.model.prefix_len == 8 and model.model.dtype == torch.bfloat16
    want = reference_logits(PROMPT, get_prompt(ckpt[1]))
    assert (all_logits(model, PROMPT).float() - want).abs().max() < 0.5      # int8 and bfloat16 rounding
    assert (all_logits(glmkit.load(TINY, quantize="int8"), PROMPT).float() - want).abs().max() > 2


def test_whole_model_layout_in_safetensors_shards(tmp_path, ckpt):
    """finetune_hf.py's checkpoint (every weight, prefix encoder included): only the prefix is read."""
    path = write_full_checkpoint(tmp_path / "checkpoint-3000", ckpt[1])
    model = glmkit.load(TINY, adapter=path)
    assert torch.allclose(all_logits(model, PROMPT), reference_logits(PROMPT, get_prompt(ckpt[1])), atol=1e-4, rtol=0)


def test_whole_model_save_as_the_model(tmp_path, ckpt):
    """The same directory passed as --model (as the demo's inference_hf.py loads it): base weights and
    prefix both from it; another prefix on top is refused; `glmkit quantize` refuses it (the copy
    would lose the prefix)."""
    from glmkit.models import quantized_checkpoint
    from glmkit.models.quantize import QuantConfig
    path = write_full_checkpoint(tmp_path / "checkpoint-3000", ckpt[1])
    model = glmkit.load(path)
    assert torch.allclose(all_logits(model, PROMPT), reference_logits(PROMPT, get_prompt(ckpt[1])), atol=1e-4, rtol=0)
    with pytest.raises(CheckpointError, match="carries its own P-tuning v2 prefix"):
        glmkit.load(path, adapter=ckpt[0])
    with pytest.raises(CheckpointError, match="P-tuning v2 checkpoint .* quantize the base model"):
        quantized_checkpoint.write(path, tmp_path / "q", QuantConfig(8))


def test_prefix_projection(tmp_path):
    """prefix_projection=true: the MLP (Linear, tanh, Linear) is applied once, at load."""
    g = torch.Generator().manual_seed(3)
    proj = {"trans.0.weight": torch.randn(HIDDEN, WIDTH, generator=g) * 0.05,
            "trans.0.bias": torch.randn(HIDDEN, generator=g) * 0.1,
            "trans.2.weight": torch.randn(WIDTH, HIDDEN, generator=g),
            "trans.2.bias": torch.randn(WIDTH, generator=g)}
    emb = prefix_weights(5, seed=4)
    path = write_bin_checkpoint(tmp_path / "pt", emb, projection=proj)
    model = glmkit.load(TINY, adapter=path)
    assert model.model.prefix_len == 5
    want = reference_logits(PROMPT, get_prompt(emb, proj))
    assert torch.allclose(all_logits(model, PROMPT), want, atol=1e-4, rtol=0)
    bad = write_bin_checkpoint(tmp_path / "no-mlp", emb, prefix_projection=True)
    with pytest.raises(CheckpointError, match=r"trans\.0\..*prefix_projection=true"):
        glmkit.load(TINY, adapter=bad)


def test_wrong_pre_seq_len_is_a_clear_error(tmp_path):
    """ChatGLM3 #404: a checkpoint whose pre_seq_len disagrees with its weights."""
    path = write_bin_checkpoint(tmp_path / "pt", prefix_weights(6), pre_seq_len=8)
    with pytest.raises(CheckpointError, match=r"pre_seq_len=8, but .*embedding\.weight holds 6 prefix positions"):
        glmkit.load(TINY, adapter=path)
    bad = write_bin_checkpoint(tmp_path / "zero", prefix_weights(6), pre_seq_len=-1)
    with pytest.raises(CheckpointError, match="pre_seq_len=-1; expected a positive integer"):
        glmkit.load(TINY, adapter=bad)


def test_wrong_layer_count_is_a_clear_error(tmp_path):
    three = prefix_weights(8, width=3 * 2 * G * D)
    path = write_bin_checkpoint(tmp_path / "deep", three)            # config says 2 layers, weights say 3
    with pytest.raises(CheckpointError, match="trained on a model with 3 layers; .* has 2"):
        glmkit.load(TINY, adapter=path)
    path = write_bin_checkpoint(tmp_path / "cfg", three, num_layers=3)
    with pytest.raises(CheckpointError, match="num_layers=3, but .* has num_layers=2"):
        glmkit.load(TINY, adapter=path)
    odd = write_bin_checkpoint(tmp_path / "odd", prefix_weights(8, width=WIDTH + 4))
    with pytest.raises(CheckpointError, match=f"is {WIDTH + 4} wide, but .* = {WIDTH}"):
        glmkit.load(TINY, adapter=odd)


def test_pickles_are_read_as_tensors_only(tmp_path):
    path = write_bin_checkpoint(tmp_path / "pt", prefix_weights())
    torch.save({"transformer.prefix_encoder.embedding.weight": prefix_weights(), "x": Path("evil")},
               path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused for safety"):
        glmkit.load(TINY, adapter=path)


def test_not_a_ptuning_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no adapter_config.json .* pre_seq_len"):
        glmkit.load(TINY, adapter=tmp_path / "empty")


def test_prefix_cannot_be_fine_tuned_on(tuned):
    with pytest.raises(ValueError, match="P-tuning"):
        tuned.model.forward_train(torch.tensor([PROMPT]))


def test_chat_command_with_the_checkpoint(ckpt, tuned, tiny, clean_env):
    """`glmkit chat --model DIR --adapter ptuning-checkpoint-3000/ -p ...` answers as the library
    does with the prefix; a checkpoint for another model fails in one line."""
    clean_env["PYTHONPATH"] = str(Path(glmkit.__file__).parent.parent)
    cmd = [sys.executable, "-m", "glmkit.cli", "chat", "--model", str(TINY), "--temperature", "0",
           "--repetition-penalty", "1.0", "--max-new-tokens", "12", "-p", "Hello"]
    msgs = [{"role": "user", "content": "Hello"}]
    want = tuned.chat(msgs, temperature=0, repetition_penalty=1.0, max_new_tokens=12)[0]
    assert want != tiny.chat(msgs, temperature=0, repetition_penalty=1.0, max_new_tokens=12)[0]
    ok = subprocess.run(cmd + ["--adapter", str(ckpt[0])], capture_output=True, text=True, env=clean_env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == want.strip()
    deep = write_bin_checkpoint(ckpt[0].parent / "deep", prefix_weights(8, width=3 * 2 * G * D))
    bad = subprocess.run(cmd + ["--adapter", str(deep)], capture_output=True, text=True, env=clean_env, timeout=300)
    assert bad.returncode == 1 and "3 layers" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_compiled_decode_step_with_the_prefix(tmp_path, ckpt, static):
    """The compiled step (engine/compiled_step.py) shifts slots and mask by the prefix as the eager
    step does: the same greedy tokens with sequences joining, leaving and reusing kept prefixes
    (test_compiled_step's script); the static variant is the CUDA-graph layout, run on CPU."""
    from test_compiled_step import compare

    from glmkit.engine import Scheduler
    from glmkit.engine.compiled_step import CompiledDecode
    model = glmkit.load(TINY, adapter=ckpt[0]).model
    compiled = CompiledDecode(model, 2, static=static)
    Scheduler(model, max_batch=2, compile=compiled)        # reserves the cache's rows
    compiled.compile()
    assert not compiled.failed and compiled.ready == {1, 2}
    compare(model, compiled, 2)
