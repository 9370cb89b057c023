from __future__ import annotations

import pytest
import torch
from nv_testing import load_ours, save_tiny_qwen3
from safetensors.torch import load_file, save_file

from nv_models import WeightLoadError


@pytest.fixture
def ckpt(tmp_path):
    save_tiny_qwen3(tmp_path, seed=1)
    return tmp_path


def _rewrite(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_sharded_checkpoint_loads(tmp_path):
    hf = save_tiny_qwen3(tmp_path / "one", seed=2)
    hf.save_pretrained(tmp_path / "many", max_shard_size="60KB")
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 2
    a, b = load_ours(tmp_path / "one"), load_ours(tmp_path / "many")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_missing_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(
        WeightLoadError,
        match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight "
        r"\(shard k\)",
    ):
        load_ours(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(
        WeightLoadError, match=r"model\.layers\.0\.extra\.weight.*model\.safetensors"
    ):
        load_ours(ckpt)


def test_shape_mismatch_is_named(ckpt):
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)

    _rewrite(ckpt, edit)
    with pytest.raises(WeightLoadError, match=r"up_proj\.weight.*model\.safetensors.*\(100, 64\)"):
        load_ours(ckpt)


def test_corrupt_file_is_named(ckpt):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match="model.safetensors"):
        load_ours(ckpt)


def test_no_weights(tmp_path):
    save_tiny_qwen3(tmp_path, seed=1)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(WeightLoadError, match="no \\*.safetensors"):
        load_ours(tmp_path)


def test_calibrated_kv_scales_load_onto_the_attention_layers(ckpt):
    from nv_models import Attention

    def edit(t):
        t["model.layers.0.self_attn.k_scale"] = torch.tensor(0.5)
        t["model.layers.1.self_attn.v_scale"] = torch.tensor([2.0])

    _rewrite(ckpt, edit)
    layers = [m for m in load_ours(ckpt).modules() if isinstance(m, Attention)]
    assert [a.kv_scales for a in layers] == [(0.5, 1.0), (1.0, 2.0)]


@pytest.mark.parametrize("bad", [torch.tensor(0.0), torch.tensor([1.0, 2.0]), torch.tensor(-1.0)])
def test_bad_kv_scale_is_named(ckpt, bad):
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.1.self_attn.k_scale", bad))
    with pytest.raises(WeightLoadError, match=r"layers\.1\.self_attn\.k_scale.*one positive"):
        load_ours(ckpt)
