"""What the engine reads from a model directory besides the weights: the tokenizer, the
generation config's sampling defaults and EOS ids."""

from __future__ import annotations

import logging
from typing import Any

from nv_engine.config import Config
from nv_engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def load_tokenizer(config: Config) -> Any:
    """The tokenizer of `config.tokenizer` (an error if it cannot be loaded) or of the model
    directory (None, with a warning, if it has none)."""
    from transformers import AutoTokenizer

    path = config.tokenizer or config.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        if config.tokenizer is not None:
            raise ValueError(f"tokenizer: cannot load a tokenizer from {path!r}: {e}") from e
        tokenizer = None
    # From a directory without tokenizer files, transformers may build a tokenizer with no
    # vocabulary (it encodes text to nothing and names token 0 its EOS): treat it as none.
    if tokenizer is not None and not tokenizer.encode("hello world", add_special_tokens=False):
        if config.tokenizer is not None:
            raise ValueError(f"tokenizer: the tokenizer in {path!r} has no vocabulary")
        tokenizer = None
    if tokenizer is None:
        logger.warning("no tokenizer in %s: prompts must be token ids, texts will be empty", path)
    return tokenizer


def load_generation_config(config: Config) -> Any:
    """The model's generation_config.json (transformers' GenerationConfig), or None."""
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(config.model)
    except Exception:
        return None  # no generation_config.json


# generation_config.json keys that become SamplingParams defaults (vLLM's list)
_GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def sampling_defaults(generation_config: Any) -> dict[str, Any]:
    """What the model's generation_config.json sets of `_GENERATION_DEFAULTS` (only what it
    sets: transformers' own defaults are not the model's), as SamplingParams keywords."""
    if generation_config is None:
        return {}
    diff = generation_config.to_diff_dict()
    defaults = {
        ours: diff[key] for key, ours in _GENERATION_DEFAULTS.items() if diff.get(key) is not None
    }
    try:
        SamplingParams(**defaults)
    except (TypeError, ValueError) as e:
        logger.warning("generation_config.json: sampling defaults %s ignored: %s", defaults, e)
        return {}
    return defaults


def collect_eos_token_ids(config: Config, generation_config: Any, tokenizer: Any) -> set[int]:
    """Every id named EOS by the model config, the generation config or the tokenizer."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(config.hf_config, "eos_token_id", None))
    if generation_config is not None:
        add(generation_config.eos_token_id)
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return ids
