"""The CUDA path. Skipped on machines without a GPU (CI has none); run on a GPU host with `make test`."""

import pytest
import torch

import glmkit
from conftest import TINY, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-3), ("float16", 5e-2), ("bfloat16", 2e-1)])
def test_reference_logits_on_cuda(dtype, atol):
    m = glmkit.load(TINY, device="cuda", dtype=dtype)
    assert m.model.device.type == "cuda"
    for c in reference(TINY)["chat_cases"][:3]:
        ids = m.encode_chat(c["history"] + [{"role": c["role"], "content": c["query"]}])
        m.model.setup_caches(1, len(ids))
        logits = m.model(torch.tensor([ids], device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda"))[0]
        assert torch.allclose(logits.float().cpu(), torch.tensor(c["last_logits"]), atol=atol, rtol=0)


def test_default_dtype_on_cuda_is_float16_and_generates():
    m = glmkit.load(TINY, device="cuda")
    assert m.model.dtype == torch.float16
    ids = m.encode_chat([{"role": "user", "content": "你好"}])
    assert len(m.generate(ids, max_new_tokens=8, temperature=0, stop_ids=())) == 8


@pytest.mark.parametrize("quantize,group", [("int8", 128), ("int4", 32)])
def test_quantized_on_cuda_generates(quantize, group):
    m = glmkit.load(TINY, device="cuda", quantize=quantize, group_size=group)
    ids = m.encode_chat([{"role": "user", "content": "你好"}])
    assert len(m.generate(ids, max_new_tokens=8, temperature=0, stop_ids=())) == 8
