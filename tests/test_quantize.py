"""int8 / int4 weight-only quantization on the tiny ChatGLM3 fixtures.

Bounds: the kernels must reproduce a float matmul with the *dequantized* weights to float32
rounding (1e-4), which isolates kernel and packing bugs from quantization noise.  Against the
unquantized model, the noise of the random tiny network is large (its weights are N(0, 0.2) with
no structure), so only int8 is held to a relative bound, and greedy argmax is compared where the
reference's top-1 margin is large."""

import subprocess
import sys

import pytest
import torch

import glmkit
from conftest import TINY, glmkit_bin, reference
from glmkit.models.quantize import (DENSE_COPY_MAX_BYTES, Int4Linear, Int8Linear, QuantConfig, has_dense, dequantize_int4, quantize_int4,
                                    quantize_int8)


@pytest.mark.parametrize("shape", [(96, 64), (256, 512)])
def test_int8_kernel_matches_dequantized_matmul(shape):
    torch.manual_seed(0)
    w, x = torch.randn(*shape), torch.randn(5, shape[1])
    lin = Int8Linear(shape[1], shape[0], bias=False)
    lin.load_float(w, torch.float32)
    q, s = quantize_int8(w)
    assert torch.allclose(lin(x), x @ (q.float() * s[:, None]).T, atol=1e-4)
    assert (q.float() * s[:, None] - w).abs().max() <= s.max() / 2 + 1e-6  # rounding error ≤ half a step


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_kernel_matches_dequantized_matmul(group):
    torch.manual_seed(1)
    w, x = torch.randn(192, 256), torch.randn(3, 2, 256)
    lin = Int4Linear(256, 192, bias=True, group_size=group)
    lin.load_float(w, torch.float32)
    lin.bias = torch.nn.Parameter(torch.randn(192), requires_grad=False)
    q, sz = quantize_int4(w, group)
    deq = dequantize_int4(q, sz, group)
    assert torch.allclose(lin(x), x @ deq.T + lin.bias, atol=1e-4)
    step = sz[..., 0].t().repeat_interleave(group, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-5).all()


def _last_logits(m, ids):
    m.model.setup_caches(1, len(ids))
    return m.model(torch.tensor([ids]), torch.zeros(1, dtype=torch.long))[0]


def test_int8_model_close_to_float_and_greedy_stable(tiny):
    q8 = glmkit.load(TINY, quantize="int8")
    assert isinstance(q8.model.layers[0].attention.wqkv, Int8Linear)
    assert isinstance(q8.model.output, torch.nn.Linear)  # output layer stays float unless asked
    ref = reference(TINY)
    for c in ref["chat_cases"]:
        got = _last_logits(q8, c["input_ids"])
        want = torch.tensor(c["last_logits"])
        assert (got - want).norm() / want.norm() < 0.1, c["name"]
        top2 = want.topk(2).values
        if top2[0] - top2[1] > 0.5:
            assert int(got.argmax()) == c["last_logits_argmax"], c["name"]


def test_int4_falls_back_to_int8_where_groups_do_not_fit():
    m = glmkit.load(TINY, quantize="int4", group_size=64)   # ffn width 160 is not a multiple of 64
    layer = m.model.layers[0]
    assert isinstance(layer.attention.wqkv, Int4Linear)
    assert isinstance(layer.feed_forward.w2, Int8Linear)
    ids = m.encode_chat([{"role": "user", "content": "你好"}])
    assert len(m.generate(ids, max_new_tokens=10, temperature=0, stop_ids=())) == 10


def test_quantize_output_layer_option():
    m = glmkit.load(TINY, quantize="int8", quantize_output=True)
    assert isinstance(m.model.output, Int8Linear)


def test_bad_quantization_options_are_clear_errors():
    with pytest.raises(glmkit.GlmkitError, match="int8 or int4"):
        QuantConfig.parse("int3")
    with pytest.raises(glmkit.GlmkitError, match="group size"):
        QuantConfig.parse("int4", group_size=48)


def test_cli_quantize_flag(clean_env):
    proc = subprocess.run([glmkit_bin(), "chat", "--model", str(TINY), "--quantize", "int4", "--group-size", "32",
                           "-p", "你好", "--max-new-tokens", "5", "--temperature", "0"],
                          capture_output=True, text=True, timeout=120, env=clean_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


# -- quantized checkpoints -------------------------------------------------------------------

@pytest.mark.parametrize("bits,group", [(8, 128), (4, 32)])
def test_saved_checkpoint_loads_to_identical_logits(tmp_path, clean_env, bits, group):
    dst = tmp_path / f"q{bits}"
    proc = subprocess.run([glmkit_bin(), "quantize", str(TINY), str(dst), "--bits", str(bits), "--group-size", str(group)],
                          capture_output=True, text=True, timeout=120, env=clean_env)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in dst.iterdir()} >= {"glmkit-quant.json", "model.safetensors", "config.json", "tokenizer.model"}
    on_load = glmkit.load(TINY, quantize=f"int{bits}", group_size=group, dtype="float32")
    saved = glmkit.load(dst, dtype="float32")
    kind = Int8Linear if bits == 8 else Int4Linear
    assert isinstance(saved.model.layers[1].feed_forward.w13, kind)
    for c in reference(TINY)["chat_cases"][:4]:
        assert torch.equal(_last_logits(on_load, c["input_ids"]), _last_logits(saved, c["input_ids"]))
    assert saved.encode_chat([{"role": "user", "content": "你好"}]) == on_load.encode_chat([{"role": "user", "content": "你好"}])


_EVERY_DTYPE = """
import sys, glmkit
for dtype in (None, "float32", "bfloat16", "float16"):      # every --dtype the CLI offers (None = auto)
    m = glmkit.load(sys.argv[1], dtype=dtype)
    out = m.generate(m.encode_chat([{"role": "user", "content": "Hello"}]), max_new_tokens=4)
    print(dtype, m.model.dtype, len(out))
"""


@pytest.mark.parametrize("bits,group", [(8, 128), (4, 128), (4, 32)])
def test_saved_checkpoint_runs_in_every_dtype(tmp_path, clean_env, bits, group):
    """A checkpoint read back through safetensors' mmap hands the kernels tensors at any file
    offset; bf16 int8 kernels crashed the process on them (SIGSEGV).  int4 g128 covers the int8
    fallback layers.  A subprocess, because the failure is a crash, not an exception."""
    dst = tmp_path / "q"
    subprocess.run([glmkit_bin(), "quantize", str(TINY), str(dst), "--bits", str(bits), "--group-size", str(group)],
                   check=True, capture_output=True, timeout=120, env=clean_env)
    assert (dst / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()
    proc = subprocess.run([sys.executable, "-c", _EVERY_DTYPE, str(dst)], capture_output=True, text=True,
                          timeout=300, env=clean_env)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert len(proc.stdout.splitlines()) == 4
    chat = subprocess.run([glmkit_bin(), "chat", "--model", str(dst), "-p", "Hello", "--max-new-tokens", "4"],
                          capture_output=True, text=True, timeout=120, env=clean_env)
    assert chat.returncode == 0, (chat.returncode, chat.stderr[-2000:])


def _umask() -> int:
    import os
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_kernel_inputs_are_aligned_whatever_the_loader_returns():
    from glmkit.models.quantize import kernel_ready
    buf = torch.zeros(64 * 65, dtype=torch.uint8)
    view = buf[40:40 + 64 * 64].view(torch.int8).view(64, 64)       # contiguous, 40 bytes past alignment
    assert view.data_ptr() % 64 != 0
    ready = kernel_ready(view)
    assert ready.data_ptr() % 64 == 0 and torch.equal(ready, view)
    aligned = torch.zeros(64, 64)
    assert kernel_ready(aligned) is aligned                            # no copy when none is needed
    strided = torch.zeros(64, 128)[:, ::2]
    assert kernel_ready(strided).is_contiguous()


def _quantized_copy(tmp_path):
    from glmkit.models import quantized_checkpoint
    dst = tmp_path / "q"
    quantized_checkpoint.write(TINY, dst, QuantConfig(4, 32))
    return dst


def test_quantized_checkpoint_from_another_format_version(tmp_path):
    import json
    dst = _quantized_copy(tmp_path)
    meta = json.loads((dst / "glmkit-quant.json").read_text())
    meta["format_version"] = 99
    (dst / "glmkit-quant.json").write_text(json.dumps(meta))
    with pytest.raises(glmkit.CheckpointError, match="format version 99.*glmkit quantize"):
        glmkit.load(dst)


def test_corrupt_quantized_checkpoint(tmp_path, clean_env):
    dst = _quantized_copy(tmp_path)
    w = dst / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    proc = subprocess.run([glmkit_bin(), "chat", "--model", str(dst), "-p", "hi"], capture_output=True, text=True,
                          timeout=120, env=clean_env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "model.safetensors" in proc.stderr


def test_quantized_checkpoint_missing_scales(tmp_path):
    from safetensors.torch import load_file, save_file
    dst = _quantized_copy(tmp_path)
    sd = load_file(dst / "model.safetensors")
    sd.pop("layers.0.attention.wo.scales")
    save_file(sd, dst / "model.safetensors")
    with pytest.raises(glmkit.CheckpointError, match="layers.0.attention.wo.qweight has no matching .scales"):
        glmkit.load(dst)


def test_quantize_refuses_gguf_and_non_empty_destination(tmp_path):
    from glmkit.models import quantized_checkpoint
    from glmkit.models.loader import default_model_path
    with pytest.raises(glmkit.CheckpointError, match="reads model directories"):
        quantized_checkpoint.write(default_model_path(), tmp_path / "x", QuantConfig(4))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(glmkit.GlmkitError, match="not empty"):
        quantized_checkpoint.write(TINY, tmp_path / "full", QuantConfig(4))


# -- memory-bounded loading ------------------------------------------------------------------

PEAK_SCRIPT = r"""
import json, sys, threading, time
import torch, glmkit

def anon_kib():  # private memory; mapped checkpoint pages (page cache) are not the model
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1])

# warm up the same code paths on the tiny fixture: one-time allocations (thread pools, kernel
# workspaces) are not the model
glmkit.load(sys.argv[3], quantize=sys.argv[2], group_size=32)
base = anon_kib()
peak, done = [base], []
def sample():
    while not done:
        peak[0] = max(peak[0], anon_kib())
        time.sleep(0.002)
t = threading.Thread(target=sample)
t.start()
m = glmkit.load(sys.argv[1], quantize=sys.argv[2], group_size=128)
done.append(1)
t.join()
print(json.dumps({"growth_kib": max(peak[0], anon_kib()) - base}))
"""


def _synthetic_checkpoint(path, layers=10, hidden=1024, ffn=4096):
    """A ChatGLM3-layout checkpoint of ~300 MB in float16 (as ChatGLM3 ships), one layer per shard:
    above DENSE_COPY_MAX_BYTES, so its quantized layers keep no dense copy (smaller models do, by design)."""
    import json
    import shutil

    from safetensors.torch import save_file
    path.mkdir()
    cfg = json.loads((TINY / "config.json").read_text())
    heads, kv = hidden // 128, 128
    cfg.update(hidden_size=hidden, num_layers=layers, num_attention_heads=heads, kv_channels=kv,
               multi_query_group_num=2, ffn_hidden_size=ffn, seq_length=512)
    (path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(TINY / "tokenizer.model", path / "tokenizer.model")
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    shards = [{"transformer.embedding.word_embeddings.weight": torch.randn(2048, hidden, generator=g)}]
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}."
        shards.append({p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden),
                       p + "self_attention.query_key_value.weight": torch.randn(hidden + 2 * 2 * kv, hidden, generator=g) * 0.02,
                       p + "self_attention.query_key_value.bias": torch.zeros(hidden + 2 * 2 * kv),
                       p + "self_attention.dense.weight": torch.randn(hidden, hidden, generator=g) * 0.02,
                       p + "mlp.dense_h_to_4h.weight": torch.randn(2 * ffn, hidden, generator=g) * 0.02,
                       p + "mlp.dense_4h_to_h.weight": torch.randn(hidden, ffn, generator=g) * 0.02})
    shards.append({"transformer.encoder.final_layernorm.weight": torch.ones(hidden),
                   "transformer.output_layer.weight": torch.randn(2048, hidden, generator=g) * 0.02})
    total = 0
    for n, shard in enumerate(shards):
        fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: t.half() for k, t in shard.items()}, str(path / fname))
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * 2
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def test_quantize_on_load_never_holds_the_float_model(tmp_path, clean_env):
    import json
    ckpt = tmp_path / "synthetic"
    float_bytes = _synthetic_checkpoint(ckpt)
    assert 0.9 * float_bytes > DENSE_COPY_MAX_BYTES          # its layers' bf16 weights: no dense copy
    growth = {}
    # glibc's adaptive mmap threshold keeps freed temporaries in the heap, so RSS would depend on
    # allocation order; a fixed threshold makes the measure what is alive
    env = dict(clean_env, MALLOC_MMAP_THRESHOLD_="131072")
    for mode in ("none", "int4"):
        proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(ckpt), mode, str(TINY)], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        growth[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["growth_kib"] * 1024
    # Loading to float32 materializes the model (2x the fp16 bytes).  The int4 model is ~0.28x the
    # fp16 bytes (4-bit layers, bf16 embeddings), plus the transients of the one tensor being
    # quantized (its fp16 copy, uint8 codes, float chunks: ~0.2x here, where one tensor is 1/15
    # of the model).  Holding even the fp16 model once would exceed the bound.
    assert growth["none"] > 1.8 * float_bytes, (growth, float_bytes)
    assert growth["int4"] < 0.6 * float_bytes, (growth, float_bytes)


def test_perplexity_int8_and_int4_close_to_bf16(clean_env):
    """Issue's quality bar on the default model and a text shipped with the tests: int8 within 1%
    of bf16, int4 within 5%.  int4 uses group 32 here: the model's own Q4_1 blocks are groups of
    32, and re-grouping them to 64 costs far more (see docs/BENCHMARKS.md)."""
    import json
    from conftest import FIXTURES
    ppl = {}
    for label, args in {"bf16": ["--quantize", "none", "--dtype", "bfloat16"], "int8": ["--quantize", "int8"],
                        "int4": ["--quantize", "int4", "--group-size", "32"]}.items():
        out = FIXTURES.parent.parent / "test-artifacts" / f"ppl-{label}.json"
        out.parent.mkdir(exist_ok=True)
        proc = subprocess.run([glmkit_bin(), "bench", "--perplexity", str(FIXTURES / "perplexity_en.txt"),
                               "--json", str(out), *args], capture_output=True, text=True, timeout=300, env=clean_env)
        assert proc.returncode == 0, proc.stderr
        assert "perplexity" in proc.stdout
        ppl[label] = json.loads(out.read_text())["perplexity"]["perplexity"]
    assert 5 < ppl["bf16"] < 100  # a real language model on English prose
    assert abs(ppl["int8"] / ppl["bf16"] - 1) < 0.01, ppl
    assert abs(ppl["int4"] / ppl["bf16"] - 1) < 0.05, ppl


def test_bench_random_like_reports_every_figure(tmp_path, clean_env):
    import json
    out = tmp_path / "bench.json"
    proc = subprocess.run([glmkit_bin(), "bench", "--random-like", "smollm2-135m", "--quantize", "int8",
                           "--batch", "1,2", "--prompt-tokens", "16", "--new-tokens", "4", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=clean_env)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert [run["batch"] for run in r["runs"]] == [1, 2]
    for key in ("ttft_s", "prefill_tok_s", "decode_ms_per_step", "decode_tok_s"):
        assert all(run[key] > 0 for run in r["runs"])
    assert r["model_bytes"] > 0 and r["load_s"] > 0 and r["peak_rss_mib"] > 0
    assert "decode ms/step" in proc.stdout


# -- many-row paths (models/quantize.py: chosen by row count) ----------------------------------

def _prefill_and_one_by_one(model, ids):
    """Logits at every position: one multi-row prefill, and one token per call (the one-row kernels)."""
    tm = model.model
    with torch.inference_mode():
        tm.setup_caches(1, len(ids) + 1)
        together = tm(torch.tensor([ids]), torch.tensor([0]), all_logits=True)[0].float()
        alone = torch.stack([tm(torch.tensor([[t]]), torch.tensor([i]))[0].float() for i, t in enumerate(ids)])
    return together, alone


def test_dense_copy_decodes_eight_rows_within_what_bf16_already_differs(smol):
    """The default model keeps dense copies (bf16-rounded dequantized weights) for decode steps of
    8+ sequences; a prefill, and a step of fewer rows, keep the int4 kernel, whose result for a row
    does not depend on the others.  The bound: a row's logits in a dense 8-row step differ from the
    same row decoded alone by no more (mean |diff|, logits of std ~7) than bf16 activations already
    make prefill and one-token-at-a-time logits differ (~0.17), and the most likely token is the
    same wherever it is not a near tie."""
    tm = smol.model
    layers = [m for m in tm.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    assert layers and all(has_dense(m) for m in layers)
    prompts = [smol.encode_chat([{"role": "user", "content": f"Tell me about {topic}."}])
               for topic in ("the sea", "a dragon", "winter", "trains", "the moon", "a robot", "bread", "rain")]
    with torch.inference_mode():
        tm.setup_caches(8, 64)
        nexts = []
        for r, ids in enumerate(prompts):
            logits = tm(torch.tensor([ids]), torch.tensor([0]), rows=torch.tensor([r]))
            nexts.append(int(logits[0].argmax()))
        tokens, start = torch.tensor(nexts)[:, None], torch.tensor([len(p) for p in prompts])
        alone = torch.stack([tm(tokens[r:r + 1], start[r:r + 1], rows=torch.tensor([r]))[0] for r in range(8)]).float()
        together = tm(tokens, start).float()                                          # dense, 8 rows
        noise, _ = _prefill_and_one_by_one(smol, prompts[0])
    prefill_noise = (noise - _prefill_and_one_by_one(smol, prompts[0])[1]).abs().mean()
    assert 0 < (together - alone).abs().mean() <= max(0.25, 1.25 * prefill_noise)
    top2 = alone.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 0.5
    assert torch.equal(together.argmax(-1)[clear], alone.argmax(-1)[clear])


def test_int8_dequantized_prefill_matches_the_kernel(monkeypatch):
    """A model too large for dense copies converts int8 weights for prefill-sized matmuls: the same
    int8 values and scales as the kernel, so in float32 only summation order differs."""
    import glmkit.models.quantize as quantize
    monkeypatch.setattr(quantize, "DENSE_COPY_MAX_BYTES", 0)
    m = glmkit.load(TINY, quantize="int8", dtype="float32")
    assert not has_dense(m.model.layers[0].feed_forward.w13)
    ids = m.encode_chat([{"role": "user", "content": "你好, please answer in a long and detailed way. " * 8}])
    assert len(ids) >= quantize.DEQUANT_MIN_ROWS
    together, alone = _prefill_and_one_by_one(m, ids)
    assert (together - alone).abs().max() <= 1e-4 * alone.abs().max()


@pytest.mark.parametrize("rows", [8, 9, 16, 32])
def test_prepacked_dense_copy_gives_the_bits_of_the_plain_one(rows):
    """A bf16 dense copy is kept prepacked for oneDNN (keep_dense); F.linear on the plain copy runs
    the same oneDNN kernel, so the bits must not change, eagerly or compiled."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this build")
    from glmkit.models.quantize import dense_linear, keep_dense
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(3072, 576, generator=g) * 0.05).bfloat16()
    x = torch.randn(rows, 576, generator=g).bfloat16()
    mod = Int4Linear(576, 3072, bias=False, group_size=32)
    keep_dense(mod, w)
    assert mod.packed is not None and mod.dense is None and has_dense(mod)
    assert torch.equal(dense_linear(mod, x), torch.nn.functional.linear(x, w))
    compiled = torch.compile(lambda m, t: dense_linear(m, t) * 2, fullgraph=True)
    assert torch.equal(compiled(mod, x), torch.nn.functional.linear(x, w) * 2)
    keep_dense(mod, w.float())                 # float32: plain (MKL's GEMM, not oneDNN's)
    assert mod.packed is None and mod.dense is not None


def test_a_large_bf16_model_runs_its_layers_on_prepacked_weights(tmp_path, monkeypatch):
    """Above DENSE_COPY_MAX_BYTES a bf16 model's Linears keep only oneDNN-prepacked weights
    (PackedLinear, the faster way to read them at one row); its logits stay within bf16's rounding
    of the float32 model's, and the compiled step gives the eager step's greedy tokens."""
    from glmkit.engine import GenerationRequest, SamplingParams, Scheduler
    from glmkit.engine.compiled_step import CompiledDecode
    from glmkit.models.quantize import PackedLinear
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this build")
    ckpt = tmp_path / "synthetic"
    # 2 layers (~60 MB in bf16) above a limit lowered for the test: the same path as ~300 MB above
    # the real one, at a fifth of the time (loading, two models, a compilation)
    _synthetic_checkpoint(ckpt, layers=2)
    monkeypatch.setattr("glmkit.models.loader.DENSE_COPY_MAX_BYTES", 32 << 20)
    bf16 = glmkit.load(ckpt, dtype="bfloat16")
    layer = bf16.model.layers[0]
    assert all(isinstance(m, PackedLinear) for m in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13,
                                                      layer.feed_forward.w2, bf16.model.output))
    assert not any(isinstance(m, torch.nn.Linear) for m in bf16.model.modules())      # no plain copy kept
    ref = glmkit.load(ckpt, dtype="float32")
    ids = ref.encode_chat([{"role": "user", "content": "你好"}])
    logits = []
    for m in (bf16, ref):
        m.model.setup_caches(1, len(ids))
        logits.append(m.model(torch.tensor([ids]), torch.zeros(1, dtype=torch.long))[0].float())
    assert (logits[0] - logits[1]).norm() / logits[1].norm() < 0.02
    prompt = bf16.encode_chat([{"role": "user", "content": "写一首诗"}])
    eager = Scheduler(bf16.model, max_batch=1)
    want = [e.token for e in eager.submit(GenerationRequest(prompt, SamplingParams(temperature=0), 8))]
    eager.stop()
    compiled = CompiledDecode(bf16.model, 1, background=False)
    s = Scheduler(bf16.model, max_batch=1, compile=compiled)
    compiled.compile([1])
    got = [e.token for e in s.submit(GenerationRequest(prompt, SamplingParams(temperature=0), 8))]
    s.stop()
    assert got == want and compiled.calls[1] > 0 and not compiled.failed
