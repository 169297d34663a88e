"""Each method against its paper's / public code's definition, computed here directly (notes/fidelity.md)."""
import math
import random
import statistics

import pytest
import torch
import torch.nn.functional as F

from files import data
import dmep
import moe
import perft
import router_profile as rp
import sieve
from conftest import assert_within
from tiny import tiny_model
import methods


class CharTokenizer:
    """A stand-in tokenizer: BOS 1, then one id per character; it has an EOS (2) that must not be appended."""
    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text):
        return [1] + [3 + ord(c) % 90 for c in text]


RECORDS = [{"text": "the quick brown fox jumps over the lazy dog"}, {"text": "short"},  # under 10 characters: skipped
           {"prompt": "the router picks ", "completion": "the top two experts"},
           {"query": "the quick brown fox", "choices": ["jumps", "sleeps"], "gold": 0},
           {"question": "what is two plus two?", "answer": 4}, {"text": "a mixture of experts routes each token " * 3}]


def authors_counts(model, records, samples, seq_len, seed):
    """MoE-Sieve's rule, written out: shuffle with the seed, take `samples`, skip texts under 10 characters,
    encode the whole text (no EOS), cut at seq_len; every token's top-k of the fp32 softmax of its router logits,
    read off each router linear by a hook; one sequence at a time, so there is no padding at all."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    texts = [data.record_text(records[i]) for i in order[:samples]]
    cfg, layers = model.config, [i for i in range(model.config.num_hidden_layers) if model.config.is_moe_layer(i)]
    counts = {i: [0] * cfg.num_experts for i in layers}
    seen = {}
    hooks = [model.model.layers[i].mlp.gate.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, out))
             for i in layers]
    for t in texts:
        if len(t) < 10:
            continue
        ids = torch.tensor([CharTokenizer().encode(t)[:seq_len]])
        model(ids)
        for i in layers:
            top = torch.topk(F.softmax(seen[i].reshape(-1, cfg.num_experts).float(), -1), cfg.num_experts_per_tok).indices
            for e in top.reshape(-1).tolist():
                counts[i][e] += 1
    for h in hooks:
        h.remove()
    return [counts[i] for i in layers]


@pytest.mark.parametrize("samples,seq_len", [(None, 2048), (4, 12)])
def test_profile_counts_the_tokens_the_authors_count(samples, seq_len):
    """router_profile.calibration + profile (padded batches) == the authors' rule applied sequence by sequence."""
    m = tiny_model("olmoe")
    seqs = rp.calibration(CharTokenizer(), RECORDS, samples, seq_len, seed=123)
    assert all(s[0] == 1 and 2 not in s and len(s) <= seq_len for s in seqs)  # BOS kept, no EOS appended
    batches = [data.pad_batch(seqs[i:i + 2], [[1] * len(s) for s in seqs[i:i + 2]], 0) for i in range(0, len(seqs), 2)]
    p = rp.profile(m, batches)
    assert p["counts"] == authors_counts(m, RECORDS, samples, seq_len, 123)
    assert p["tokens"] == sum(map(len, seqs))


COUNTS = [[40, 10, 6, 4, 0, 0, 12, 8], [10, 10, 10, 10, 10, 10, 10, 10], [1, 2, 3, 4, 5, 6, 7, 52]]


def test_statistics_are_the_papers_definitions():
    """MoE-Sieve Table 2: CV = pstdev / mean per layer (its numbers) and stdev / mean (the companion notebook);
    global CV over the counts summed per expert; cold below half the uniform share; coverage of the top 25%."""
    s = rp.stats({"layers": [0, 1, 2], "counts": COUNTS})
    for row, x in zip(COUNTS, s["per_layer"]):
        mean = sum(row) / len(row)
        assert x["cv"] == pytest.approx(statistics.pstdev(row) / mean, rel=1e-12)  # float64 both ways
        assert x["cv_sample"] == pytest.approx(statistics.stdev(row) / mean, rel=1e-12)
        assert x["cold"] == sum(c < 0.5 * mean for c in row) / len(row)
        assert x["cov25"] == pytest.approx(sum(sorted(row)[-2:]) / sum(row), rel=1e-12)  # floor(8 / 4) = 2 experts
    summed = [sum(col) for col in zip(*COUNTS)]
    assert s["global_cv"] == pytest.approx(statistics.pstdev(summed) / statistics.mean(summed), rel=1e-12)
    assert s["global_cv_sample"] == pytest.approx(statistics.stdev(summed) / statistics.mean(summed), rel=1e-12)
    assert s["mean"]["cv"] == pytest.approx(sum(x["cv"] for x in s["per_layer"]) / 3, rel=1e-12)
    assert s["per_layer"][0]["cold"] == 3 / 8  # 4, 0, 0 < 5: the hand count
    text = rp.format_stats(s)
    assert "0.869" in text and "0.216" in text  # the paper's figures printed beside ours


def test_k_is_floor_of_the_fraction():
    assert [sieve.experts_per_layer(0.25, E) for E in (64, 60, 8, 3)] == [16, 15, 2, 1]  # at least 1
    assert sieve.experts_per_layer(0.3, 8) == 2  # 2.4 -> 2; half up would say the same, 0.3125 (2.5) would not
    assert sieve.experts_per_layer(0.3125, 8) == 2


def test_perft_init_is_the_public_codes():
    """A ~ N(0,1)*sqrt(2/r), B ~ N(0,1)*1e-6, PERFT-R's router ~ N(0, 0.02); `kaiming`: A bounded by 1/sqrt(D), B = 0."""
    torch.manual_seed(0)
    D, n, r = 2048, 4, 16
    ad = perft.perft_r(D, n, 2, False, r, 2.0)
    # n*r*D = 131,072 draws: the std's relative standard error is 1/sqrt(2 * 131072) = 0.2%; 2% is ten of those
    assert ad.A.std().item() == pytest.approx(math.sqrt(2 / r), rel=0.02)
    assert ad.A.mean().abs().item() < 0.01 * math.sqrt(2 / r)
    assert ad.B.std().item() == pytest.approx(1e-6, rel=0.02) and ad.B.abs().max().item() < 1e-5
    assert ad.router.std().item() == pytest.approx(0.02, rel=0.05)  # n*D = 8,192 draws: 0.8% standard error
    A, B = perft.init_factors(n, r, D, D, "kaiming")
    assert A.abs().max().item() <= 1 / math.sqrt(D) and torch.count_nonzero(B) == 0
    # PERFT-E's adapters through attach, and S / D: the default init is "theirs"
    for method in ("perft-e", "perft-s", "perft-d"):
        m = tiny_model("olmoe")
        methods.attach(m, method, r=16, alpha=32)
        ad = m.model.layers[0].mlp.experts.adapter if method == "perft-e" else m.model.layers[0].mlp.adapter
        # at least 512 draws: std's relative standard error <= 3.2%; 15% is about five of those
        assert ad.A.std().item() == pytest.approx(math.sqrt(2 / 16), rel=0.15), method
        assert 0 < ad.B.abs().max().item() < 1e-5, method
    with pytest.raises(methods.AdapterError, match="--perft-init"):
        methods.attach(tiny_model("olmoe"), "perft-s", r=4, alpha=8, perft_init="xavier")


def direct_balance_loss(logits, mask, n, k):
    """transformers' load_balancing_loss_func written out: the layers' rows concatenated, padding dropped,
    n * sum_e (top-k assignments to e per token row) * (mean router probability of e); uniform routing gives k."""
    real = mask.reshape(-1).bool()
    rows = torch.cat([lg[real] for lg in logits]).float()
    probs = F.softmax(rows, -1)
    top = torch.topk(probs, k, -1).indices
    share = torch.bincount(top.reshape(-1), minlength=n).float() / top.shape[0]
    return n * (share * probs.mean(0)).sum()


def test_perft_r_pooled_loss_and_the_base_aux_loss_equal_a_direct_computation():
    m = tiny_model("olmoe")
    methods.attach(m, "perft-r", r=4, alpha=8, perft_experts=4, perft_topk=2)
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    _, routing = m(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), return_routing=True, hidden=True)
    ads = [layer.mlp.adapter for layer in m.model.layers]
    want = direct_balance_loss([a.router_logits for a in ads], mask, 4, 2)
    # fp32 softmax (a few roundings), means over <= 22 rows, a sum over E = 4: 32 u of the loss's size
    assert_within(methods.router_balance_loss(m, mask), want, 32)
    per_module = sum(direct_balance_loss([a.router_logits], mask, 4, 2) for a in ads) / 2
    assert abs(want - per_module) > 1e-4  # pooling is not the average of the per-layer losses here
    base = direct_balance_loss([r.logits for r in routing], mask, 8, 2)
    assert_within(moe.load_balancing_loss([r.logits for r in routing], 8, 2, mask), base, 32)  # E = 8: as above


@pytest.mark.parametrize("norm", [False, True])
def test_perft_r_renormalises_as_the_base_model(norm):
    """perft_renorm None (the default): PERFT-R renormalises its top-K weights iff the base model does."""
    m = tiny_model("olmoe", norm_topk_prob=norm)
    methods.attach(m, "perft-r", r=4, alpha=8)
    assert m.model.layers[0].mlp.adapter.renorm is norm
    m = tiny_model("mixtral")  # Mixtral always renormalises
    methods.attach(m, "perft-r", r=4, alpha=8)
    assert m.model.layers[0].mlp.adapter.renorm is True
    m = tiny_model("mixtral")
    methods.attach(m, "perft-r", r=4, alpha=8, perft_renorm=False)
    assert m.model.layers[0].mlp.adapter.renorm is False


def test_dmep_utilization_over_a_stage_is_the_share_of_its_assignments():
    """Tracked over several micro-batches (with padding), the utilization at pruning is each LoRA expert's share
    of ALL the stage's top-K assignments of real tokens, not a moving average of the last ones."""
    m = tiny_model("olmoe")
    methods.attach(m, "dmep", r=4, alpha=8, dmep_experts=6, dmep_topk=2)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in methods.adapter_state(m).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    module = m.model.layers[1].self_attn.v_proj
    total = torch.zeros(6)
    for step in range(5):
        x = torch.randint(3, 96, (2, 5 + step), generator=g)
        mask = torch.ones_like(x)
        mask[1, : step + 1] = 0
        m(x, mask)
        dmep.track(m, mask)
        top = torch.topk(module.router_logits, 2, -1).indices[mask.reshape(-1).bool()]
        total += torch.bincount(top.reshape(-1), minlength=6)
    want = (total / total.sum()).tolist()
    report = dmep.prune(m, None, tau=0.5)
    got = report["model.layers.1.self_attn.v_proj"]
    assert got["util"] == pytest.approx([round(u, 4) for u in want], abs=1e-12)
    assert got["keep"] == dmep.keep(want, 0.5, 2) and got["after"] == len(got["keep"])


def test_plots_mark_the_plan_and_the_pruned_experts(tmp_path):
    """Both pictures are written (with matplotlib); the DMEP report carries what the picture marks."""
    pytest.importorskip("matplotlib")
    from files import plots
    p = {"model_type": "olmoe", "layers": [0, 2], "counts": [[5, 1, 0, 2], [1, 1, 6, 0]], "tokens": 8, "top_k": 2}
    assert plots.routing(p, tmp_path / "r.png", plan={0: [0], 2: [2]})
    report = {"a.q_proj": dict(before=4, after=2, util=[0.5, 0.45, 0.05, 0.0], keep=[0, 1], tau=0.5)}
    assert plots.dmep(report, tmp_path / "d.png")
    assert all((tmp_path / f).read_bytes()[:4] == b"\x89PNG" for f in ("r.png", "d.png"))


def public_perft_r(h, ad, base_w, weights):
    """PERFT-R as the public files loop it (modeling_olmoe.py l. 874-886, modeling_mixtral.py l. 1026-1045):
    softmax, top-K, renormalised or not; each adapter expert on its tokens, times routing_weights[top_x, idx]
    (the base router's, OLMoE) or shared_routing_adapter_routing_weights[top_x, idx] (its own, Mixtral)."""
    probs = F.softmax(F.linear(h, ad.router), dim=1, dtype=torch.float)
    own, sel = torch.topk(probs, ad.top_k, dim=-1)
    if ad.renorm:
        own = own / own.sum(-1, keepdim=True)
    w = base_w if weights == "base" else own
    out = torch.zeros_like(h)
    mask = F.one_hot(sel, num_classes=ad.A.shape[0]).permute(2, 1, 0)
    for j in range(ad.A.shape[0]):
        idx, top_x = torch.where(mask[j])
        y = (h[top_x] @ ad.A[j].T) @ ad.B[j].T * ad.scale
        out.index_add_(0, top_x, y * w[top_x, idx, None])
    return out


@pytest.mark.parametrize("weights", ["own", "base"])
def test_perft_r_weights_are_each_public_files(weights):
    """--perft-weights own: adapter j times its own router's top-K weight; base: times the BASE router's top-K
    weight of the slot it was chosen in. Both against the public files' loops, on the model's own MoE forward."""
    m = tiny_model("olmoe", norm_topk_prob=False)
    methods.attach(m, "perft-r", r=4, alpha=8, perft_experts=4, perft_topk=2, perft_weights=weights)
    mlp = m.model.layers[0].mlp
    ad = mlp.adapter
    with torch.no_grad():
        ad.B.normal_()  # B ~ 1e-6 at init would hide the adapter's share
        ad.router.normal_()
    h = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(3))
    y, routing = mlp(h)
    mlp.adapter = None
    y0, _ = mlp(h)
    mlp.adapter = ad
    want = public_perft_r(h[0], ad, routing.topk_w, weights)
    assert_within((y - y0)[0], want, 32)  # products of length <= D = 32, one sum of 2: fp32 rounding
    other = public_perft_r(h[0], ad, routing.topk_w, "own" if weights == "base" else "base")
    assert (want - other).abs().max() > 1e-3  # the two formulas differ here


def test_perft_r_base_weights_leave_its_router_to_the_balancing_loss():
    """Under `base` the language-model loss gives the adapter router no gradient (the weights that reach the
    output are the base router's); its balancing loss does. Under `own` the LM loss reaches it."""
    for weights, lm_grad in (("base", False), ("own", True)):
        m = tiny_model("olmoe")
        methods.attach(m, "perft-r", r=4, alpha=8, perft_weights=weights)
        for a in (l.mlp.adapter for l in m.model.layers):
            with torch.no_grad():
                a.B.normal_()
        ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(5))
        m(ids).square().mean().backward()
        g = m.model.layers[0].mlp.adapter.router.grad
        assert (g is not None and bool(g.abs().sum() > 0)) is lm_grad, weights
        m.zero_grad()
        m(ids)
        methods.router_balance_loss(m).backward()
        assert m.model.layers[0].mlp.adapter.router.grad.abs().sum() > 0


def test_perft_weights_file_follows_each_bases_public_file():
    """The recipe's `file`: base on OLMoE (the OLMoE file), own on Mixtral; recorded resolved; too many slots refused."""
    import training.flags as flags
    assert flags.RECIPES["perft"]["perft_weights"] == "file"
    for kind, want in (("olmoe", "base"), ("mixtral", "own")):
        m = tiny_model(kind)
        cfg = methods.attach(m, "perft-r", r=4, alpha=8, perft_weights="file")
        assert m.model.layers[0].mlp.adapter.weights == want and cfg["options"]["perft_weights"] == want
    with pytest.raises(methods.AdapterError, match="--perft-weights base"):
        methods.attach(tiny_model("olmoe"), "perft-r", r=4, alpha=8, perft_experts=4, perft_topk=3, perft_weights="base")


def test_recipes_set_eos_as_their_public_code():
    """moe-sieve: no EOS (src/data_registry.py tokenizes the formatted text); perft: EOS (finetune.py's
    add_eos_token=True); train.py's default, which the study runs, keeps EOS."""
    import training.flags as flags
    assert flags.RECIPES["moe-sieve"]["eos"] == "off" and flags.RECIPES["perft"]["eos"] == "on"
    assert flags.build_parser(sorted(flags.RECIPES)).get_default("eos") == "on"


def test_dropout_masks_are_per_module():
    """As the public code (peft's lora_dropout per target module; PERFT's nn.Dropout per adapter expert): an
    expert's gate and up LoRA draw a mask each, on the plain and the fast path, and PERFT-R's n adapters one each.
    Made visible by equal factors: with one shared mask the two updates would be equal."""
    import lora_fast
    import moe_fast
    from lora import ExpertLoRA
    torch.manual_seed(0)
    experts = moe.Experts(4, 16, 8)
    ad = ExpertLoRA(experts, [0, 1, 2, 3], r=8, alpha=8, dropout=0.5).train()
    with torch.no_grad():
        ad.gate_B.normal_()
        ad.up_A.copy_(ad.gate_A), ad.up_B.copy_(ad.gate_B)
    x = torch.randn(6, 16)
    gu = ad.gate_up(0, torch.zeros(6, 16), x)  # plain
    assert (gu[:, :8] - gu[:, 8:]).abs().max() > 1e-3
    idx = torch.tensor([[0, 1]] * 6)
    g = moe_fast.ExpertGroups.sort(idx, 4)
    work = ad.grouped_prepare(g, x)
    gu = lora_fast.expert_lora_gate_up(ad, torch.zeros(12, 16), x[g.token], work)  # fast
    assert (gu[:, :8] - gu[:, 8:]).abs().max() > 1e-3
    ad.eval()  # no dropout: the two halves agree
    gu = lora_fast.expert_lora_gate_up(ad, torch.zeros(12, 16), x[g.token], work)
    assert_within(gu[:, :8], gu[:, 8:], 0)
    # PERFT-R: each of its n adapters its own mask (equal factors, all gated equally)
    pr = perft.ParallelAdapter(16, 2, 4, 1.0, top_k=None, dropout=0.5).train()
    with torch.no_grad():
        pr.A[1].copy_(pr.A[0])
    z = perft.dropped(pr.dropout, x, 2)
    assert z.shape == (2, 6, 16) and not torch.equal(z[0] != 0, z[1] != 0)
    assert perft.dropped(pr.dropout.eval(), x, 2) is x
