"""Strict loading: a broken checkpoint or an unsupported config is refused with a message naming the culprit."""

import os

import pytest
import torch
from conftest import read_json, write_json
from safetensors.torch import load_file, save_file

from files import hub
import moe


def error_message(exc_types, fn, *needles):
    """Run fn, expect one of exc_types, and check that every needle appears in the message."""
    with pytest.raises(exc_types) as info:
        fn()
    msg = str(info.value)
    for needle in needles:
        assert str(needle) in msg, f"{needle!r} not in {msg!r}"
    return msg


def rewrite(path, edit):
    """Load a single-file checkpoint, let `edit` change the dict of tensors, save it back."""
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_shard_names_file(ckpt_copy):
    """Deleting a shard listed in the index gives an error naming that shard file."""
    path = ckpt_copy("olmoe_norm_sharded")
    shard = sorted(set(read_json(path / "model.safetensors.index.json")["weight_map"].values()))[1]
    os.remove(path / shard)
    error_message((hub.CheckpointError, FileNotFoundError), lambda: hub.load_model(path), shard)


def test_truncated_file_names_file(ckpt_copy):
    """A truncated safetensors file gives a CheckpointError naming the file."""
    path = ckpt_copy("olmoe")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    error_message(hub.CheckpointError, lambda: hub.load_model(path), "model.safetensors")


def test_truncated_shard_names_shard(ckpt_copy):
    """A truncated shard of a sharded checkpoint gives a CheckpointError naming that shard."""
    path = ckpt_copy("olmoe_norm_sharded")
    shard = sorted(set(read_json(path / "model.safetensors.index.json")["weight_map"].values()))[-1]
    f = path / shard
    f.write_bytes(f.read_bytes()[:100])
    error_message(hub.CheckpointError, lambda: hub.load_model(path), shard)


@pytest.mark.parametrize("name,key", [
    ("olmoe", "model.layers.1.mlp.experts.5.down_proj.weight"),
    ("mixtral", "model.layers.0.block_sparse_moe.experts.3.w3.weight"),
    ("mixtral", "lm_head.weight"),  # not tied: lm_head is required
    ("qwen2_moe", "model.layers.0.self_attn.k_proj.bias"),
    ("qwen2_moe", "model.layers.2.mlp.shared_expert_gate.weight"),
])
def test_missing_tensor_names_tensor(ckpt_copy, name, key):
    """A checkpoint without one expected tensor gives a CheckpointError naming that tensor."""
    path = ckpt_copy(name)
    rewrite(path, lambda t: t.pop(key))
    error_message(hub.CheckpointError, lambda: hub.load_model(path), key)


@pytest.mark.parametrize("name,key", [
    ("olmoe", "model.layers.0.mlp.experts.8.gate_proj.weight"),  # one expert too many (E = 8)
    ("qwen2_moe", "model.layers.1.mlp.gate.weight"),  # a router on the dense layer
    ("mixtral", "model.layers.0.self_attn.q_proj.bias"),
])
def test_extra_tensor_names_tensor(ckpt_copy, name, key):
    """A checkpoint with a tensor the model does not have gives a CheckpointError naming it."""
    path = ckpt_copy(name)
    rewrite(path, lambda t: t.__setitem__(key, torch.zeros(16, 64)))
    error_message(hub.CheckpointError, lambda: hub.load_model(path), key)


def test_wrong_shape_names_tensor_and_shapes(ckpt_copy):
    """A tensor of the wrong shape gives a CheckpointError naming the tensor, its shape and the expected one."""
    path = ckpt_copy("olmoe")
    key = "model.layers.1.mlp.experts.2.up_proj.weight"  # expected (32, 64)
    rewrite(path, lambda t: t.__setitem__(key, torch.zeros(48, 64)))
    msg = error_message(hub.CheckpointError, lambda: hub.load_model(path), key, "48", "32")
    assert "64" in msg


def test_unknown_model_type_names_it(ckpt_copy):
    """An unknown model_type gives a ConfigError naming it."""
    path = ckpt_copy("olmoe")
    cfg = read_json(path / "config.json")
    write_json(path / "config.json", dict(cfg, model_type="deepseek_v3"))
    error_message(moe.ConfigError, lambda: hub.load_model(path), "deepseek_v3")


def test_missing_config_names_config_json(ckpt_copy):
    """A directory without config.json gives an error naming config.json."""
    path = ckpt_copy("olmoe")
    os.remove(path / "config.json")
    error_message((moe.ConfigError, FileNotFoundError), lambda: hub.load_model(path), "config.json")


def test_invalid_json_config_names_config_json(ckpt_copy):
    """A config.json that is not valid JSON gives a ConfigError naming config.json."""
    path = ckpt_copy("olmoe")
    (path / "config.json").write_text('{"model_type": "olmoe", ')
    error_message(moe.ConfigError, lambda: hub.load_model(path), "config.json")


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64},
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
])
def test_unsupported_rope_type_refused(ckpt_copy, rope):
    """A rope_type other than default is refused with a ConfigError naming it."""
    path = ckpt_copy("mixtral")
    write_json(path / "config.json", dict(read_json(path / "config.json"), rope_parameters=rope))
    error_message(moe.ConfigError, lambda: hub.load_model(path), rope["rope_type"])


def test_v4_rope_scaling_refused(ckpt_copy):
    """A v4-style rope_scaling block ({"type": "dynamic"}) is refused too, not silently ignored."""
    path = ckpt_copy("qwen3_moe")
    cfg = read_json(path / "config.json")
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    write_json(path / "config.json", cfg)
    error_message(moe.ConfigError, lambda: hub.load_model(path), "dynamic")


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe"])
def test_qwen_sliding_window_refused(ckpt_copy, name):
    """Qwen with use_sliding_window true is refused with a ConfigError mentioning the sliding window."""
    path = ckpt_copy(name)
    write_json(path / "config.json", dict(read_json(path / "config.json"), use_sliding_window=True,
                                         sliding_window=4))
    msg = error_message(moe.ConfigError, lambda: hub.load_model(path))
    assert "sliding" in msg.lower()


def test_missing_config_key_names_it(ckpt_copy):
    """A config.json without a required key (hidden_size) raises a ConfigError naming the file and the key."""
    path = ckpt_copy("olmoe")
    cfg = read_json(path / "config.json")
    del cfg["hidden_size"]
    write_json(path / "config.json", cfg)
    msg = error_message(moe.ConfigError, lambda: hub.load_model(path), "hidden_size")
    assert "config.json" in msg


def test_mixtral_active_sliding_window_refused(ckpt_copy):
    """Mixtral with a sliding_window set (Mistral-style local attention) is refused, not loaded approximately."""
    path = ckpt_copy("mixtral")
    write_json(path / "config.json", dict(read_json(path / "config.json"), sliding_window=16))
    assert "sliding" in error_message(moe.ConfigError, lambda: hub.load_model(path)).lower()


@pytest.mark.parametrize("change,needle", [
    (lambda c: c.update(num_experts_per_tok=c["num_experts"] + 1), "num_experts_per_tok"),
    (lambda c: c.update(hidden_size=str(c["hidden_size"])), "config.json"),
    (lambda c: c.update(num_hidden_layers=0), "num_hidden_layers"),
])
def test_config_values_of_the_wrong_type_or_range_are_refused(ckpt_copy, change, needle):
    """More experts per token than experts, a size written as a string, zero layers: a ConfigError naming
    config.json and the key, not a failure deep in the forward pass."""
    path = ckpt_copy("olmoe")
    c = read_json(path / "config.json")
    change(c)
    write_json(path / "config.json", c)
    error_message(moe.ConfigError, lambda: hub.load_model(path), "config.json", needle)


def test_index_that_is_not_an_object_names_it(ckpt_copy):
    """A model.safetensors.index.json holding a list gives a CheckpointError naming the index."""
    path = ckpt_copy("olmoe_norm_sharded")
    (path / "model.safetensors.index.json").write_text("[]")
    error_message(hub.CheckpointError, lambda: hub.load_model(path), "model.safetensors.index.json")


def test_unknown_device_names_the_flag():
    """--device bogus: a ValueError naming the flag (torch's own message is a RuntimeError traceback)."""
    error_message(ValueError, lambda: hub.pick_device("bogus"), "--device bogus")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_names_tensor(ckpt_copy, bad):
    """A weight with a NaN or an inf gives a CheckpointError naming the file and the tensor."""
    path = ckpt_copy("olmoe")
    key = "model.layers.1.mlp.experts.2.up_proj.weight"
    rewrite(path, lambda t: t[key].view(-1).__setitem__(5, bad))
    error_message(hub.CheckpointError, lambda: hub.load_model(path), key, "model.safetensors", "non-finite")


def test_weights_that_cannot_fit_the_device_are_refused(checkpoints):
    """Weights larger than the device's free memory are refused before anything is allocated, with the
    GiB needed and free and the way out (torchrun over more cards); the free figure is injected here, as
    on CUDA it comes from torch.cuda.mem_get_info."""
    path = checkpoints("olmoe").path
    need = sum(p.numel() * 4 for p in hub.load_model(path, dtype=torch.float32).parameters())
    msg = error_message(hub.CheckpointError, lambda: hub.load_model(path, dtype=torch.float32, free_bytes=need - 1),
                        str(path), "GiB", "torchrun")
    assert f"{need / 2**30:.2f}" in msg
    assert hub.load_model(path, dtype=torch.float32, free_bytes=need) is not None  # exactly enough: loads
