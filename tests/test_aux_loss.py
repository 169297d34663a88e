"""moe.load_balancing_loss against transformers' load_balancing_loss_func (HF takes a tuple of [B*T, E] logits)."""

import pytest
import torch
from conftest import make_ids
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import hub
import moe


def routing_logits(checkpoints, name, ids, mask=None):
    model = hub.load_model(checkpoints(name).path)
    with torch.no_grad():
        _, routing = model(ids, attention_mask=mask, return_routing=True)
    cfg = model.config
    return [r.logits for r in routing], cfg.num_experts, cfg.num_experts_per_tok


@pytest.mark.parametrize("name", ["olmoe", "qwen2_moe"])
def test_matches_hf_without_mask(checkpoints, name):
    """Without a mask the loss equals HF's on the same per-layer router logits."""
    logits, E, K = routing_logits(checkpoints, name, make_ids(2, 12, seed=11))
    ours = moe.load_balancing_loss(logits, E, K)
    ref = load_balancing_loss_func(tuple(logits), E, K)
    assert ours.shape == ()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert abs(ours - K) > 1e-3  # routing is far from uniform, so this is not the trivial value k


def test_matches_hf_with_mask(checkpoints):
    """With a padding mask the loss equals HF's masked loss, which differs from the unmasked one."""
    ids = make_ids(2, 12, seed=12)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    logits, E, K = routing_logits(checkpoints, "mixtral", ids, mask)
    ours = moe.load_balancing_loss(logits, E, K, attention_mask=mask)
    ref = load_balancing_loss_func(tuple(logits), E, K, attention_mask=mask)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert abs(ref - load_balancing_loss_func(tuple(logits), E, K)) > 1e-3  # the mask matters here


@pytest.mark.parametrize("E,K", [(8, 2), (64, 8), (6, 1)])
def test_uniform_logits_give_top_k(E, K):
    """All-zero router logits (uniform routing) give exactly top_k, as HF's does."""
    logits = [torch.zeros(20, E), torch.zeros(20, E)]
    ours = moe.load_balancing_loss(logits, E, K)
    torch.testing.assert_close(ours, torch.tensor(float(K)), rtol=1e-6, atol=0)
    torch.testing.assert_close(load_balancing_loss_func(tuple(logits), E, K), torch.tensor(float(K)), rtol=1e-6, atol=0)


def test_backward_reaches_router_logits(checkpoints):
    """The loss is differentiable with respect to the router logits (it trains the router)."""
    logits, E, K = routing_logits(checkpoints, "olmoe", make_ids(1, 8))
    logits = [lg.clone().requires_grad_(True) for lg in logits]
    moe.load_balancing_loss(logits, E, K).backward()
    assert all(lg.grad is not None and lg.grad.abs().sum() > 0 for lg in logits)
