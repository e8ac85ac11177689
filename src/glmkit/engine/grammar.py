"""Constrained decoding: a grammar turned into a per-row token mask, through llguidance.

llguidance (Microsoft's Rust library behind Guidance, also in llama.cpp, vLLM and SGLang)
compiles a JSON schema or a Lark grammar against a vocabulary given as token bytes, and computes
the next allowed tokens in tens of microseconds on CPU.  It needs nothing else from the tokenizer,
so every vocabulary glmkit reads (SentencePiece, tiktoken, tokenizer.json, GGUF) works the same
way; special tokens are marked as such and are never allowed inside the grammar, only the stop
ids once the grammar is complete (docs/BENCHMARKS.md compares it with the alternative).

The engine sees only `SamplingParams.grammar` (a Grammar: compiled once, shared by the rows of a
request) and a `Matcher` per row: `mask(logits)` before sampling, `consume(token)` after.
"""

from __future__ import annotations

import json
import sys

import torch

from ..errors import GrammarError


class Vocabulary:
    """A model's vocabulary as llguidance sees it: each id's bytes, specials marked, the stop ids
    that may end a complete grammar.  Built once per model (~0.1 s for 50k tokens)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids):
        import llguidance
        if sys.byteorder != "little":
            raise GrammarError("constrained decoding reads token masks as little-endian words")
        tokens, specials = [], []
        for i in range(vocab_size):
            data = tokenizer.token_bytes(i) if i < tokenizer.vocab_size else b""
            if not data or tokenizer.is_special(i):
                specials.append(i)
                data = b"\xff" + f"<[{i}]>".encode()     # llguidance's mark for a special token
            tokens.append(data)
        stops = sorted(int(s) for s in stop_ids if 0 <= s < vocab_size)
        if not stops:
            raise GrammarError("constrained decoding needs a stop token the grammar can end with")

        single = {t: i for i, t in reversed(list(enumerate(tokens))) if len(t) == 1}

        def exact(text: str) -> list[int]:
            """Ids whose bytes are exactly `text` (llguidance trusts this for text it forces).  A
            SentencePiece encoder adds a word-start space; then one token per byte instead."""
            ids = tokenizer.encode(text)
            want = text.encode("utf-8")
            if b"".join(tokens[i] for i in ids if i < len(tokens)) == want:
                return ids
            if ids and tokens[ids[0]] == b" " and b"".join(tokens[i] for i in ids[1:]) == want:
                return ids[1:]
            return [single[b] for b in (bytes([c]) for c in want) if b in single]

        class _Wrapped:      # what llguidance's TokenizerWrapper reads
            eos_token_id, bos_token_id, special_token_ids = stops[0], None, specials

            def __call__(self, text):
                if isinstance(text, bytes):
                    raise TypeError("text only")          # the wrapper then passes str
                return exact(text)
        _Wrapped.tokens = tokens
        self.lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped()), n_vocab=vocab_size,
                                                  eos_token=stops)
        self.vocab_size = vocab_size
        # byte value -> its 8 bits as "blocked" flags, lowest bit first (llguidance's order); the
        # mask's words are read as bytes in memory order, which is token order on little-endian CPUs
        self._blocked_bits = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1) == 0

    def json_grammar(self, schema: dict, prefix: str = "", suffix: str = "") -> "Grammar":
        """A grammar for one JSON value matching `schema` (compact: no whitespace between items),
        between the literals `prefix` (e.g. ChatGLM3's empty metadata line) and `suffix` (e.g. the
        end of a tagged tool call)."""
        from llguidance import LLMatcher
        if not isinstance(schema, dict):
            raise GrammarError("a JSON schema must be an object")
        # compact JSON, written as json.dumps writes it: no newlines, ", " and ": " separators
        options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        try:
            body = json.dumps(dict(schema, **{"x-guidance": options}), ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise GrammarError(f"the schema is not JSON: {e}") from None
        parts = [json.dumps(prefix)] * bool(prefix) + ["value"] + [json.dumps(suffix)] * bool(suffix)
        lark = f"start: {' '.join(parts)}\nvalue: %json {body}\n"
        grammar = LLMatcher.grammar_from_lark(lark)
        error = LLMatcher.validate_grammar(grammar, self.lltokenizer)
        if error and not error.startswith("WARNING"):
            raise GrammarError(f"the schema cannot be used to constrain the reply: {error.splitlines()[0][:300]}")
        return Grammar(self, grammar)

    def blocked(self, words: torch.Tensor) -> torch.Tensor:
        """llguidance's bitmask (int32 words, one bit per token) -> bool [vocab_size], True where
        the token is not allowed."""
        flags = torch.index_select(self._blocked_bits, 0, words.view(torch.uint8).int())   # ~25 us for 49k tokens
        return flags.flatten()[:self.vocab_size]


class Grammar:
    """A compiled grammar: immutable, shared by every row of a request; each row takes a matcher."""

    def __init__(self, vocab: Vocabulary, grammar: str):
        self.vocab, self.grammar = vocab, grammar

    def matcher(self) -> "Matcher":
        return Matcher(self)


class Matcher:
    """One row's place in its grammar.  Tokens the engine forces (a request's forced prefix) come
    before the grammar and are not fed to it."""

    def __init__(self, grammar: Grammar):
        from llguidance import LLMatcher
        self.vocab = grammar.vocab
        self._m = LLMatcher(grammar.vocab.lltokenizer, grammar.grammar, log_level=0)
        self._words = torch.empty((grammar.vocab.vocab_size + 31) // 32, dtype=torch.int32)
        self.failed: str | None = None if not self._m.is_error() else self._m.get_error()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [V] with every token the grammar does not allow next set to -inf (~0.1 ms for
        a 49k vocabulary: the mask is written into this row's buffer, no copy)."""
        if self.failed:
            return logits
        self._m.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        if self._m.is_error():              # (a matcher with nothing left to allow is in error)
            self.failed = self._m.get_error()
            return logits
        return logits.masked_fill(self.vocab.blocked(self._words)[:logits.shape[-1]], float("-inf"))

    def consume(self, token: int) -> None:
        if not self.failed and not self._m.consume_token(token):
            self.failed = self._m.get_error() or f"token {token} is not allowed here"
