"""moe.load_balancing_loss against transformers' load_balancing_loss_func (HF takes a tuple of [B*T, E] logits)."""

import pytest
import torch
from conftest import assert_within, make_ids, tol
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from files import hub
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
    # both: fp32 softmax (a few roundings of probabilities <= 1), means over the 48 rows of both layers in
    # whatever order each sums them (48 u), a sum of E = 8 products (8 u): 64 u of the loss's size
    assert_within(ours, ref, 64)
    assert abs(ours - K) > 1e-3  # routing is far from uniform, so this is not the trivial value k


def test_matches_hf_with_mask(checkpoints):
    """With a padding mask the loss equals HF's masked loss, which differs from the unmasked one."""
    ids = make_ids(2, 12, seed=12)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    logits, E, K = routing_logits(checkpoints, "mixtral", ids, mask)
    ours = moe.load_balancing_loss(logits, E, K, attention_mask=mask)
    ref = load_balancing_loss_func(tuple(logits), E, K, attention_mask=mask)
    assert_within(ours, ref, 64)  # as above, over fewer rows
    assert abs(ref - load_balancing_loss_func(tuple(logits), E, K)) > 1e-3  # the mask matters here


@pytest.mark.parametrize("E,K", [(8, 2), (64, 8), (6, 1)])
def test_uniform_logits_give_top_k(E, K):
    """All-zero router logits (uniform routing) give exactly top_k, as HF's does."""
    logits = [torch.zeros(20, E), torch.zeros(20, E)]
    ours = moe.load_balancing_loss(logits, E, K)
    # 1/E is rounded once, then means over 40 rows and a sum over E <= 64 experts: 128 u of k
    assert_within(ours, torch.tensor(float(K)), 128)
    assert_within(load_balancing_loss_func(tuple(logits), E, K), torch.tensor(float(K)), 128)


def test_backward_reaches_router_logits(checkpoints):
    """The loss is differentiable with respect to the router logits (it trains the router)."""
    logits, E, K = routing_logits(checkpoints, "olmoe", make_ids(1, 8))
    logits = [lg.clone().requires_grad_(True) for lg in logits]
    moe.load_balancing_loss(logits, E, K).backward()
    assert all(lg.grad is not None and lg.grad.abs().sum() > 0 for lg in logits)


def brute_balance(logits, E, K, mask):
    """E * sum_e f_e P_e of one layer, token by token: f_e = top-K slots of e per real token, P_e = mean prob."""
    f, P, n = [0.0] * E, [0.0] * E, 0
    for t in range(logits.shape[0]):
        if not mask[t]:
            continue
        p = torch.softmax(logits[t].double(), -1)
        n += 1
        for e in torch.topk(p, K).indices.tolist():
            f[e] += 1
        for e in range(E):
            P[e] += float(p[e])
    return E * sum((f[e] / n) * (P[e] / n) for e in range(E))


def test_per_layer_balancing_and_z_loss_against_brute_force():
    """Three layers of different routing, a mask with padding in both rows: the per-layer balancing loss is the
    mean of each layer's loss computed token by token, the pooled one balances all layers' tokens together, and
    the z-loss is the mean of logsumexp^2 over real tokens and layers. fp32 against float64: softmax and
    logsumexp round a few times, the means run over <= 42 rows, the sums over E = 6: 64 u (relative)."""
    E, K = 6, 2
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:], mask[1, 3:] = 0, 0
    logits = [torch.randn(14, E, generator=g) * s for s in (0.5, 2.0, 4.0)]
    m = mask.reshape(-1).tolist()
    rel = tol(torch.float32, 1, 64)
    per_layer = sum(brute_balance(lg, E, K, m) for lg in logits) / 3
    ours = moe.load_balancing_loss_per_layer(logits, E, K, attention_mask=mask)
    assert float(ours) == pytest.approx(per_layer, rel=rel)
    pooled = brute_balance(torch.cat(logits), E, K, m * 3)
    assert float(moe.load_balancing_loss(logits, E, K, attention_mask=mask)) == pytest.approx(pooled, rel=rel)
    assert abs(per_layer - pooled) > 1e-3  # the two differ here, so each test tells them apart
    z = [float(torch.logsumexp(lg[t].double(), -1)) ** 2 for lg in logits for t in range(14) if m[t]]
    assert float(moe.router_z_loss(logits, attention_mask=mask)) == pytest.approx(sum(z) / len(z), rel=rel)
