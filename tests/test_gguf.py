"""GGUF files of every supported tensor type, written here with the `gguf` package's own writer."""

import numpy as np
import pytest
import torch

import glmkit
from glmkit.tokenizers.gguf_bpe import _bytes_to_unicode

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

DIM, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
HEAD_DIM = DIM // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def weights(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vocab = len(SPECIALS) + 256
    w = {"token_embd.weight": rng.normal(0, 0.5, (vocab, DIM)), "output_norm.weight": 1 + 0.1 * rng.normal(size=DIM),
         "output.weight": rng.normal(0, 0.2, (vocab, DIM))}
    for i in range(LAYERS):
        p = f"blk.{i}."
        w |= {p + "attn_norm.weight": 1 + 0.1 * rng.normal(size=DIM), p + "ffn_norm.weight": 1 + 0.1 * rng.normal(size=DIM),
              p + "attn_q.weight": rng.normal(0, 0.2, (DIM, DIM)), p + "attn_k.weight": rng.normal(0, 0.2, (KV_HEADS * HEAD_DIM, DIM)),
              p + "attn_v.weight": rng.normal(0, 0.2, (KV_HEADS * HEAD_DIM, DIM)), p + "attn_output.weight": rng.normal(0, 0.2, (DIM, DIM)),
              p + "ffn_gate.weight": rng.normal(0, 0.2, (FFN, DIM)), p + "ffn_up.weight": rng.normal(0, 0.2, (FFN, DIM)),
              p + "ffn_down.weight": rng.normal(0, 0.2, (DIM, FFN))}
    return {k: v.astype(np.float32) for k, v in w.items()}


def write_gguf(path, qtype, arch="llama", tied=False, seed=0):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    byte_chars = list(_bytes_to_unicode().values())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(SPECIALS + byte_chars)
    w.add_token_types([3] * len(SPECIALS) + [1] * 256)
    w.add_token_merges([])
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    for name, t in weights(seed).items():
        if tied and name == "output.weight":
            continue                           # the output layer is the embedding matrix
        if t.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, t)
        elif qtype == Q.F16:
            w.add_tensor(name, t.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# bound on |quantized - float| relative to the weights' scale, per type
TOLERANCE = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 0.02, Q.Q4_0: 0.3, Q.Q4_1: 0.3}


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_tensor_types_load_and_dequantize(tmp_path, qtype):
    m = glmkit.load(write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", qtype), quantize="none")
    ref = weights()
    wo = m.model.layers[0].attention.wo.weight
    want = torch.from_numpy(ref["blk.0.attn_output.weight"])
    err = (wo - want).abs().max().item() / want.abs().max().item()
    assert err <= TOLERANCE[qtype] + 1e-7
    q, k, v = m.model.layers[1].attention.wqkv.weight.split([DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM])
    assert (v - torch.from_numpy(ref["blk.1.attn_v.weight"])).abs().max() <= TOLERANCE[qtype] * 0.2 * 5 + 1e-6
    ids = m.encode_chat([{"role": "user", "content": "hi"}])
    tail = [1] + m.tokenizer.encode("assistant\n")
    assert ids[0] == 1 and ids[-len(tail):] == tail
    assert len(m.generate(ids, max_new_tokens=5, temperature=0, stop_ids=())) == 5


def test_quantized_logits_close_to_float(tmp_path):
    models = [glmkit.load(write_gguf(tmp_path / f"{q.name}.gguf", q), quantize="none") for q in (Q.F32, Q.Q8_0, Q.Q4_0)]
    ids = models[0].encode_chat([{"role": "user", "content": "hello there"}])
    out = []
    for m in models:
        m.model.setup_caches(1, len(ids))
        out.append(m.model(torch.tensor([ids]), torch.zeros(1, dtype=torch.long))[0])
    rel8, rel4 = ((out[0] - o).norm() / out[0].norm() for o in out[1:])
    # a random 2-layer net amplifies weight noise; 8-bit must stay close and beat 4-bit
    assert rel8 < 0.1 and rel8 < rel4


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    with pytest.raises(glmkit.CheckpointError, match="unsupported GGUF architecture 'gpt2'"):
        glmkit.load(write_gguf(tmp_path / "x.gguf", Q.F32, arch="gpt2"))


def test_truncated_gguf_is_a_clear_error(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", Q.Q8_0)
    path.write_bytes(path.read_bytes()[:20000])
    with pytest.raises(glmkit.CheckpointError, match="t.gguf"):
        glmkit.load(path)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_native_blocks_run_on_int_kernels_exactly(tmp_path, qtype):
    """Q4_0/Q4_1 map exactly onto int4 group 32 (Q8_0 onto per-row int8): with float32
    activations the kernels must reproduce the dequantized float model."""
    from glmkit.models.quantize import Int4Linear, Int8Linear
    path = write_gguf(tmp_path / "m.gguf", qtype)
    native = glmkit.load(path, dtype="float32")
    ref = glmkit.load(path, quantize="none")
    kind = Int8Linear if qtype == Q.Q8_0 else Int4Linear
    assert isinstance(native.model.layers[1].attention.wqkv, kind)
    assert isinstance(native.model.layers[1].feed_forward.w13, kind)
    ids = ref.encode_chat([{"role": "user", "content": "hello there"}])
    out = []
    for m in (native, ref):
        m.model.setup_caches(1, len(ids))
        out.append(m.model(torch.tensor([ids]), torch.zeros(1, dtype=torch.long))[0])
    if qtype == Q.Q8_0:  # re-quantized per row: close, not exact
        assert (out[0] - out[1]).norm() / out[1].norm() < 0.05
    else:
        assert torch.allclose(out[0], out[1], atol=1e-4)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0], ids=lambda q: q.name)
def test_tied_output_runs_on_the_quantized_kernel_from_the_stored_blocks(tmp_path, qtype):
    """A file without output.weight multiplies by its embedding matrix; stored quantized, that matmul
    runs on the int kernel (as llama.cpp does) while the lookup keeps the float values, and the
    dense copy for many-row steps is the embedding's own tensor, not a second one."""
    from glmkit.models.quantize import Int4Linear, Int8Linear
    path = write_gguf(tmp_path / "tied.gguf", qtype, tied=True)
    native = glmkit.load(path, dtype="float32")
    ref = glmkit.load(path, quantize="none")
    out = native.model.output
    emb = native.model.tok_embeddings.weight
    assert ref.model.output.weight is ref.model.tok_embeddings.weight
    assert torch.equal(emb, ref.model.tok_embeddings.weight)       # the lookup: the file's float values
    ids = ref.encode_chat([{"role": "user", "content": "hello there"}])
    logits = []
    for m in (native, ref):
        m.model.setup_caches(1, len(ids))
        logits.append(m.model(torch.tensor([ids]), torch.zeros(1, dtype=torch.long))[0])
    if qtype == Q.Q8_0:    # re-quantized per row for the int8 kernel: close, not exact
        assert isinstance(out, Int8Linear) and out.dense is emb
        assert 0 < (logits[0] - logits[1]).norm() / logits[1].norm() < 0.05
    else:                  # 259 output rows do not fit the int4 kernel (multiples of 16): float, shared
        assert not isinstance(out, Int4Linear) and out.weight is emb
        assert torch.allclose(logits[0], logits[1], atol=1e-4)
    # asked to keep weights in float, or to quantize only the layers: one shared tensor, as before
    asked = glmkit.load(path, quantize="int8")
    assert asked.model.output.weight is asked.model.tok_embeddings.weight


def test_tied_output_quantized_on_request(tmp_path):
    """--quantize-output on a tied model quantizes the shared matrix for the output layer only."""
    from glmkit.models.quantize import Int8Linear
    m = glmkit.load(write_gguf(tmp_path / "tied.gguf", Q.F32, tied=True), quantize="int8", quantize_output=True)
    assert isinstance(m.model.output, Int8Linear) and m.model.tok_embeddings.weight.dtype.is_floating_point
    assert len(m.generate(m.encode_chat([{"role": "user", "content": "hi"}]), max_new_tokens=3,
                          temperature=0, stop_ids=())) == 3
