"""A sharded checkpoint's index, as Hugging Face writes it: which shard file holds each tensor.

One reader for every loader that meets one (models/hf_chatglm.py for the weights, models/ptuning.py
for a P-tuning v2 prefix saved with the whole model).  Metadata only: no torch."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError

# safetensors' index first: a directory with both is read from its safetensors shards
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_shard_index(path: Path) -> tuple[str, dict[str, str]] | None:
    """(the index's file name, its weight_map: tensor name -> shard file name) of the first index in
    `path`, or None when it has none; CheckpointError when that index is not a valid one."""
    for name in INDEXES:
        index = path / name
        if index.is_file():
            try:
                return name, json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError, OSError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
    return None
