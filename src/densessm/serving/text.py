"""From generated token ids to the text a client sees: incremental decoding and stop sequences.

Decoding token by token is not decoding the sequence: a byte-level BPE splits one character over several
tokens, and word-piece tokenizers join pieces with or without spaces depending on their neighbours. So each
new piece of text is the difference between decoding a short window ending at the new token and the same
window without it, and nothing is sent while the window ends inside a character (a U+FFFD replacement).
Stop sequences are matched on the text; while the text ends with what could be the start of one, that tail
is held back, so a client never sees a stop sequence, nor a part of one that turned out to be one.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_INCOMPLETE = "\ufffd"


class TextStream:
    """The text of one completion as its tokens arrive; :meth:`push` returns what may be sent now."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # characters that may begin a stop sequence
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window [prefix_offset, read_offset) was decoded last time
        self.read_offset = 0
        self.text = ""  # everything decoded so far, stop sequence excluded once found
        self.sent = 0  # characters of text handed out
        self.stopped = False  # a stop sequence was found (the text ends before it)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _new_text(self) -> str:
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith(_INCOMPLETE):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""

    def push(self, token: int) -> str:
        """Add one generated token; returns the text that is now safe to send (may be empty)."""
        if self.stopped:
            raise RuntimeError("the completion already ended at a stop sequence")
        self.ids.append(token)
        return self._extend(self._new_text(), final=False)

    def flush(self) -> str:
        """At the end of the completion: the text held back, and a last character still incomplete."""
        rest = ""
        if not self.stopped and self.read_offset < len(self.ids):
            before = self._decode(self.ids[self.prefix_offset : self.read_offset])
            rest = self._decode(self.ids[self.prefix_offset :])[len(before) :]
            self.prefix_offset = self.read_offset = len(self.ids)
        return self._extend(rest, final=True)

    def _extend(self, new: str, final: bool) -> str:
        start = len(self.text)
        self.text += new
        if self.stop and new:
            window = max(0, start - self.hold)  # a stop sequence may straddle the old and the new text
            found = [i for i in (self.text.find(s, window) for s in self.stop) if i >= 0]
            if found:
                self.text = self.text[: min(found)]
                self.stopped = final = True
        ready = len(self.text) if final else len(self.text) - self._held()
        if ready <= self.sent:
            return ""
        piece = self.text[self.sent : ready]
        self.sent = ready
        return piece

    def _held(self) -> int:
        """Length of the longest tail of the text that begins a stop sequence (0 without stop sequences)."""
        for k in range(min(self.hold, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0


__all__ = ["TextStream"]
