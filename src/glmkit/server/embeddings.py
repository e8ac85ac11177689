"""POST /v1/embeddings, a router of its own: the server includes it when it has an embedding
model (models.bert; `load_embedder` is how `glmkit serve` loads one)."""

from __future__ import annotations

import base64
import struct
from pathlib import Path

from fastapi import APIRouter

from .errors import APIError, StrictJSONRoute
from .openai_requests import EmbeddingRequest
from .openai_responses import Embedding, EmbeddingList, EmbeddingUsage, ErrorResponse
from .state import Server

MAX_INPUTS = 256
router = APIRouter(route_class=StrictJSONRoute, responses={s: {"model": ErrorResponse} for s in (400, 404)})


def load_embedder(path: str | None):
    from ..models.bert import Embedder, default_embedding_path    # torch: only when the server has one
    return Embedder(Path(path) if path else default_embedding_path())


@router.post("/v1/embeddings", response_model=EmbeddingList)
def embeddings(body: EmbeddingRequest, server: Server):
    embedder = server.embedder
    if body.model and body.model not in (embedder.name, "default", "text-embedding-ada-002"):
        raise APIError(404, f"embedding model {body.model!r} not found; this server has {embedder.name!r}",
                       param="model", code="model_not_found")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts or len(texts) > MAX_INPUTS:
        raise APIError(400, f"input must hold 1 to {MAX_INPUTS} strings", param="input")
    vectors, tokens = embedder.embed(texts)
    data = [Embedding(index=i, embedding=base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
                      if body.encoding_format == "base64" else v) for i, v in enumerate(vectors)]
    return EmbeddingList(data=data, model=embedder.name,
                         usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
