"""Prefix caching: a finished sequence's keys and values stay in its cache row for the next one.

A conversation's next turn (and any request sharing a long system prompt, like ChatGLM3's tool
message) begins with tokens some earlier sequence already ran.  When a sequence leaves its slot,
the row keeps its contents and we remember which tokens they are; when a new sequence is admitted,
the free row holding the longest common prefix of its prompt donates those positions (copied into
the new sequence's row unless it is that row), and prefill starts after them.  Keys and values are
those of one LoRA adapter (or none: models/lora.py): a row donates only to sequences of its own.

Running sequences donate too: positions below a sequence's current one are never rewritten, so
streams sharing a system prompt admitted together prefill it once.  Bounded by the pool: only rows
that no running sequence holds keep anything.  The scheduler places
sequences in the lowest free row (decode reads a packed view of the cache); before it overwrites a
kept prefix there, the prefix moves to the free row whose own contents were used least recently
(LRU eviction).  Any write to the cache that the scheduler did not make (the model used directly,
another scheduler) shows as a changed `Transformer.cache_version`, and everything kept is forgotten.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

# Copying a few positions between rows costs more than recomputing them is worth bookkeeping for.
MIN_COPY = 16


@dataclass
class _Kept:
    tokens: list[int]           # what the row's positions 0..len-1 hold
    used: int                   # when it was kept or last donated (a counter, for LRU)
    adapter: int = 0            # the LoRA adapter they were computed with (0: none)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    def __init__(self, rows: int, enabled: bool = True):
        self.enabled = enabled
        self._kept: list[_Kept | None] = [None] * rows
        self._clock = itertools.count()
        self.hit_tokens = 0          # prompt tokens not prefilled thanks to a kept prefix
        self.hits = 0

    def forget_all(self):
        self._kept = [None] * len(self._kept)

    def keep(self, row: int, tokens: list[int], adapter: int = 0):
        """Row `row` now holds `tokens`, computed with LoRA adapter `adapter` (a sequence left it)."""
        if self.enabled and tokens:
            self._kept[row] = _Kept(tokens, next(self._clock), adapter)

    def drop(self, row: int):
        self._kept[row] = None

    def admit(self, model, prompt: list[int], row: int, free: list[int], running: list[tuple[int, list[int]]],
              cache_rows: int, adapter: int = 0) -> int:
        """A sequence with `prompt` takes row `row`.  Donors: what free rows keep, and what running
        sequences have computed so far (`running`: (row, tokens); positions below a running
        sequence's own are never written again).  Arranges the cache and returns how many prompt
        tokens are already in the row (fewer than the prompt: its last token must run to give the
        first logits).  `cache_rows`: rows the cache has now.  `adapter`: the sequence's LoRA
        adapter; only rows kept with the same one donate (`running` holds only such sequences)."""
        if not self.enabled:
            return 0
        sources = [(r, self._kept[r].tokens) for r in free
                   if self._kept[r] is not None and self._kept[r].adapter == adapter] + running
        best, best_n = None, 0
        for r, tokens in sources:
            n = min(common_prefix(tokens, prompt), len(prompt) - 1)
            if n > best_n or (n == best_n and n and r == row):     # no copy beats a copy
                best, best_n = r, n
        if best is not None and best != row and best_n < MIN_COPY:
            best, best_n = None, 0
        self._save(model, row, best, free, cache_rows)
        self._kept[row] = None          # the row is the new sequence's now
        if best is None:
            return 0
        if best != row:
            model.copy_cache(best, row, best_n)
        if self._kept[best] is not None:
            self._kept[best].used = next(self._clock)
        self.hits += 1
        self.hit_tokens += best_n
        return best_n

    def _save(self, model, row: int, donor: int | None, free: list[int], cache_rows: int):
        """Before `row` is overwritten, move what it keeps to the least recently used free row."""
        kept = self._kept[row]
        if kept is None or donor == row or len(kept.tokens) < MIN_COPY:
            return
        spare = [r for r in free if r not in (row, donor) and r < cache_rows]
        if not spare:
            return
        target = min(spare, key=lambda r: -1 if self._kept[r] is None else self._kept[r].used)
        if self._kept[target] is not None and self._kept[target].used > kept.used:
            return                      # everything else kept is newer: this one is the LRU
        model.copy_cache(row, target, len(kept.tokens))
        self._kept[target] = kept
