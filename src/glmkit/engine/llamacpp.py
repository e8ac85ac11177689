"""llama.cpp's `llama-server` as a remote engine (`kind: llamacpp`), spoken to in its native
dialect: a prompt of ids posted to `/completion`, the ids back in `tokens`.

LlamaCppBackend is engine/remote.py's RemoteBackend with this dialect's check (GET /props), request
body and stream (LlamaCppStream); everything else (the client, the load, the reader thread, the
errors) is the generic remote engine's.  Its /v1/completions cannot be used instead: it takes
ids but names the tokens it returns in text.

httpx is imported on first use, as in engine/remote.py."""

from __future__ import annotations

from .remote import EngineUnavailable, RemoteBackend, RemoteStream, error_message, exception_text, retrying
from .requests import SamplingParams, TokenEvent

HELD_MAX = 3                  # most tokens llama-server holds back inside one UTF-8 character (4 bytes)


class LlamaCppStream(RemoteStream):
    """One sequence from llama.cpp's llama-server, in its native streamed /completion: a chunk per
    token, {"tokens": [id], "tokens_predicted": n, "content": text, "completion_probabilities":
    [...]}, then a last chunk {"stop": true, "stop_type": "eos" | "limit", ...} without a token.

    Where it differs from vLLM's dialect, this class makes up the difference:
    - no stop ids: each token is checked here, and the first stop id ends the sequence ("stop",
      that id last) and closes the request, which the engine sees as its client gone;
    - the finish reason comes after the last token: a token is handed on when the next chunk
      arrives, unless our own rules end the sequence with it (a stop id, the budget) -- one
      token's delay in all, so that the last event always carries its finish;
    - a token whose text ends inside a UTF-8 character is not sent at all: the next chunk holds
      only the completing token's id, with the text of both.  tokens_predicted says how many
      were held, and their ids are named from the bytes they must have had (the chunk's text
      less the completing token's bytes), only when exactly one sequence of that many vocabulary
      tokens spells them; anything else is an error, never a guess.  Their logprobs are not
      reported (llama-server sends none for them)."""

    path = "/completion"

    def __init__(self, backend, prompt, params, stop_ids, max_new, logprobs, forced):
        self._received = 0              # tokens from the engine so far (after any forced ones)
        self._budget = max_new - len(forced)
        self._pending: TokenEvent | None = None     # received, not yet handed on
        super().__init__(backend, prompt, params, stop_ids, max_new, logprobs, forced)

    def _chunk(self, chunk: dict) -> bool:
        url = self.backend.url
        if "error" in chunk:
            err = chunk["error"]
            message = err.get("message", err) if isinstance(err, dict) else err
            raise EngineUnavailable(f"the engine at {url} failed during generation: {message}")
        predicted = chunk.get("tokens_predicted")
        if chunk.get("stop") is True:
            return self._last(chunk, predicted)
        tokens = chunk.get("tokens") or []
        if not tokens:
            return False                # a prompt-progress chunk, or one before the first token
        if len(tokens) != 1 or not isinstance(predicted, int):
            raise EngineUnavailable(f"the engine at {url} sent a chunk that is not llama-server's "
                                    "(one id in `tokens`, `tokens_predicted`; was return_tokens honoured?)")
        [tok] = tokens
        held = predicted - self._received - 1
        events = [TokenEvent(t) for t in self._withheld(held, chunk.get("content") or "", tok)] if held else []
        last = TokenEvent(tok)
        if self.logprobs is not None:
            [probs] = chunk.get("completion_probabilities") or [None]
            if probs:
                last.logprob = probs.get("logprob")
                if self.logprobs:
                    last.top_logprobs = [(p["id"], p["logprob"]) for p in probs.get("top_logprobs") or ()
                                         ][:self.logprobs]
        for ev in (*events, last):
            if self._take(ev):
                return True
        return False

    def _take(self, ev: TokenEvent) -> bool:
        """One more token of the sequence; True when it ends it (then it is handed on with its finish)."""
        self._received += 1
        self.backend.scheduler.stats.generated_tokens += 1
        if ev.token in self.stop_ids or self._received >= self._budget:
            ev.finish = "stop" if ev.token in self.stop_ids else "length"
        self._flush()
        if ev.finish:
            self._done = True
            self._put(ev)
            return True
        self._pending = ev
        return False

    def _flush(self):
        if self._pending is not None:
            self._put(self._pending)
            self._pending = None

    def _last(self, chunk: dict, predicted) -> bool:
        """The engine's own end: at an end-of-generation token (llama.cpp ends at each of the model's,
        ours among them) or the slot's context."""
        url = self.backend.url
        if isinstance(predicted, int) and predicted > self._received:
            raise EngineUnavailable(f"the engine at {url} ended the sequence inside a UTF-8 character, "
                                    f"without the ids of its last {predicted - self._received} tokens")
        stop_type = chunk.get("stop_type")
        if self._pending is None or stop_type not in ("eos", "limit"):
            raise EngineUnavailable(f"the engine at {url} ended the sequence with stop_type {stop_type!r} "
                                    f"after {self._received} tokens")
        ev, self._pending = self._pending, None
        ev.finish = "stop" if stop_type == "eos" else "length"
        self._done = True
        self._put(ev)
        return True

    def _withheld(self, n: int, content: str, tok: int) -> list[int]:
        """The ids of the `n` tokens llama-server held back before `tok` (see the class)."""
        url = self.backend.url
        data, tail = content.encode("utf-8"), self.backend.tokenizer.token_bytes(tok)
        ids = None
        if 0 < n <= HELD_MAX + 1 and data.endswith(tail):
            pieces, longest = self.backend.token_pieces()
            ids = _only_split(data[:len(data) - len(tail)], n, pieces, longest)
        if ids is None:
            raise EngineUnavailable(f"the engine at {url} held back {n} token ids before {tok} and its text "
                                    f"{content!r} does not name them (is it serving the same model?)")
        return ids


class LlamaCppBackend(RemoteBackend):
    """A RemoteBackend over llama.cpp's llama-server (same arguments; `kind` is "llamacpp")."""

    kinds = ("llamacpp",)
    stream_class = LlamaCppStream

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pieces = None           # token_pieces(), made on first need

    def check(self) -> dict:
        """llama-server's GET /props: the model file it serves and the context of one slot (its
        --ctx-size over --parallel), which bounds prompt + reply here too."""
        import httpx
        try:
            r = retrying(lambda: self.client.get(self.url + "/props"))
        except httpx.HTTPError as e:
            raise EngineUnavailable(f"cannot reach the engine at {self.url} ({exception_text(e)})") from None
        if r.status_code == 503:          # still loading its model
            raise EngineUnavailable(f"the engine at {self.url} is not ready: {error_message(r)}")
        try:
            r.raise_for_status()
            props = r.json()
            n_ctx = props["default_generation_settings"]["n_ctx"]
            if not isinstance(n_ctx, int) or n_ctx < 2:
                raise ValueError(f"n_ctx {n_ctx!r}")
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            raise EngineUnavailable(f"the engine at {self.url} did not answer GET /props as llama.cpp's "
                                    f"llama-server does ({exception_text(e)})") from None
        # llama-server ends a sequence when it would fill the slot (prompt + reply + 1 >= n_ctx)
        self.context_length = min(self.context_length, n_ctx - 1)
        path = str(props.get("model_path") or "")
        return {"id": self.engine_model or path.replace("\\", "/").rsplit("/", 1)[-1] or "llama.cpp",
                "model_path": path, "n_ctx": n_ctx, "total_slots": props.get("total_slots")}

    def body(self, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int],
             max_tokens: int, logprobs: int | None) -> dict:
        """llama-server's /completion request (its native dialect: a prompt of ids, the ids back in
        `tokens`).  It has no stop ids: they are watched here (LlamaCppStream).  Every sampler is
        named, in engine/sampling.py's order, so none of llama.cpp's defaults (min_p 0.05, top_k 40,
        top_p 0.95, ...) joins in: the same parameters mean the same distribution."""
        return {"prompt": prompt, "stream": True, "return_tokens": True,
                # a few tokens past the budget: a token that ends inside a UTF-8 character is sent
                # with the one completing it (LlamaCppStream), which may come after the budget; the
                # request is closed at the budget
                "n_predict": max_tokens + HELD_MAX,
                "samplers": ["penalties", "temperature", "top_k", "top_p"],
                "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
                "min_p": 0.0, "typical_p": 1.0,
                # glmkit penalizes every id seen, the prompt's included
                "repeat_penalty": params.repetition_penalty, "repeat_last_n": len(prompt) + max_tokens,
                # llama.cpp's seed is 32 bits, and 0xFFFFFFFF (its -1) means a random one
                "seed": -1 if params.seed is None else params.seed % 0xFFFFFFFF,
                # the chosen token's logprob comes with the top n: at least one
                "n_probs": 0 if logprobs is None else max(1, logprobs),
                # as for vLLM: end-of-sequence is a stop only when among the caller's; llama.cpp's
                # ignore_eos never chooses an end-of-generation token (vLLM's lets it pass)
                "ignore_eos": self.tokenizer.eos_id not in stop_ids,
                # the engine keeps the slot's KV cache for the next request that shares a prefix
                "cache_prompt": True}

    def token_pieces(self) -> tuple[dict[bytes, int], int]:
        """Every token's bytes -> its id (-1 where several ids share them), and the longest: what
        LlamaCppStream needs to name the ids llama-server withholds inside a UTF-8 character."""
        with self._lock:
            if self._pieces is None:
                pieces: dict[bytes, int] = {}
                for i in range(self.tokenizer.vocab_size):
                    b = self.tokenizer.token_bytes(i)          # b'' for special tokens: never withheld
                    if b:
                        pieces[b] = i if b not in pieces else -1
                self._pieces = pieces, max(map(len, pieces), default=1)
            return self._pieces


def _only_split(data: bytes, n: int, pieces: dict[bytes, int], longest: int) -> list[int] | None:
    """The ids of the one way to cut `data` into `n` tokens' bytes; None when there is none or more."""
    found: list[list[int]] = []

    def walk(start: int, left: int, ids: list[int]):
        if len(found) > 1:
            return
        if left == 0:
            if start == len(data):
                found.append(ids)
            return
        for end in range(start + 1, min(len(data), start + longest) + 1):
            tok = pieces.get(data[start:end])
            if tok is not None:
                walk(end, left - 1, ids + [tok])

    walk(0, n, [])
    return found[0] if len(found) == 1 and -1 not in found[0] else None
