from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from nv_models.layers.linear import ShapeMismatch

# Buffers some checkpoints carry that we recompute.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Calibrated fp8 KV-cache scales (llm-compressor's `kv_cache_scheme`): one scalar per layer for
# K and V, kept on the layer's Attention (`kv_scales`); only fp8 caches use them.
_KV_SCALE_SUFFIXES = (".self_attn.k_scale", ".self_attn.v_scale")


class WeightLoadError(ValueError):
    """A checkpoint does not fit the model: the message names the tensor and the file."""


def _target(name: str, packed: dict[str, tuple[str, str | int]]) -> tuple[str, str | int | None]:
    for ckpt_module, (ours, shard_id) in packed.items():
        if f".{ckpt_module}." in name:
            return name.replace(f".{ckpt_module}.", f".{ours}."), shard_id
    return name, None


def _expected_keys(model: nn.Module) -> dict[tuple[str, str | int | None], nn.Parameter]:
    """Every (parameter, shard) the checkpoint must provide; tied parameters appear under each
    name and count as loaded when any of their names is."""
    packed = getattr(model, "packed_modules_mapping", {})
    shards: dict[str, list[str | int]] = {}
    for ours, shard_id in packed.values():
        shards.setdefault(ours, []).append(shard_id)
    keys = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        for shard_id in shards.get(module, [None]):
            keys[(name, shard_id)] = param
    return keys


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    """Load every *.safetensors shard in `model_dir` into `model` (sliced for its TP rank).
    Raises WeightLoadError for an unreadable file, an unexpected, missing or mis-shaped tensor."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors files in {model_dir}")
    packed = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = _expected_keys(model)
    loaded: set[tuple[int, str | int | None]] = set()  # by parameter identity: tied ones count once
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
            names = list(handle.keys())
        except Exception as e:
            raise WeightLoadError(f"cannot read safetensors file {file}: {e}") from e
        for name in names:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name.endswith(_KV_SCALE_SUFFIXES):
                _load_kv_scale(model, name, handle.get_tensor(name), file)
                continue
            target, shard_id = _target(name, packed)
            if target not in params:
                raise WeightLoadError(f"unexpected tensor {name!r} in {file} (no such parameter)")
            try:
                tensor = handle.get_tensor(name)
            except Exception as e:
                raise WeightLoadError(f"cannot read tensor {name!r} from {file}: {e}") from e
            param = params[target]
            try:
                if shard_id is None:
                    getattr(param, "weight_loader", _copy_whole)(param, tensor)
                else:
                    param.weight_loader(param, tensor, shard_id)
            except ShapeMismatch as e:
                raise WeightLoadError(
                    f"tensor {name!r} in {file} has shape {tuple(tensor.shape)}, which does not "
                    f"fit parameter {target!r}: {e}"
                ) from e
            loaded.add((id(param), shard_id))
    missing = [
        f"{name}" + (f" (shard {shard})" if shard is not None else "")
        for (name, shard), param in expected.items()
        if (id(param), shard) not in loaded
    ]
    if missing:
        raise WeightLoadError(f"missing tensors in {model_dir}: {', '.join(missing)}")


def _load_kv_scale(model: nn.Module, name: str, tensor: torch.Tensor, file: Path) -> None:
    from nv_models.layers.attention import Attention

    module_name, which = name.rsplit(".", 1)
    attn = dict(model.named_modules()).get(module_name + ".attn")
    if not isinstance(attn, Attention):
        raise WeightLoadError(f"unexpected tensor {name!r} in {file} (no attention layer there)")
    if tensor.numel() != 1 or not (value := float(tensor.float().reshape(()))) > 0:
        raise WeightLoadError(
            f"tensor {name!r} in {file} must be one positive scale, got shape "
            f"{tuple(tensor.shape)} and values {tensor.flatten()[:4].tolist()}"
        )
    k, v = attn.kv_scales
    attn.kv_scales = (value, v) if which == "k_scale" else (k, value)


def _copy_whole(param: nn.Parameter, tensor: torch.Tensor) -> None:
    if param.shape != tensor.shape:
        raise ShapeMismatch(tuple(param.shape), tuple(tensor.shape))
    param.data.copy_(tensor)


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights for benchmarking from a config.json alone: normal(0, std) matrices, unit
    norms, zero biases; drawn on the parameters' device. (Shards differ across TP sizes.)"""
    gens: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            if param.device not in gens:
                gens[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            param.normal_(0.0, std, generator=gens[param.device])
