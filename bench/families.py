"""Every model family at one size through `glmkit bench`, decode speed against the Llama path's.

Writes a checkpoint directory per family the way its publisher ships it (tensor names, config.json
fields, tokenizer files), all with the same shapes and random bf16 weights, then runs
`glmkit bench --model DIR` on each, families alternated within each round, and reports each
family's median decode ms/step over the Llama directory's (issue 13's goal: within 10%).

    .venv/bin/python bench/families.py [--rounds 2] [--quantize none,int8] [--workdir /tmp/glmkit-families]

Shapes: 12 layers, width 1536, 12 heads of 128 with 2 KV groups, SwiGLU 4096, vocab 65024
(ChatGLM3's; the same for every family so only the family's switches differ: QKV bias, partial
rotary, fused tensors as loaded).
"""

import argparse
import base64
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GLMKIT = ROOT / ".venv" / "bin" / "glmkit"
LAYERS, DIM, HEADS, KV, HEAD_DIM, FFN, VOCAB = 12, 1536, 12, 2, 128, 4096, 65024
FAMILIES = ["llama", "mistral", "qwen2", "glm4-hf", "glm4", "chatglm3"]
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>"]


def rand(*shape, g):
    return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)


def hf_state(family: str, g) -> dict:
    bias, fused = family in ("qwen2", "glm4-hf"), family == "glm4-hf"
    sd = {"model.embed_tokens.weight": rand(VOCAB, DIM, g=g), "model.norm.weight": torch.ones(DIM, dtype=torch.bfloat16),
          "lm_head.weight": rand(VOCAB, DIM, g=g)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"] = torch.ones(DIM, dtype=torch.bfloat16)
        for name, rows in (("q", HEADS * HEAD_DIM), ("k", KV * HEAD_DIM), ("v", KV * HEAD_DIM)):
            sd[p + f"self_attn.{name}_proj.weight"] = rand(rows, DIM, g=g)
            if bias:
                sd[p + f"self_attn.{name}_proj.bias"] = rand(rows, g=g)
        sd[p + "self_attn.o_proj.weight"] = rand(DIM, HEADS * HEAD_DIM, g=g)
        if fused:
            sd[p + "mlp.gate_up_proj.weight"] = rand(2 * FFN, DIM, g=g)
        else:
            sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = rand(FFN, DIM, g=g), rand(FFN, DIM, g=g)
        sd[p + "mlp.down_proj.weight"] = rand(DIM, FFN, g=g)
    return {k: v.clone() for k, v in sd.items()}      # the norms share storage above; safetensors wants each alone


def chatglm_state(g) -> dict:
    sd = {"transformer.embedding.word_embeddings.weight": rand(VOCAB, DIM, g=g),
          "transformer.encoder.final_layernorm.weight": torch.ones(DIM, dtype=torch.bfloat16),
          "transformer.output_layer.weight": rand(VOCAB, DIM, g=g)}
    qkv = (HEADS + 2 * KV) * HEAD_DIM
    for i in range(LAYERS):
        p = f"transformer.encoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(DIM, dtype=torch.bfloat16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(DIM, dtype=torch.bfloat16)
        sd[p + "self_attention.query_key_value.weight"], sd[p + "self_attention.query_key_value.bias"] = \
            rand(qkv, DIM, g=g), rand(qkv, g=g)
        sd[p + "self_attention.dense.weight"] = rand(DIM, HEADS * HEAD_DIM, g=g)
        sd[p + "mlp.dense_h_to_4h.weight"] = rand(2 * FFN, DIM, g=g)
        sd[p + "mlp.dense_4h_to_h.weight"] = rand(DIM, FFN, g=g)
    return sd


def ranks_file(path: Path):
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))


def write_family(family: str, out: Path):
    from safetensors.torch import save_file
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    if family in ("glm4", "chatglm3"):
        save_file(chatglm_state(g), str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps({
            "model_type": "chatglm", "architectures": ["ChatGLMModel"], "num_layers": LAYERS, "hidden_size": DIM,
            "ffn_hidden_size": FFN, "kv_channels": HEAD_DIM, "num_attention_heads": HEADS,
            "multi_query_attention": True, "multi_query_group_num": KV, "padded_vocab_size": VOCAB,
            "seq_length": 8192, "add_qkv_bias": True, "rope_ratio": 500 if family == "glm4" else 1,
            "_name_or_path": f"{family}-random"}))
        if family == "glm4":
            ranks_file(out / "tokenizer.model")
        else:
            shutil.copy(ROOT / "../shared/fixtures/chatglm3-tiny/tokenizer.model", out / "tokenizer.model")
        return
    save_file(hf_state(family, g), str(out / "model.safetensors"))
    kind = {"glm4-hf": "glm"}.get(family, family)
    cfg = {"model_type": kind, "hidden_size": DIM, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False, "_name_or_path": f"{family}-random"}
    if kind == "glm":
        cfg.update(attention_bias=True, partial_rotary_factor=0.5)
    (out / "config.json").write_text(json.dumps(cfg))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    specials = GLM4_SPECIALS if kind == "glm" else ["<|eot|>"]
    tok.add_special_tokens(specials)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": specials[0], "chat_template": "{% for m in messages %}{{ m['content'] }}<|eot|>{% endfor %}"}))


def bench(model: Path, args, quantize: str, js: Path) -> dict:
    cmd = [GLMKIT, "bench", "--model", model, "--quantize", quantize, "--prompt-tokens", args.prompt_tokens,
           "--new-tokens", args.new_tokens, "--json", js]
    print("$", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    subprocess.run(list(map(str, cmd)), check=True, capture_output=True, text=True)
    r = json.loads(js.read_text())
    return {"decode_ms": r["runs"][0]["decode_ms_per_step"], "prefill_tok_s": r["runs"][0]["prefill_tok_s"],
            "load_s": r["load_s"], "model_bytes": r["model_bytes"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quantize", default="none,int8")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/glmkit-families"))
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "families.json")
    args = ap.parse_args()
    for fam in FAMILIES:
        if not (args.workdir / fam).exists():
            write_family(fam, args.workdir / fam)
    quants = args.quantize.split(",")
    runs = {q: {f: [] for f in FAMILIES} for q in quants}
    for rnd in range(args.rounds):
        order = FAMILIES if rnd % 2 == 0 else FAMILIES[::-1]      # alternate, so drift is not one family's
        for q in quants:
            for fam in order:
                runs[q][fam].append(bench(args.workdir / fam, args, q, args.workdir / f"{fam}-{q}.json"))
    summary = {}
    for q in quants:
        base = statistics.median(r["decode_ms"] for r in runs[q]["llama"])
        summary[q] = {f: {"decode_ms": statistics.median(r["decode_ms"] for r in rs),
                          "over_llama": statistics.median(r["decode_ms"] for r in rs) / base} for f, rs in runs[q].items()}
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), "threads": torch.get_num_threads(),
              "shapes": dict(layers=LAYERS, dim=DIM, heads=HEADS, kv=KV, head_dim=HEAD_DIM, ffn=FFN, vocab=VOCAB),
              "runs": runs, "summary": summary}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for q in quants:
        print(f"\n{q}: decode ms/step (median of {args.rounds}), ratio to the Llama directory")
        for f, s in summary[q].items():
            print(f"  {f:10s} {s['decode_ms']:8.1f} ms   {s['over_llama']:.3f}x")


if __name__ == "__main__":
    main()
