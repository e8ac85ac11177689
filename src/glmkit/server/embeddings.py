"""POST /v1/embeddings."""

from __future__ import annotations

import base64
import struct
from pathlib import Path

from ..models.bert import Embedder, default_embedding_path
from .schemas import EmbeddingRequest

MAX_INPUTS = 256


def load_embedder(path: str | None) -> Embedder:
    return Embedder(Path(path) if path else default_embedding_path())


def add_embedding_routes(app, embedder: Embedder, APIError):
    @app.post("/v1/embeddings")
    def embeddings(body: EmbeddingRequest):
        if body.model and body.model not in (embedder.name, "default", "text-embedding-ada-002"):
            raise APIError(404, f"embedding model {body.model!r} not found; this server has {embedder.name!r}",
                           param="model", code="model_not_found")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts or len(texts) > MAX_INPUTS:
            raise APIError(400, f"input must hold 1 to {MAX_INPUTS} strings", param="input")
        vectors, tokens = embedder.embed(texts)
        data = []
        for i, v in enumerate(vectors):
            emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if body.encoding_format == "base64" else v
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": embedder.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
