"""Incremental detokenization for streaming, and stop strings.

Text is decoded from a window of recent tokens (vLLM's prefix/read offsets), and held back
while it ends in an incomplete UTF-8 sequence (U+FFFD), so no delta carries a broken
character. With stop strings, the last ``len(longest stop) - 1`` characters are held back
too, so a stop string split across tokens never leaks into the output (unless
``include_stop_str_in_output``: then the text ends with it).
"""

from __future__ import annotations

from latentmoe.engine.sampling_params import SamplingParams

_WINDOW = 6  # tokens of left context decoded with the new ones (spacing of byte-level/sentencepiece tokens)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special = params.skip_special_tokens
        self.stops = list(params.stop)
        self.include_stop = params.include_stop_str_in_output
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids = list(prompt_token_ids[-_WINDOW:])  # context for the first output tokens
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # output text decoded so far
        self.num_emitted = 0  # characters of ``text`` already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def step(self, new_token_ids: list[int]) -> tuple[str, str | None]:
        """Feed new output tokens; returns ``(delta text, the stop string hit or None)``."""
        if self.stopped:
            return "", None
        for token in new_token_ids:
            self.ids.append(token)
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.ids[self.prefix_offset :])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self.text += full[len(prefix) :]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.stops:
            start = max(0, self.num_emitted - self.hold)
            hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                index, stop = min(hits)
                self.text = self.text[: index + len(stop) if self.include_stop else index]
                self.stopped = True
                return self._emit(len(self.text)), stop
        return self._emit(len(self.text) - self.hold), None

    def resume_at(self, num_chars: int) -> str:
        """After feeding a moved request's earlier tokens: its client has ``num_chars`` characters of them.
        Returns that text; what follows it comes out in later deltas."""
        self.num_emitted = min(num_chars, len(self.text))
        return self.text[: self.num_emitted]

    def finish(self) -> str:
        """The rest: held-back characters, and an incomplete character at the very end, if any."""
        if not self.stopped and self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset :])[len(prefix) :]
            self.read_offset = len(self.ids)
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.num_emitted)
        delta = self.text[self.num_emitted : upto]
        self.num_emitted = upto
        return delta
