"""LoRA invariants on tiny random models built with our own code (fp32, CPU)."""
import pytest
import torch

import lora
import moe
from conftest import FORWARD, assert_within
from tiny import expert_layer_inputs, kept_for_backward, tiny_model
import methods
import moe_fast

TYPES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe"]
PLAN = {0: [1, 5, 6]}  # layer 0: three of eight experts; layer 1 (dense in the Qwen2 tiny model) none


def ids(seed=0, B=3, T=24):
    return torch.randint(3, 96, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in methods.adapter_state(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("method", ["attn", "lora", "sieve"])
def test_zero_B_gives_exactly_the_base_logits(model_type, method):
    """With B = 0 (the initialisation) every method's logits equal the base model's bit for bit."""
    m = tiny_model(model_type)
    x = ids()
    base = m(x)
    methods.attach(m, method, r=4, alpha=8, plan=PLAN)
    assert torch.equal(m(x), base)


@pytest.mark.parametrize("model_type,method", [(t, "sieve") for t in TYPES] + [("olmoe", "lora"), ("mixtral", "lora")])
def test_fast_path_equals_loop_path_with_expert_lora(model_type, method):
    """Expert LoRA on a subset of experts (sieve) or on all (lora): the grouped fast path, whose backward
    gathers the LoRA inputs again, equals the per-expert loop (plain autograd), logits and gradients."""
    m = tiny_model(model_type)
    methods.attach(m, method, r=4, alpha=8, plan={0: [1, 5, 6], 1: [0, 7]})
    randomize_adapters(m)
    x = ids()
    out = {}
    for path in ("fast", "loop"):
        m.set_expert_path(path)
        m.zero_grad()
        logits = m(x)
        logits.square().mean().backward()
        out[path] = logits.detach(), {n: p.grad.clone() for n, p in methods.adapter_state(m).items()}
    # the same products summed in other blocks (FORWARD, see conftest); the gradients run the forward's
    # reductions again, transposed: twice that, of each gradient's own largest entry
    assert_within(out["fast"][0], out["loop"][0], FORWARD, msg="logits:")
    for n in out["fast"][1]:
        assert_within(out["fast"][1][n], out["loop"][1][n], 2 * FORWARD, msg=n)


@pytest.mark.parametrize("r", [3, 8])
def test_unaligned_rank_is_exact_in_the_grouped_path(r):
    """A rank that is not a multiple of 8 (padded with zeros for grouped_mm) gives the loop's result."""
    m = tiny_model("olmoe")
    methods.attach(m, "lora", r=r, alpha=2 * r)
    randomize_adapters(m)
    x = ids()
    fast = m(x)
    m.set_expert_path("loop")
    assert_within(fast, m(x), FORWARD)  # the zero padding adds exact zeros; the rest is grouped_mm vs the loop


@pytest.mark.parametrize("model_type", TYPES)
def test_merged_equals_unmerged(model_type):
    """Folding every adapter into the base weights gives the adapted logits; unmerging restores the base."""
    m = tiny_model(model_type)
    x = ids()
    base = m(x)
    methods.attach(m, "lora", r=4, alpha=8, rslora=True)
    randomize_adapters(m)
    adapted = m(x)
    assert (adapted - base).abs().max() > 1e-2  # the adapters really change the output
    methods.merge(m)
    # merging rounds each weight once (W + s B A, a sum over r <= 8): one more rounding step at the input of
    # every reduction, well inside the forward's budget (FORWARD, see conftest)
    assert_within(m(x), adapted, FORWARD)
    methods.merge(m, -1)
    for mod in methods.adapter_modules(m):  # switch the adapters off: the weights must be the base ones again
        mod.merged = True
    assert_within(m(x), base, FORWARD)  # unmerging rounds each weight once more


@pytest.mark.parametrize("model_type", TYPES)
def test_gradients_reach_every_adapter_and_no_frozen_tensor(model_type):
    """After one backward, every LoRA tensor (attention, router, shared, each adapted expert) has a
    non-zero gradient, and no base tensor has a gradient at all."""
    m = tiny_model(model_type).train()
    methods.attach(m, "sieve", r=4, alpha=8, plan={0: [1, 5, 6], 1: [2]})
    randomize_adapters(m)
    m(ids(B=4, T=32)).logsumexp(-1).mean().backward()
    state = methods.adapter_state(m)
    names = set(state)
    assert any(".mlp.gate." in n for n in names) and any(".experts.adapter." in n for n in names)
    for n, p in state.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        if ".experts.adapter." in n:  # every adapted expert, not just the tensor as a whole
            assert (p.grad.flatten(1).abs().sum(1) > 0).all(), n
    for n, p in m.named_parameters():
        if n not in names:
            assert p.grad is None and not p.requires_grad, n


@pytest.mark.parametrize("ids_", [range(8), [1, 5, 6]])
def test_expert_lora_keeps_no_row_sized_input(ids_):
    """Memory: expert LoRA adds nothing of the layer's width per (token, slot) pair to what the frozen layer
    keeps for backward (its gate_up and down outputs): its A products' inputs, the (P, D) gathered rows and
    the (P, I) swiglu output, are made again in backward; only the rank-wide (rows, 2r) and (rows, r) products
    are kept. Its gradients still equal the loop path's (test above)."""
    N, K, E, D, I, r = 40, 2, 8, 48, 32, 4
    experts = moe.Experts(E, D, I).requires_grad_(False)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.1)
        experts.down_proj.normal_(0, 0.1)
    experts.adapter = lora.ExpertLoRA(experts, ids_, r, 2 * r)
    with torch.no_grad():
        for p in experts.adapter.parameters():
            p.normal_(0, 0.1)
    x, idx, w = expert_layer_inputs(N, K, E, D)
    y, kept = kept_for_backward(lambda: moe_fast.grouped_experts(x, idx, w, experts.gate_up_proj, experts.down_proj, experts.adapter), experts.gate_up_proj, experts.down_proj)
    P, n = N * K, int(torch.isin(idx, torch.tensor(list(ids_))).sum())
    assert sorted(s for s in kept if s[0] in (P, n) and s[1] > 2 * 8) == [(P, D), (P, 2 * I)], kept  # 2r padded: 16
    y.sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in experts.adapter.parameters())


def test_dropout_keeps_the_dropped_rows_and_trains():
    """With LoRA dropout in training mode the dropped rows cannot be made again in backward, so the fast path
    keeps them (plain autograd); every adapter tensor still gets a gradient."""
    m = tiny_model("olmoe").train()
    methods.attach(m, "lora", r=4, alpha=8, dropout=0.5)
    randomize_adapters(m)
    m(ids()).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in methods.adapter_state(m).values())


@pytest.mark.parametrize("method,dropout", [("lora", 0.0), ("sieve", 0.0), ("lora", 0.3), ("perft-e", 0.0)])
def test_grad_checkpoint_gives_the_same_gradients(method, dropout):
    """Recomputing each block in backward (train.py --grad-checkpoint) gives the loss and the gradients of
    the plain backward, with dropout too (checkpoint replays the random state) and with the adapters' own
    recomputed rows nested inside."""
    out = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = tiny_model("olmoe").train()
        methods.attach(m, method, r=4, alpha=8, dropout=dropout, plan=PLAN)
        randomize_adapters(m)
        m.grad_checkpoint = ckpt
        torch.manual_seed(1)
        loss = m(ids(), labels=ids(seed=1))
        loss.backward()
        out[ckpt] = loss.detach(), {n: p.grad for n, p in methods.adapter_state(m).items()}
    # the same ops run again in backward; only the order in which autograd adds up a tensor's gradient
    # contributions may change: a few roundings of the values compared
    assert_within(out[True][0], out[False][0], 4, msg="loss:")
    for n, g in out[False][1].items():
        assert_within(out[True][1][n], g, 16, msg=n)


def test_tokens_routed_to_frozen_experts_cost_no_lora_work(monkeypatch):
    """The expert-LoRA grouped products run on exactly the (token, slot) pairs routed to adapted experts."""
    m = tiny_model("olmoe")
    plan = {0: [1, 5, 6], 1: [3]}
    methods.attach(m, "sieve", r=8, alpha=16, plan=plan)
    calls = []
    real = moe_fast.grouped_mm

    def spy(a, b, offs):
        assert a.shape[0] == int(offs[-1])  # the input holds exactly the rows multiplied
        calls.append((b.shape[0], a.shape[0]))  # (groups, rows multiplied)
        return real(a, b, offs=offs)

    monkeypatch.setattr(moe_fast, "grouped_mm", spy)
    _, routing = m(ids(), return_routing=True)
    for r in routing:
        routed = int(torch.isin(r.topk_idx, torch.tensor(plan[r.layer])).sum())
        lora_calls = [rows for groups, rows in calls if groups == len(plan[r.layer])]
        # 4 products: gate+up A, gate+up B (block diagonal), down A, down B; each on the routed rows only
        assert len(lora_calls) == 4 and all(rows == routed for rows in lora_calls), (r.layer, routed, lora_calls)
        calls[:] = [c for c in calls if c[0] != len(plan[r.layer])]
    assert all(groups == 8 and rows == 3 * 24 * 2 for groups, rows in calls)  # the base products: all pairs


def test_no_token_routed_to_an_adapted_expert_gives_the_base_output():
    """A batch in which no (token, slot) pair reaches an adapted expert: no empty grouped product, the
    base output exactly, in both paths."""
    experts = tiny_model("olmoe").model.layers[0].mlp.experts
    x = torch.randn(10, experts.gate_up_proj.shape[-1])
    idx, w = torch.tensor([[0, 1]] * 10), torch.full((10, 2), 0.5)
    base = experts(x, idx, w)
    experts.adapter = lora.ExpertLoRA(experts, [5], r=4, alpha=8)
    with torch.no_grad():
        experts.adapter.gate_B.fill_(1.0), experts.adapter.up_B.fill_(1.0), experts.adapter.down_B.fill_(1.0)
    for path in ("fast", "loop"):
        moe.set_plain(experts, path == "loop")
        assert torch.equal(experts(x, idx, w), base), path


def test_loop_path_skips_frozen_experts(monkeypatch):
    """In the loop path the adapter computes only for adapted experts."""
    m = tiny_model("olmoe")
    methods.attach(m, "sieve", r=4, alpha=8, plan={0: [2], 1: [4]})
    m.set_expert_path("loop")
    seen = []
    real = lora.ExpertLoRA._delta
    monkeypatch.setattr(lora.ExpertLoRA, "_delta", lambda self, x, j, A, B: seen.append(self.ids[j]) or real(self, x, j, A, B))
    m(ids())
    assert set(seen) == {2, 4}


def test_save_load_round_trip(tmp_path):
    """A saved adapter loaded onto a fresh copy of the base reproduces the adapted logits exactly."""
    m = tiny_model("qwen2_moe")
    config = methods.attach(m, "sieve", r=4, alpha=8, plan={0: [0, 3]})
    randomize_adapters(m)
    x = ids()
    want = m(x)
    methods.save_adapter(m, tmp_path / "a", config)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    fresh = tiny_model("qwen2_moe")
    got = methods.load_adapter(fresh, tmp_path / "a")
    assert got["plan"] == {"0": [0, 3]}
    assert torch.equal(fresh(x), want)


def test_adapter_for_another_base_is_refused(tmp_path):
    """Loading an adapter onto a base with a different config fails with a message naming both."""
    m = tiny_model("olmoe")
    methods.save_adapter(m, tmp_path / "a", methods.attach(m, "attn", r=4, alpha=8))
    other = tiny_model("olmoe", hidden_size=64)
    with pytest.raises(methods.AdapterError, match="fingerprint"):
        methods.load_adapter(other, tmp_path / "a")
    with pytest.raises(methods.AdapterError, match="mixtral"):
        methods.load_adapter(tiny_model("mixtral"), tmp_path / "a")


@pytest.mark.parametrize("broken", ["rank", "nan", "truncated", "missing"])
def test_broken_adapter_tensors_name_the_file_and_tensor(tmp_path, broken):
    """adapter.safetensors that does not match its adapter_config.json (another rank, a tensor missing), is
    cut short, or holds a NaN: an AdapterError naming the file (and the tensor, where there is one)."""
    import json
    from safetensors.torch import load_file, save_file
    m = tiny_model("olmoe")
    methods.save_adapter(m, tmp_path / "a", methods.attach(m, "lora", r=4, alpha=8))
    f, c = tmp_path / "a" / "adapter.safetensors", tmp_path / "a" / "adapter_config.json"
    t = load_file(f)
    name = "model.layers.0.mlp.experts.adapter.down_B"
    if broken == "rank":  # the config says r=8, the tensors have rank 4
        c.write_text(json.dumps(dict(json.loads(c.read_text()), r=8)))
    elif broken == "nan":
        t[name][0, 0, 0] = float("nan")
    elif broken == "missing":
        del t[name]
    if broken in ("nan", "missing"):
        save_file(t, f)
    if broken == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(methods.AdapterError, match="adapter.safetensors") as info:
        methods.load_adapter(tiny_model("olmoe"), tmp_path / "a")
    assert broken == "truncated" or "model.layers." in str(info.value), str(info.value)


@pytest.mark.parametrize("broken", ["no method", "a list", "rank a string", "unknown method"])
def test_broken_adapter_config_names_the_file(tmp_path, broken):
    """An adapter_config.json with a key missing or of the wrong type, or a value attach refuses: an AdapterError
    naming the file (not a KeyError / TypeError traceback, nor a flag the loading command does not have)."""
    import json
    m = tiny_model("olmoe")
    methods.save_adapter(m, tmp_path / "a", methods.attach(m, "attn", r=4, alpha=8))
    f = tmp_path / "a" / "adapter_config.json"
    c = json.loads(f.read_text())
    c = {"no method": lambda: {k: v for k, v in c.items() if k != "method"}, "a list": lambda: [1],
         "rank a string": lambda: dict(c, r="4"), "unknown method": lambda: dict(c, method="dora")}[broken]()
    f.write_text(json.dumps(c))
    with pytest.raises(methods.AdapterError, match="adapter_config.json"):
        methods.load_adapter(tiny_model("olmoe"), tmp_path / "a")


def test_bad_rank_and_method_are_refused():
    """Rank 0 and an unknown method raise errors naming the flag."""
    with pytest.raises(methods.AdapterError, match="--rank"):
        methods.attach(tiny_model(), "lora", r=0, alpha=8)
    with pytest.raises(methods.AdapterError, match="--method"):
        methods.attach(tiny_model(), "dora", r=4, alpha=8)


def test_compiled_blocks_match_fp32_eager():
    """torch.compile of every block (train.py / bench.py --compile), in bf16 (the only dtype torch compiles
    grouped_mm for), with a sieve subset on layer 0 (its nonzero is a graph break) and every expert on layer 1:
    loss and every adapter gradient agree with the fp32 eager model. Every token is routed to all 8 experts
    (top-8 of 8), so no bf16 rounding can flip a routing choice: with top-2, one flipped token moved a gradient
    by 10% or not depending on the rounding of unrelated ops, which made this a test of luck. Tolerance: 3 u(bf16)
    (1.2%) for the loss, 26 u(bf16) (10%) of each gradient's largest entry, see below."""
    x = ids(B=2, T=32)
    out = {}
    for mode in ("fp32", "compiled"):
        torch._dynamo.reset()
        m = tiny_model("olmoe", hidden_size=64, intermediate_size=32, num_experts_per_tok=8)
        m = (m if mode == "fp32" else m.to(torch.bfloat16)).train()
        methods.attach(m, "sieve", r=8, alpha=16, plan={0: [1, 2], 1: list(range(8))})
        randomize_adapters(m)
        if mode == "compiled":
            for block in m.model.layers:
                block.compile()
        loss = m(x, labels=x)
        loss.backward()
        out[mode] = loss.detach().float(), {n: p.grad.float() for n, p in methods.adapter_state(m).items()}
    torch._dynamo.reset()
    # bf16 against fp32: every op of the forward rounds its output to bf16 (u = 2^-8), and the mean loss keeps
    # ~2-3 of those roundings of its size; a gradient passes back through the 2 layers' ~12 rounded products
    # (attention, experts and their LoRA, the head) and through as many forward roundings: 26 u = 10%
    assert_within(out["compiled"][0], out["fp32"][0], 3, torch.bfloat16, msg="loss:")
    for n, g in out["fp32"][1].items():
        assert_within(out["compiled"][1][n], g, 26, torch.bfloat16, msg=n)


@pytest.mark.parametrize("method", ["attn", "lora", "perft-e"])
def test_compiled_block_is_one_graph(method):
    """torch.compile sees each block, its custom autograd Functions' backwards included, as one graph with no
    break (a break splits the block and leaves the ops around it unfused). The sieve's nonzero is the one
    break by design, so it is not in this list."""
    m = tiny_model("olmoe", hidden_size=64, intermediate_size=32).to(torch.bfloat16).train()
    methods.attach(m, method, r=8, alpha=16)
    B, T = 2, 32
    x = torch.randn(B, T, 64, dtype=torch.bfloat16, requires_grad=True)
    emb = torch.arange(T).expand(B, T)[..., None].float() * m.inv_freq
    emb = torch.cat((emb, emb), -1)
    torch._dynamo.reset()
    report = torch._dynamo.explain(m.model.layers[0])(x, emb.cos().bfloat16(), emb.sin().bfloat16(), None, None)
    torch._dynamo.reset()
    assert (report.graph_count, report.graph_break_count) == (1, 0), [b.reason for b in report.break_reasons]


@pytest.mark.parametrize("method", ["lora", "perft-r"])
def test_every_block_reuses_one_compiled_graph(method):
    """The blocks of a model compile to one graph between them: nothing in a block reads its layer index, a
    Python int that torch.compile would specialise on (one compilation per layer, and past dynamo's recompile
    limit of 8 the remaining layers would silently run eagerly). The routing still carries the layer."""
    from torch._dynamo.testing import CompileCounter

    m = tiny_model("olmoe", hidden_size=64, intermediate_size=32, num_hidden_layers=4).to(torch.bfloat16)
    methods.attach(m, method, r=8, alpha=16)
    counter = CompileCounter()
    torch._dynamo.reset()
    for block in m.model.layers:
        block.compile(backend=counter)
    with torch.no_grad():
        _, routing = m(torch.randint(0, 96, (2, 16)), return_routing=True)
    torch._dynamo.reset()
    assert counter.frame_count == 1
    assert [r.layer for r in routing] == [0, 1, 2, 3]
