"""Tiny random MoE models built with our own code (no transformers): for tests of LoRA, training and tools.
Parity with transformers is tested separately (test_parity.py) on models transformers builds."""
import torch

import moe


def tiny_config(model_type="olmoe", **overrides):
    c = dict(model_type=model_type, vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=16, num_experts=8, num_experts_per_tok=2,
             max_position_embeddings=128, rope_theta=10000.0, pad_token_id=1, eos_token_id=2, torch_dtype="float32")
    if model_type.startswith("qwen"):
        c.update(moe_intermediate_size=16, intermediate_size=32)
    if model_type == "qwen2_moe":
        c.update(shared_expert_intermediate_size=32, mlp_only_layers=[1])
    if model_type == "mixtral":
        c["num_local_experts"] = c.pop("num_experts")
    c.update(overrides)
    return moe.Config.from_json(c)


def randomize(model, seed=0, std=0.2):
    """Non-trivial random weights (norms near 1) so routing is not degenerate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_((1.0 + noise) if n.endswith("norm.weight") else noise)
    return model


def tiny_model(model_type="olmoe", seed=0, **overrides):
    return randomize(moe.Transformer(tiny_config(model_type, **overrides)), seed).eval()
