"""Incremental detokenization: each new token's text, decoded from a short window of ids."""

from __future__ import annotations

from typing import Any

# Prompt tokens decoded ahead of the first output token: tokenizers that strip a leading space
# at the start of a decode (SentencePiece's "▁") keep it when there is text before it.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Text of an output as its tokens arrive, in O(1) decoded tokens per step (vLLM's
    prefix/read offsets): `step(ids)` returns the text the new ids complete. A token that ends
    inside a UTF-8 character (bytes of a multi-byte character split across tokens decode to
    U+FFFD) adds nothing until the character is complete; `flush()` returns what is held back
    at the end. The deltas, concatenated, are the output's text.

    Only the ids after the last emitted character are kept, never the whole output.
    """

    def __init__(
        self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        # the Rust tokenizer's decode skips transformers' Python layers (5x faster per call);
        # not where transformers cleans up spaces after decoding, which it alone does
        backend = getattr(tokenizer, "backend_tokenizer", None)
        fast = backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", 0)
        self._decode_ids = backend.decode if fast else tokenizer.decode
        self._skip = skip_special_tokens
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # ids[prefix:read]: already emitted, decoded again as context
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, skip_special_tokens=self._skip) if ids else ""

    def step(self, new_token_ids: list[int]) -> str:
        self._ids += new_token_ids
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still incomplete
        # the ids just emitted become the next step's context; older ones are done with
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """The text of ids still held back (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text) :]
