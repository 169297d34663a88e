"""PERFT (routed adapters beside / inside the MoE block) and DMEP (LoRA-MoE with module-wise pruning)."""
import json

import pytest
import torch
import torch.nn.functional as F

import dmep
import moe
import train
from conftest import CONFIGS
from conftest import FORWARD, assert_within
from tiny import tiny_model
import methods

ROUTED = ["perft-s", "perft-d", "perft-r", "perft-e", "dmep"]


def ids(seed=0, B=3, T=24):
    return torch.randint(3, 96, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in methods.adapter_state(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("model_type", ["olmoe", "qwen2_moe"])
@pytest.mark.parametrize("method", ROUTED)
def test_zero_initialised_adapters_give_exactly_the_base_logits(model_type, method):
    """B = 0 at initialisation (DMEP; PERFT with perft_init="kaiming"): the logits are bit for bit unchanged."""
    m = tiny_model(model_type)
    x = ids()
    base = m(x)
    methods.attach(m, method, r=4, alpha=8, act="silu", perft_init="kaiming")
    assert methods.count_trainable(m) > 0
    assert torch.equal(m(x), base)


@pytest.mark.parametrize("act", ["identity", "relu"])
def test_perft_e_is_weighted_by_the_frozen_base_router(act):
    """PERFT-E adds sum_i w_i * B_i act(A_i h) with the base router's top-k weights w, fast path == loop."""
    m = tiny_model("olmoe")
    block = m.model.layers[0].mlp
    h = torch.randn(40, 32, generator=torch.Generator().manual_seed(3))
    before, r = block(h[None])
    methods.attach(m, "perft-e", r=4, alpha=8, act=act)
    randomize_adapters(m)
    after, _ = block(h[None])
    ad, f = block.experts.adapter, {"identity": lambda z: z, "relu": F.relu}[act]
    want = torch.zeros_like(h)
    for k in range(r.topk_idx.shape[1]):
        e, w = r.topk_idx[:, k], r.topk_w[:, k]
        z = f(torch.einsum("td,trd->tr", h, ad.A[e]))
        want += w[:, None] * torch.einsum("tr,tdr->td", z, ad.B[e]) * ad.scale
    # after and before each round the block's output (of size max |after|); want sums over D = 32 and r = 4 in
    # another order: 64 u of the block output's size
    assert_within((after - before)[0], want, 64, magnitude=after.abs().max())
    grads = {}
    for path in ("fast", "loop"):  # the fast path makes the A product's input rows again in backward
        m.set_expert_path(path)
        ad.zero_grad()
        out = block(h[None])[0]
        out.square().sum().backward()
        grads[path] = out.detach(), ad.A.grad.clone(), ad.B.grad.clone()
    for i, (fast, loop) in enumerate(zip(grads["fast"], grads["loop"])):  # reductions over D = 32, r, the rows
        assert_within(fast, loop, 64, msg=f"output/A/B {i}:")


@pytest.mark.parametrize("renorm", [False, True])
def test_perft_r_is_weighted_by_its_own_router(renorm):
    """PERFT-R adds sum over its own router's top-K of g_j * B_j A_j h, g from that router (not the base one)."""
    m = tiny_model("olmoe")
    block = m.model.layers[1].mlp
    h = torch.randn(40, 32, generator=torch.Generator().manual_seed(4))
    before, r = block(h[None])
    methods.attach(m, "perft-r", r=4, alpha=8, perft_experts=4, perft_topk=2, perft_renorm=renorm)
    randomize_adapters(m)
    after, _ = block(h[None])
    ad = block.adapter
    probs = F.softmax(h @ ad.router.T, dim=-1)
    g, idx = probs.topk(2, dim=-1)
    g = g / g.sum(-1, keepdim=True) if renorm else g
    want = sum(g[:, k, None] * torch.einsum("tr,tdr->td", torch.einsum("td,trd->tr", h, ad.A[idx[:, k]]), ad.B[idx[:, k]])
               for k in range(2)) * ad.scale
    assert_within((after - before)[0], want, 64, magnitude=after.abs().max())  # as for PERFT-E above
    base_w = r.topk_w[:, :2]  # the base router's weights would give something else
    assert not torch.allclose(g, base_w.to(g.dtype), atol=1e-3)


@pytest.mark.parametrize("method", ROUTED)
def test_gradients_reach_every_routed_adapter_tensor(method):
    """One backward: every adapter tensor (experts, and PERFT-R's / DMEP's routers) gets a non-zero gradient."""
    m = tiny_model("qwen2_moe").train()
    methods.attach(m, method, r=4, alpha=8, perft_experts=4, perft_topk=2, dmep_experts=4, dmep_topk=2)
    randomize_adapters(m)
    m(ids(B=4, T=32)).logsumexp(-1).mean().backward()
    for n, p in methods.adapter_state(m).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    for n, p in m.named_parameters():
        assert n in methods.adapter_state(m) or p.grad is None, n


def test_dmep_pruning_shrinks_parameters_and_optimizer_state_and_keeps_logits():
    """Pruning experts never chosen on x: tensors and AdamW state shrink, logits on x stay the same."""
    m = tiny_model("olmoe")
    methods.attach(m, "dmep", r=4, alpha=8, dmep_experts=8, dmep_topk=2)
    randomize_adapters(m)
    x = ids(B=1, T=3)  # few tokens: each module's top-2 touches only some of its 8 experts
    params = list(methods.adapter_state(m).values())
    opt = torch.optim.AdamW(params, lr=1e-3)
    m(x).sum().backward()
    opt.step()
    opt.zero_grad()
    before = m(x)
    dmep.track(m)  # this batch's counts: unused experts have 0
    old = {n: p.detach().clone() for n, p in methods.adapter_state(m).items()}
    old_state = {n: opt.state[p]["exp_avg"].clone() for n, p in methods.adapter_state(m).items()}
    report = dmep.prune(m, opt, tau=1e-6)
    assert sum(r["after"] for r in report.values()) < sum(r["before"] for r in report.values())
    assert_within(m(x), before, FORWARD)  # the kept experts' products, other shapes: summed in other blocks
    new = methods.adapter_state(m)
    assert sum(p.numel() for p in new.values()) < sum(p.numel() for p in old.values())
    live = {id(p) for g in opt.param_groups for p in g["params"]}
    assert live == {id(p) for p in new.values()} and len(opt.state) == len(new)
    for n, p in new.items():
        module = m.get_submodule(n.rsplit(".", 1)[0])
        keep = [j for j, u in enumerate(report[n.rsplit(".", 1)[0]]["util"]) if u >= 1e-6 / 8]
        keep = keep if len(keep) >= module.top_k else None
        assert opt.state[p]["exp_avg"].shape == p.shape
        if keep is not None:
            assert torch.equal(p.detach(), old[n][keep]) and torch.equal(opt.state[p]["exp_avg"], old_state[n][keep])
    m(x).sum().backward()  # and it still trains
    opt.step()


def test_dmep_tracking_counts_real_tokens_only():
    """A LoRA-MoE module's utilization counts its top-K choices over real tokens; with beta, an EMA of shares."""
    m = tiny_model("olmoe")
    methods.attach(m, "dmep", r=4, alpha=8, dmep_experts=8, dmep_topk=2)
    randomize_adapters(m)
    x, mask = ids(B=2, T=6), torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    m(x, mask)
    dmep.track(m, mask, beta=0.0)
    module = m.model.layers[0].self_attn.q_proj
    chosen = torch.topk(module.router_logits, 2, dim=-1).indices[mask.reshape(-1).bool()]  # (10 real tokens, 2)
    want = torch.bincount(chosen.reshape(-1), minlength=8) / 20.0  # 20 choices
    assert_within(module.util, want, 2)  # shares <= 1: a division, maybe a cast: a rounding each
    before = module.util.clone()
    m(x)
    dmep.track(m, None, beta=0.75)  # no mask: every token counts
    share = torch.bincount(torch.topk(module.router_logits, 2, dim=-1).indices.reshape(-1), minlength=8) / 24.0
    assert_within(module.util, 0.75 * before + 0.25 * share, 4)  # two products and a sum of values <= 1


def test_dmep_keep_rule():
    """Experts below tau/N are removed, but at least K (the most used) stay."""
    assert dmep.keep([0.5, 0.3, 0.15, 0.05], tau=0.5, k=2) == [0, 1, 2]
    assert dmep.keep([0.9, 0.1, 0.0, 0.0], tau=0.5, k=2) == [0, 1]
    assert dmep.keep([1.0, 0.0, 0.0, 0.0], tau=0.5, k=2) == [0, 1]


def test_pruned_dmep_adapter_round_trips(tmp_path):
    """A saved pruned DMEP adapter records its per-module counts; loading rebuilds the shapes and the logits."""
    m = tiny_model("olmoe")
    config = methods.attach(m, "dmep", r=4, alpha=8, dmep_experts=6, dmep_topk=2)
    randomize_adapters(m)
    x = ids(B=1, T=4)
    m(x)
    dmep.track(m)
    dmep.prune(m, None, tau=0.9)
    want = m(x)
    methods.save_adapter(m, tmp_path / "a", config)
    counts = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["options"]["dmep_counts"]
    assert counts and min(counts.values()) < 6
    fresh = tiny_model("olmoe")
    methods.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh(x), want)


def count_lb_calls(monkeypatch, n_experts):
    calls = []
    real = moe.load_balancing_loss

    def spy(logits, num_experts, top_k, attention_mask=None, all_sum=None):
        if num_experts == n_experts:
            calls.append(1)
        return real(logits, num_experts, top_k, attention_mask, all_sum)

    monkeypatch.setattr(moe, "load_balancing_loss", spy)
    return calls


@pytest.mark.parametrize("method", ["perft-r", "dmep"])
def test_router_logits_kept_for_balancing_are_the_forwards_under_grad_checkpoint(method):
    """The router logits a PERFT-R / DMEP module keeps for its balancing loss are the forward's after backward
    too: --grad-checkpoint's recomputation must not replace them, since the recomputed logits would keep their
    block's recomputed graph (every tensor it saved) alive until the next forward, every layer's by the end of
    backward (the memory model found it: DMEP at Mixtral-8x7B's shape, 1 x 2048, 94.9 GiB instead of 89.7)."""
    m = tiny_model("olmoe", hidden_size=64, intermediate_size=32, num_hidden_layers=3)
    methods.attach(m, method, r=4, alpha=8)
    m.train()
    m.grad_checkpoint = True
    x = ids()
    loss = m(x, labels=x) + methods.router_balance_loss(m)
    kept = {n: mod.router_logits for n, mod in m.named_modules() if getattr(mod, "router_logits", None) is not None}
    loss.backward()
    after = {n: mod.router_logits for n, mod in m.named_modules() if getattr(mod, "router_logits", None) is not None}
    assert kept and all(after[n] is kept[n] for n in kept), sorted(n for n in kept if after[n] is not kept[n])


@pytest.mark.parametrize("coef,expect", [(0.01, True), (0.0, False)])
def test_perft_r_router_balancing_is_on_only_when_asked(ckpt, train_file, tmp_path, monkeypatch, coef, expect):
    """--perft-aux-coef > 0 adds the adapter router's load-balancing loss every micro-batch; 0 leaves it out."""
    calls = count_lb_calls(monkeypatch, n_experts=3)
    assert train.main([str(a) for a in ("--model", ckpt, "--data", train_file, "--method", "perft-r", "--perft-experts", 3,
                                         "--perft-topk", 1, "--perft-aux-coef", coef, "--steps", 2, "--rank", 4,
                                         "--out", tmp_path / "o")]) == 0
    assert (len(calls) > 0) == expect


def test_dmep_trains_on_after_pruning_without_balancing(ckpt, train_file, tmp_path, monkeypatch):
    """DMEP end to end: balancing in warm-up only, pruning at 20%, training goes on; report and adapter written."""
    calls = count_lb_calls(monkeypatch, n_experts=6)
    out = tmp_path / "o"
    assert train.main([str(a) for a in ("--model", ckpt, "--data", train_file, "--method", "dmep", "--dmep-experts", 6,
                                         "--dmep-topk", 2, "--dmep-tau", 0.9, "--steps", 10, "--rank", 4,
                                         "--batch-size", 2, "--out", out)]) == 0
    report = json.loads((out / "dmep.json").read_text())
    assert report["step"] == 2 and report["trainable_after"] < report["trainable_before"]
    n_modules = len(report["modules"])
    assert len(calls) == 2 * n_modules  # 2 warm-up steps x 1 micro-batch x each module; none after pruning
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 10
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == report["trainable_after"]


# ------------------------------------------------------------------ dry-run parameter counts vs. the formulas

OLMOE = dict(D=2048, I=1024, E=64, L=16)


@pytest.mark.parametrize("method,flags,per_layer", [
    ("perft-r", ["--perft-experts", 8, "--perft-topk", 2], lambda D, I, E, r: 8 * 2 * D * r + D * 8),
    ("perft-e", [], lambda D, I, E, r: E * 2 * D * r),
    ("perft-s", [], lambda D, I, E, r: 2 * D * r),
    ("perft-d", ["--perft-shared", 3], lambda D, I, E, r: 3 * 2 * D * r),
    ("dmep", ["--dmep-experts", 8], lambda D, I, E, r: 4 * 8 * (r * (D + D) + D)),  # q/k/v/o: D x D on OLMoE
])
def test_dry_run_counts_match_the_formulas(capsys, method, flags, per_layer):
    """--dry-run on OLMoE-1B-7B's config: PERFT-R N*2*D*r + D*N per layer, PERFT-E E*2*D*r, DMEP before pruning."""
    r = 16
    assert train.main([str(a) for a in ["--model", f"{CONFIGS}/olmoe-1b-7b-0924", "--method", method, "--rank", r,
                                        "--dry-run", *flags]]) == 0
    want = OLMOE["L"] * per_layer(OLMOE["D"], OLMOE["I"], OLMOE["E"], r)
    assert f"trainable parameters: {want:,}" in capsys.readouterr().out


@pytest.mark.parametrize("method", ROUTED)
def test_exports_are_refused_for_input_dependent_adapters(ckpt, tmp_path, capsys, method):
    """--export-peft / --export-merged with PERFT or DMEP: a clear error naming the flag, exit 2."""
    with pytest.raises(SystemExit) as e:
        train.main(["--model", ckpt, "--data", "x.jsonl", "--method", method, "--export-merged", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "--export" in capsys.readouterr().err
    m = tiny_model("olmoe")
    methods.attach(m, method, r=4, alpha=8)
    with pytest.raises(methods.AdapterError, match="cannot be merged"):
        methods.merge(m)
