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
    an incomplete UTF-8 character, and any tail that could still become a stop string."""

    def __init__(self, tok: Tokenizer, stop: list[str]):
        self.tok, self.stop = tok, [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0          # characters already emitted
        self.stopped = False

    def push(self, ids: list[int], final: bool) -> tuple[str, int]:
        """Add ids; return (text to emit now, how many of all ids so far count as output).

        When a stop string appears, the text is cut before it and ``stopped`` becomes True.
        """
        self.ids += ids
        text = self.tok.decode(self.ids)
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.stopped = True
                out, self.sent = text[self.sent:at], at
                return out, len(self.ids)
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end -= 1
            end = max(self.sent, end - self.holdback)
        out, self.sent = text[self.sent:end], max(self.sent, end)
        return out, len(self.ids)
