"""Stop strings over a text stream.

A stop string may arrive split across tokens, so text that could be the beginning of one is
held back until it either completes (generation stops; the stop string is not shown) or
diverges (the held text is released)."""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self._held = ""
        self.hit = False

    def feed(self, text: str) -> str:
        """Text safe to show now; sets `hit` when a stop string completes."""
        if not self.stops or self.hit:
            return "" if self.hit else text
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, self._held = True, ""
            return buf[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep] if keep else buf

    def flush(self) -> str:
        out, self._held = ("" if self.hit else self._held), ""
        return out
