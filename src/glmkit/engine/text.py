"""Stop strings over a text stream.

A stop string may arrive split across tokens, so text that could be the beginning of one is
held back until it either completes (generation stops; the stop string is not shown) or
diverges (the held text is released).  Matching is Knuth-Morris-Pratt per stop string: a
constant amount of work per fed character and stop, whatever the lengths, and at most
max(len(stop)) - 1 characters are ever held."""

from __future__ import annotations


def _failure(s: str) -> list[int]:
    """f[i]: length of the longest proper prefix of s[:i+1] that is also its suffix."""
    f, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class StopStrings:
    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self._fail = [_failure(s) for s in self.stops]
        self._matched = [0] * len(self.stops)   # per stop: how much of it the text now ends with
        self._held = ""
        self.hit = False
        self.matched: str | None = None         # after a hit: the stop string that ended the text

    def feed(self, text: str) -> str:
        """Text safe to show now; sets `hit` when a stop string completes."""
        if not self.stops or self.hit:
            return "" if self.hit else text
        buf, base = self._held + text, len(self._held)
        for pos, ch in enumerate(text):
            done, which = 0, None
            for j, s in enumerate(self.stops):
                k = self._matched[j]
                while k and ch != s[k]:
                    k = self._fail[j][k - 1]
                if ch == s[k]:
                    k += 1
                if k == len(s):
                    if k > done:
                        done, which = k, s
                    k = self._fail[j][k - 1]
                self._matched[j] = k
            if done:      # the first stop string to complete (the longest, if several end here) ends the text
                self.hit, self.matched, self._held = True, which, ""
                return buf[:base + pos + 1 - done]
        keep = max(self._matched)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """The held text (nothing after a hit); matching starts afresh."""
        out, self._held = ("" if self.hit else self._held), ""
        self._matched = [0] * len(self.stops)
        return out
