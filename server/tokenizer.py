"""Text in and out: tokenizer.json through the `tokenizers` package, and incremental decoding."""
from __future__ import annotations

import pathlib


class Tokenizer:
    def __init__(self, path: pathlib.Path):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(str(path))

    @classmethod
    def from_dir(cls, model_dir: str | pathlib.Path) -> "Tokenizer | None":
        p = pathlib.Path(model_dir) / "tokenizer.json"
        return cls(p) if p.exists() else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class TextStream:
    """Turns a growing list of token ids into text deltas, holding back what is not final yet:
    an incomplete UTF-8 character, and any tail that could still become a stop string.

    Decoding is incremental (as vLLM and TGI do it): each new token is decoded in a short window
    that starts a token or so back, and its text is what that window adds to the same window
    without it. Decoding every id so far on each push grew with the output: O(n^2) over a
    generation. The window keeps tokenizers that strip a sequence's leading space (SentencePiece)
    exact."""

    def __init__(self, tok: Tokenizer, stop: list[str]):
        self.tok, self.stop = tok, [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""         # what ids[:read] decode to
        self.ends: list[int] = []   # len(self.text) once each id was pushed
        self.prefix = self.read = 0  # the window ids[prefix:read] ends where self.text ends
        self.sent = 0          # characters already emitted
        self.stopped = False

    def _add(self, token: int) -> None:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):   # (an incomplete character waits)
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        self.ends.append(len(self.text))

    def push(self, ids: list[int], final: bool) -> tuple[str, int]:
        """Add ids; return (text to emit now, how many of all ids so far count as output).

        When a stop string appears, the text is cut before it, ``stopped`` becomes True, and the
        ids that count end with the one that completed the stop string.
        """
        for t in ids:
            self._add(t)
        text = self.text
        if final and self.read < len(self.ids):   # the end: whatever the last ids decode to
            tail = self.tok.decode(self.ids[self.prefix:])[len(self.tok.decode(self.ids[self.prefix:self.read])):]
            text += tail
        # the stop string that appears first in the text wins (several tokens can arrive at
        # once: --stream-interval, or outputs that piled up), not the first in the list
        hits = [(at, -len(s), s) for s in self.stop if (at := text.find(s, max(0, self.sent - len(s)))) >= 0]
        if hits:
            at, _, s = min(hits)
            self.stopped = True
            out, self.sent = text[self.sent:at], at
            done = at + len(s)
            count = next((i + 1 for i, e in enumerate(self.ends) if e >= done), len(self.ids))
            return out, count
        end = len(text)
        if not final:
            end = max(self.sent, end - self.holdback)
        out, self.sent = text[self.sent:end], max(self.sent, end)
        return out, len(self.ids)
