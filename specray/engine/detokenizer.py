"""Incremental detokenization: the text each new token adds, without re-decoding the whole output.

Decodes a short window that starts a few tokens back (so tokenizers that render a leading space or
merge bytes across tokens see their context) and emits what the newest tokens add, holding back a
trailing U+FFFD until the rest of its character arrives (the prefix/read-offset scheme of TGI and
vLLM). Special tokens (EOS) render as nothing. Knows nothing of requests or stop strings."""
from __future__ import annotations

CONTEXT = 5  # prompt tokens decoded as left context of the first output token


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT:])
        self.prefix = 0              # window start
        self.read = len(self.ids)    # tokens before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]
