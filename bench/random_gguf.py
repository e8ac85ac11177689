"""Write a GGUF file with ChatGLM3's architecture and shapes and random weights, for llama.cpp.

Tensors are generated and written one at a time (the 6B file is 12.5 GB in F16), in llama.cpp's
`chatglm` layout: fused attn_qkv with bias, ffn_up holding both SwiGLU halves, partial rotary
(rope.dimension_count = 64).  The vocabulary is a placeholder SentencePiece-style list of the
real size (65,024): the benchmark feeds token ids, not text.

    python bench/random_gguf.py OUT.gguf [--like chatglm3-6b|tiny]
"""

import argparse

import numpy as np

import gguf

SHAPES = {
    "chatglm3-6b": dict(layers=28, dim=4096, heads=32, kv=2, head_dim=128, ffn=13696, vocab=65024, ctx=8192),
    "tiny": dict(layers=2, dim=256, heads=4, kv=2, head_dim=64, ffn=512, vocab=1024, ctx=512),
}


def tensors(s, rng):
    qkv = s["dim"] + 2 * s["kv"] * s["head_dim"]
    yield "token_embd.weight", (s["vocab"], s["dim"])
    for i in range(s["layers"]):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (s["dim"],)
        yield p + "attn_qkv.weight", (qkv, s["dim"])
        yield p + "attn_qkv.bias", (qkv,)
        yield p + "attn_output.weight", (s["dim"], s["dim"])
        yield p + "ffn_norm.weight", (s["dim"],)
        yield p + "ffn_up.weight", (2 * s["ffn"], s["dim"])
        yield p + "ffn_down.weight", (s["dim"], s["ffn"])
    yield "output_norm.weight", (s["dim"],)
    yield "output.weight", (s["vocab"], s["dim"])


def make(name, shape, rng):
    if len(shape) == 1:  # norms and biases stay F32, as llama.cpp's converter keeps them
        return (np.ones(shape) if name.endswith("norm.weight") else rng.normal(0, 0.02, shape)).astype(np.float32)
    return rng.standard_normal(shape, dtype=np.float32).__imul__(0.02).astype(np.float16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--like", default="chatglm3-6b", choices=list(SHAPES))
    args = ap.parse_args()
    s = SHAPES[args.like]
    w = gguf.GGUFWriter(args.out, "chatglm")
    w.add_name(f"{args.like} (random weights)")
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["dim"])
    w.add_feed_forward_length(s["ffn"])
    w.add_block_count(s["layers"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv"])
    w.add_rope_dimension_count(s["head_dim"] // 2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    specials = ["<unk>", "<s>", "</s>"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(s["vocab"] - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    specs = list(tensors(s, rng))
    for name, shape in specs:
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in specs:
        w.write_tensor_data(make(name, shape, rng))
    w.close()


if __name__ == "__main__":
    main()
