"""What a GPU run would meet, checked on the CPU with a fake device capability, a fake grouped_mm, a fake
free-memory figure or a counting writer: the slow-grouped_mm warning, zero gradients for experts without
rows whatever grouped_mm returns for them, exports that hold one shard at a time, and evaluation that never
holds (B, T, V) logits."""
import warnings
import weakref

import pytest
import torch

from files import data
import eval as ev
from files import export
from files import hub
import lora
import moe
import perft
from tiny import _config_dict, expert_layer_inputs, save_checkpoint, tiny_model
import methods
import moe_fast

FP32 = dict(atol=1e-5, rtol=1e-5)  # fp32 values of size ~1-10 regrouped: a few roundings (test_kernels.py)


# ----------------------------------------------------------------------------- the slow-grouped_mm warning

@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA build without ROCm whose device has the capability set by calling the returned function."""
    cap = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap[0])
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(moe_fast, "_warned_slow", False)
    return lambda c: cap.__setitem__(0, c)


@pytest.mark.parametrize("cap,dtype", [((8, 0), torch.bfloat16), ((9, 0), torch.float32), ((12, 0), torch.bfloat16),
                                       ((8, 6), torch.float16)])
def test_grouped_mm_without_fast_kernel_warns_once_naming_capability_and_dtype(fake_cuda, cap, dtype):
    """An A100 (8.0), float32 on an H100, a consumer Blackwell (12.0): one warning naming the fallback, the
    capability and the dtype, and no second one in the same process."""
    fake_cuda(cap)
    with pytest.warns(UserWarning, match=rf"{str(dtype)[6:]} on cuda.*capability {cap[0]}\.{cap[1]}.*falls back"):
        moe_fast.warn_if_slow(torch.device("cuda"), dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moe_fast.warn_if_slow(torch.device("cuda"), dtype)


@pytest.mark.parametrize("cap", [(9, 0), (10, 0)])
def test_grouped_mm_fast_kernel_does_not_warn(fake_cuda, cap):
    """bfloat16 on capability 9.x (H100/H200) or 10.x (B200): torch's fast kernel runs, nothing is said.
    Nor on the CPU, where grouped_mm is always the per-group loop."""
    fake_cuda(cap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moe_fast.warn_if_slow(torch.device("cuda"), torch.bfloat16)
        moe_fast.warn_if_slow(torch.device("cpu"), torch.float32)
    assert not moe_fast._warned_slow


def test_grouped_experts_checks_its_device_and_dtype(monkeypatch):
    """The grouped expert path asks warn_if_slow about the device of its rows and the dtype of its weights."""
    seen = []
    monkeypatch.setattr(moe_fast, "warn_if_slow", lambda device, dtype: seen.append((device, dtype)))
    E, D, I = 8, 48, 32
    x, idx, w = expert_layer_inputs(10, 2, E, D)
    moe_fast.grouped_experts(x, idx, w, torch.randn(E, 2 * I, D), torch.randn(E, D, I))
    assert seen == [(torch.device("cpu"), torch.float32)]


# ----------------------------------------------------------------------------- empty groups' gradients

def _garbage_for_empty_groups(real):
    """grouped_mm as Blackwell's kernel behaves (pytorch issue 172439): the weight-gradient form (2D x 2D,
    grouped along the rows) returns NaN for a group without rows instead of zeros."""
    def fake(a, b, offs):
        out = real(a, b, offs=offs)
        if a.dim() == 2 and b.dim() == 2:  # (m, p, q)
            sizes = torch.diff(offs, prepend=offs.new_zeros(1))
            out = torch.where(sizes[:, None, None] == 0, torch.nan, out)
        return out
    return fake


def _adapted_experts(method, ids=None, dropout=0.0):
    E, D, I = 8, 48, 32
    experts = moe.Experts(E, D, I).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.copy_(0.1 * torch.randn(E, 2 * I, D, generator=g))
        experts.down_proj.copy_(0.1 * torch.randn(E, D, I, generator=g))
    if method == "perft-e":
        experts.adapter = perft.ExpertAdapter(experts, 4, 8, dropout=dropout)
    else:
        experts.adapter = lora.ExpertLoRA(experts, ids, 4, 8, dropout=dropout)
    with torch.no_grad():
        for p in experts.adapter.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return experts


def _adapter_grads(experts, reference):
    """Gradients of every adapter tensor, on a batch in which expert 3 gets no row."""
    x, _, w = expert_layer_inputs(40, 2, 8, 48)
    others = torch.tensor([0, 1, 2, 4, 5, 6, 7])
    idx = torch.stack([others[torch.randperm(7, generator=torch.Generator().manual_seed(i))[:2]] for i in range(40)])
    moe.set_plain(experts, reference)
    experts.zero_grad()
    torch.manual_seed(0)  # the same dropout masks in both paths (the plain one draws them alike only without dropout)
    (experts(x, idx, w) * torch.randn(40, 48, generator=torch.Generator().manual_seed(1))).sum().backward()
    return {n: p.grad.clone() for n, p in experts.adapter.named_parameters()}


@pytest.mark.parametrize("method,ids,dropout", [("sieve", [1, 3, 6], 0.0), ("lora", list(range(8)), 0.0),
                                                ("perft-e", None, 0.0), ("sieve", [1, 3, 6], 0.1)],
                         ids=["sieve", "lora", "perft-e", "sieve-dropout"])
def test_expert_without_rows_gets_exactly_zero_gradient_whatever_grouped_mm_returns(monkeypatch, method, ids,
                                                                                   dropout):
    """Expert 3 is adapted but gets no row. With a grouped_mm that returns NaN for empty groups in the
    weight-gradient product, on a device where that is known to happen (faked), expert 3's factors get
    exactly zero gradient and every other gradient is the loop path's; without the zeroing the fake would
    have reached them (checked too, so the fake is known to bite). Dropout: the A product autograd keeps."""
    experts = _adapted_experts(method, ids, dropout)
    j = 3 if ids is None else ids.index(3)  # expert 3's slot in the adapter's stacked factors
    monkeypatch.setattr(moe_fast, "_torch_grouped_mm", _garbage_for_empty_groups(moe_fast._torch_grouped_mm))
    monkeypatch.setattr(moe_fast, "_empty_groups_unreliable", lambda device: False)
    assert all(g[j].isnan().all() for g in _adapter_grads(experts, reference=False).values())
    monkeypatch.setattr(moe_fast, "_empty_groups_unreliable", lambda device: True)
    fast = _adapter_grads(experts, reference=False)
    if dropout == 0:
        plain = _adapter_grads(experts, reference=True)
        for n in fast:
            torch.testing.assert_close(fast[n], plain[n], **FP32, msg=n)
    for n, g in fast.items():
        assert torch.equal(g[j], torch.zeros_like(g[j])), n
        assert g.abs().sum() > 0 and not g.isnan().any(), n


def test_empty_groups_are_zeroed_on_blackwell_only(monkeypatch):
    """The zeroing costs a pass over the factor gradients, so it is paid where grouped_mm's kernel is wrong
    (capability 10.x and later) and in compiled graphs, not on the CPU or on capability 9.x."""
    cap = [(10, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap[0])
    assert moe_fast._empty_groups_unreliable(torch.device("cuda"))
    cap[0] = (9, 0)
    assert not moe_fast._empty_groups_unreliable(torch.device("cuda"))
    assert not moe_fast._empty_groups_unreliable(torch.device("cpu"))


# ----------------------------------------------------------------------------- exports stream

@pytest.mark.parametrize("model_type", ["olmoe", "mixtral"])
def test_merged_export_holds_one_shard_of_host_tensors_at_a_time(tmp_path, monkeypatch, model_type):
    """export_merged writes shard by shard: when a shard is written, no host tensor of an earlier one is
    alive any more, and no shard holds more than shard_bytes (or its one larger tensor). The files load as
    base + adapter, and the model is left unmerged (as before, up to the round trip's rounding)."""
    model = tiny_model(model_type)
    save_checkpoint(model, _config_dict(model_type), tmp_path / "src")
    methods.attach(model, "lora", r=4, alpha=8)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in methods.adapter_state(model).values():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    x = torch.randint(3, 96, (2, 12), generator=g)
    before = model(x).detach()
    written, alive, real = [], [], export.save_file

    def counting_writer(tensors, path, metadata=None):
        assert all(ref() is None for ref in alive), "a host tensor of an earlier shard is still held"
        assert all(t.device.type == "cpu" for t in tensors.values())
        written.append(sum(t.nbytes for t in tensors.values()))
        alive[:] = [weakref.ref(t) for t in tensors.values()]
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(export, "save_file", counting_writer)
    shard_bytes = 16 << 10
    export.export_merged(model, str(tmp_path / "src"), str(tmp_path / "merged"), shard_bytes=shard_bytes)
    biggest = max(t.nbytes for t in export.checkpoint_views(model).values())
    assert len(written) >= 3 and max(written) <= max(shard_bytes, biggest), written
    # merged W + scale B A against the unmerged sum of products: fp32 regroupings of logits of size ~1
    torch.testing.assert_close(hub.load_model(str(tmp_path / "merged"))(x), before, atol=1e-4, rtol=1e-4)
    # merge then unmerge rounds W + s BA - s BA in fp32 once each: the weights, so the logits, within fp32 rounding
    torch.testing.assert_close(model(x), before)


# ----------------------------------------------------------------------------- evaluation streams

def test_eval_log_probs_stream_through_the_head_without_full_logits(monkeypatch):
    """eval's per-token log-probabilities from moe.Transformer: the head sees only the labelled rows, at most
    `chunk` at a time (never a (B, T, V) tensor), and the numbers are those of the full logits' fp32
    log-softmax (right-padded batch, some labels ignored)."""
    model = tiny_model("olmoe")
    seqs = [[5, 9, 14, 3, 77, 40, 8, 19, 33], [6, 7, 8, 9], [50, 51, 52, 53, 54, 55]]
    ids, mask, labels = data.pad_batch(seqs, [[0] + [1] * (len(s) - 1) for s in seqs], 0)
    with torch.no_grad():
        logits = model(ids, mask)  # (B, T, V): the plain way, for the expected numbers
        full = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        full = full * (labels != data.IGNORE)
        shapes, head = [], model.head
        monkeypatch.setattr(model, "head", lambda h: shapes.append(tuple(h.shape)) or head(h))
        streamed = ev._label_logprobs(model, ids, mask, labels, chunk=5)
    n = int((labels != data.IGNORE).sum())
    assert all(len(s) == 2 and s[0] <= 5 for s in shapes) and sum(s[0] for s in shapes) == n, shapes
    torch.testing.assert_close(streamed, full, **FP32)  # the same fp32 math per row; log-probs of size ~5


def test_generation_applies_the_head_to_the_last_position_only(monkeypatch):
    """generate.generate's prefill asks moe.Transformer for hidden states and puts only the last position
    of each prompt through the head: (B, D) rows per call, never (B, T, V) logits. Greedy tokens are those
    of the full forward's last-position argmax, step by step."""
    import generate

    model = tiny_model("olmoe")
    prompt = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expect = prompt
        for _ in range(4):  # no cache: the whole sequence again each step
            expect = torch.cat([expect, model(expect)[:, -1].argmax(-1, keepdim=True)], 1)
    shapes, head = [], model.head
    monkeypatch.setattr(model, "head", lambda h: shapes.append(tuple(h.shape)) or head(h))
    out = generate.generate(model, prompt, max_new_tokens=4)
    assert shapes and all(s == (2, model.config.hidden_size) for s in shapes), shapes
    assert torch.equal(out, expect)
