"""Prompts as the engine takes them: text, token ids or vLLM's prompt dicts, and chat
conversations rendered with the tokenizer's template. Checked here, before anything is queued;
shared by the offline engine and the async front end (which has no scheduler of its own)."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

# text, token ids, or vLLM's prompt dicts: {"prompt": text} / {"prompt_token_ids": ids}
Prompt = str | list[int] | dict[str, Any]


def prompt_text(prompt: Prompt) -> str | None:
    """A prompt's text (RequestOutput.prompt, vLLM's): None for token ids."""
    if isinstance(prompt, dict):
        prompt = prompt.get("prompt")
    return prompt if isinstance(prompt, str) else None


def prompt_token_ids(prompt: Prompt, tokenizer: Any, vocab_size: int, where: str) -> list[int]:
    """A prompt's token ids, each checked to be in the vocabulary (not its length: see
    check_prompt_length). `where` names the prompt in errors."""
    if isinstance(prompt, dict):
        keys = set(prompt) & {"prompt", "prompt_token_ids"}
        if len(keys) != 1:
            raise ValueError(
                f"{where} must hold one of 'prompt' (text) or 'prompt_token_ids', "
                f"got keys {sorted(prompt)}"
            )
        prompt = prompt[keys.pop()]
    if hasattr(prompt, "tolist") and not isinstance(prompt, (str, list, tuple)):
        prompt = prompt.tolist()  # a 1-D numpy array or tensor of token ids
        if not isinstance(prompt, list):
            raise TypeError(f"{where} must be a 1-D sequence of token ids")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"{where} is a string but the model has no tokenizer; pass token ids")
        token_ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)):
        token_ids = []
        for t in prompt:
            if isinstance(t, bool):
                raise TypeError(f"{where} must hold ints, got bool")
            try:
                t = operator.index(t)  # ints, numpy ints, 0-d integer tensors
            except TypeError:
                raise TypeError(f"{where} must hold ints, got {type(t).__name__}") from None
            if not 0 <= t < vocab_size:
                raise ValueError(f"{where} holds token id {t}, outside [0, {vocab_size})")
            token_ids.append(t)
    else:
        raise TypeError(
            f"{where} must be a str or a list of token ids, got {type(prompt).__name__}"
        )
    if not token_ids:
        raise ValueError(f"{where} is empty")
    return token_ids


def check_prompt_length(num_tokens: int, max_model_len: int, kv_capacity_tokens: int) -> None:
    """Reject a prompt that can never be scheduled: longer than max_model_len, or than the
    whole KV cache holds with one token to generate."""
    if num_tokens > max_model_len:
        raise ValueError(f"prompt has {num_tokens} tokens, more than max_model_len={max_model_len}")
    if num_tokens + 1 > kv_capacity_tokens:
        raise ValueError(
            f"prompt has {num_tokens} tokens, more than the whole KV cache holds "
            f"({kv_capacity_tokens} tokens)"
        )


def chat_prompt_ids(
    tokenizer: Any,
    conversation: Sequence[dict[str, Any]],
    add_generation_prompt: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
    where: str = "messages",
    continue_final_message: bool = False,
) -> list[int]:
    """One conversation rendered with the tokenizer's chat template, as token ids (the
    template writes the special tokens, BOS included, itself). `continue_final_message`
    (vLLM's): leave the last message open, for the model to go on with it (a prefilled
    assistant reply); it excludes `add_generation_prompt`."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat needs a tokenizer with a chat template")
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message and add_generation_prompt cannot both be true "
            "(set add_generation_prompt to false)"
        )
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError(f"{where} must be a non-empty list of {{'role', 'content'}} dicts")
    messages = [_chat_message(m, f"{where}[{i}]") for i, m in enumerate(conversation)]
    text = tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        **(chat_template_kwargs or {}),
    )
    return tokenizer.encode(text, add_special_tokens=False)


def _chat_message(message: Any, where: str) -> dict[str, Any]:
    """A chat message with text content: a string, or a list of {"type": "text", "text": ...}
    parts (joined by newlines, as vLLM does); an assistant's content may be None."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValueError(f"{where} must be a dict with a string 'role' and a 'content'")
    content = message.get("content")
    if content is None and message["role"] == "assistant":
        content = ""
    elif isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"{where}.content[{i}]: only {{'type': 'text', 'text': str}} parts are "
                    f"supported, got {kind!r}"
                )
            texts.append(part["text"])
        content = "\n".join(texts)
    elif not isinstance(content, str):
        raise ValueError(f"{where}.content must be a string or a list of text parts")
    return {**message, "content": content}


def bad_words_token_ids(tokenizer: Any, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Each bad word as token ids, as it reads at the start of a text and after a space (vLLM's
    two spellings), without special tokens."""
    out: list[tuple[int, ...]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids and ids not in out:
                out.append(ids)
    return tuple(out)
