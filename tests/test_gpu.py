"""CUDA-only checks (skipped without a GPU): the same tiny checkpoints on the GPU.

Tolerances follow from the unit roundoff of each dtype, u = 2^-24 in fp32 and 2^-8 in bf16 (half the spacing
between neighbours, 2^-7 of a value at the bottom of its binade; conftest.tol): fp32 on CUDA vs HF fp32 on the
CPU within 8 x FORWARD = 2048 u(fp32) of the largest logit (CUDA's kernels sum the same products in other orders
with TF32 kept off, as a CPU's do, FORWARD; and its exp, rsqrt, sin and cos differ from the CPU's by a few u at
every use); bf16 fast vs loop within 6 u(bf16) of the largest logit (the two paths round the expert products at
different points: about five bf16 roundings), as on the CPU. Every random input is seeded.
"""

import pytest
import torch
from conftest import FORWARD, assert_logits_close, assert_within, make_ids
from conftest import check_rmsnorm_backward

import generate
from files import hub
import lora
import moe
import methods
import moe_fast



pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("name", ["mixtral_bf16", "olmoe", "qwen2_moe"])
@torch.no_grad()
def test_cuda_bf16_fast_matches_loop(checkpoints, name):
    """On CUDA in bf16 the grouped_mm path equals the per-expert loop within 6 u(bf16) of the logit scale."""
    model = hub.load_model(checkpoints(name).path, dtype=torch.bfloat16, device="cuda")
    ids = make_ids(4, 64, seed=20).cuda()
    model.set_expert_path("loop")
    loop, r_loop = model(ids, return_routing=True)
    model.set_expert_path("fast")
    fast, r_fast = model(ids, return_routing=True)
    assert fast.dtype == torch.bfloat16 and fast.device.type == "cuda"
    assert torch.equal(r_loop[0].topk_idx, r_fast[0].topk_idx)
    assert_logits_close(fast.float(), loop.float(), steps=6, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_rmsnorm_fused_kernels_equal_hf(dtype):
    """RMSNorm on CUDA runs torch's fused norm kernels: forward equal to HF's up to the order in which the
    kernel sums the squares, backward equal to autograd through HF's.

    fp32: each side sums 2048 squares in some blocked order, within log2(2048) = 11 u of the exact sum, so the
    two 1/rms factors differ by at most ~11 u, plus one rounding of x / rms and one of the weight product each:
    under 16 u; rtol 2^-19 = 32 u. bf16: both compute x / rms in fp32 and round it to bf16 once; values a few u
    apart can round to neighbouring bf16 numbers (one step: at most 2^-7 relative), and the multiply by the bf16
    weight rounds once more on each side: at most two steps, rtol 2^-6."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    g = torch.Generator().manual_seed(16)
    x = (3 * torch.randn(16, 2048, generator=g)).to("cuda", dtype)
    ours, ref = moe.RMSNorm(2048, 1e-5).to("cuda", dtype), OlmoeRMSNorm(2048, eps=1e-5).to("cuda", dtype)
    with torch.no_grad():
        ours.weight.copy_((0.8 + 0.4 * torch.rand(2048, generator=g)).to("cuda", dtype))
        ref.weight.copy_(ours.weight)
        rtol = 2**-19 if dtype == torch.float32 else 2**-6
        torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=rtol)  # relative bounds hold down to tiny |x|
    check_rmsnorm_backward(dtype, "cuda")


@pytest.mark.parametrize("path", ["loop", "fast"])
@pytest.mark.parametrize("name", ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe"])
@torch.no_grad()
def test_cuda_fp32_matches_hf(checkpoints, name, path):
    """fp32 logits on CUDA equal HF's eager CPU logits within 8 x FORWARD u of the logit scale, both expert paths."""
    ck = checkpoints(name)
    model = hub.load_model(ck.path, device="cuda")
    model.set_expert_path(path)
    ids = make_ids(2, 12)
    assert_logits_close(model(ids.cuda()).cpu(), ck.hf(ids).logits, steps=8 * FORWARD)


@torch.no_grad()
def test_cuda_greedy_generate_matches_cpu(checkpoints):
    """Greedy generation on CUDA (fp32) gives the same tokens as on the CPU."""
    path = checkpoints("olmoe").path
    ids = make_ids(2, 8, seed=21)
    cpu = generate.generate(hub.load_model(path), ids, max_new_tokens=12)
    gpu = generate.generate(hub.load_model(path, device="cuda"), ids.cuda(), max_new_tokens=12)
    assert torch.equal(gpu.cpu(), cpu)


# ----------------------------------------------------------------------------- expert LoRA on the GPU (bench.py)

def _medium_experts(device, plan_ids, r=16, seed=0, D=256, I=128, E=16):
    """One bf16 layer of stacked experts with expert LoRA on `plan_ids`, random non-zero adapters."""
    g = torch.Generator().manual_seed(seed)
    experts = moe.Experts(E, D, I)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) * D ** -0.5)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) * I ** -0.5)
    experts = experts.to(device, torch.bfloat16).requires_grad_(False)
    experts.adapter = lora.ExpertLoRA(experts, plan_ids, r=r, alpha=2 * r)
    with torch.no_grad():
        for p in experts.adapter.parameters():  # B = 0 would make the adapter's share trivially equal
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return experts


def _routing(device, N, E, K, seed=1):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(N, E, generator=g), -1)
    w, idx = torch.topk(probs, K, dim=-1)
    return idx.to(device), w.to(device, torch.bfloat16)


def _fast_matches_loop(device, plan_ids):
    experts = _medium_experts(device, plan_ids)
    N, K = 512, 4
    idx, w = _routing(device, N, experts.E, K)
    x0 = torch.randn(N, experts.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
    probe = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)).to(device, torch.bfloat16)
    out = {}
    for path in ("fast", "loop"):
        moe.set_plain(experts, path == "loop")
        experts.adapter.zero_grad()
        x = x0.clone().requires_grad_(True)
        y = experts(x, idx, w)
        (y.float() * probe.float()).sum().backward()
        out[path] = y.detach().float(), x.grad.float(), {n: p.grad.clone() for n, p in experts.adapter.named_parameters()}
    # bf16: the paths round the products at different points, a few roundings of the largest value (5 u), and an
    # adapter gradient sums the rounded rows of a whole expert (13 u); sizes below 1e-3 count as 1e-3
    close = lambda a, b, steps, msg: assert_within(a, b, steps, torch.bfloat16, max(1e-3, b.abs().max().item()), msg)
    close(out["fast"][0], out["loop"][0], 5, "output")
    close(out["fast"][1], out["loop"][1], 5, "input gradient")
    for n in out["fast"][2]:
        close(out["fast"][2][n], out["loop"][2][n], 13, n)


@torch.no_grad()
def _lora_rows(device, plan_ids, monkeypatch):
    """Rows multiplied by the expert-LoRA grouped products in one forward (offs[-1] of each call with a
    rank-wide weight), and the (token, slot) pairs routed to the planned experts."""
    experts = _medium_experts(device, plan_ids)
    idx, w = _routing(device, 512, experts.E, 4)
    x = torch.randn(512, experts.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(4))
    x = x.to(device, torch.bfloat16)
    rows, real = [], moe_fast.grouped_mm

    def spy(a, b, offs):
        if min(b.shape[1:]) <= 32:  # a LoRA factor: rank 16, or 2 x 16 (gate and up together); base: 128/256
            assert a.shape[0] == int(offs[-1])  # the input holds exactly the rows multiplied
            rows.append(a.shape[0])
        return real(a, b, offs=offs)

    monkeypatch.setattr(moe_fast, "grouped_mm", spy)
    experts(x, idx, w)
    return sum(rows), int(torch.isin(idx, torch.tensor(plan_ids, device=device)).sum())


@pytest.mark.parametrize("plan_ids", [[0, 3, 4, 9, 15], list(range(16))])
def test_cuda_bf16_fast_path_with_expert_lora_matches_loop(plan_ids):
    """bf16 on CUDA, one layer (D 256, I 128, 16 experts, top-4, 512 tokens), LoRA r=16 on 5 of 16 experts
    (sieve) or on all 16 (lora): the grouped fast path (whose backward gathers the LoRA inputs again and
    takes A's gradient from a K-grouped product) equals the per-expert loop on the same routing. Tolerance
    (bf16 rounding of the intermediate products): output and input gradient within 5 u(bf16) (2e-2) of their
    largest magnitude, adapter gradients within 13 u(bf16) (5e-2: they sum over all rows of an expert)."""
    _fast_matches_loop("cuda", plan_ids)


def test_cuda_sieve_does_less_expert_lora_work_than_lora(monkeypatch):
    """On CUDA, the expert-LoRA grouped products of sieve (4 of 16 experts) multiply exactly the rows routed
    to those experts (4 products per layer), far fewer than lora's every row."""
    sieve_rows, routed = _lora_rows("cuda", [2, 5, 11, 12], monkeypatch)
    lora_rows, all_pairs = _lora_rows("cuda", list(range(16)), monkeypatch)
    assert all_pairs == 512 * 4 and lora_rows == 4 * all_pairs
    assert sieve_rows == 4 * routed and sieve_rows < 0.5 * lora_rows


@pytest.mark.parametrize("method,extra", [("sieve", []), ("dmep", []), ("lora", ["--compile"])])
def test_cuda_train_end_to_end(ckpt, train_file, tmp_path, method, extra):
    """train.py on CUDA (bf16 base by default): the sieve (a nonzero per layer), DMEP across its pruning, and
    compiled blocks train, log a finite loss per step, and write an adapter that reloads with the same logits."""
    import json

    import train
    out = tmp_path / method
    assert train.main(["--model", ckpt, "--data", train_file, "--method", method, "--rank", "8", "--steps", "6",
                       "--batch-size", "4", "--seq-len", "64", "--device", "cuda", "--out", str(out), *extra]) == 0
    summary = json.loads((out / "summary.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert summary["device"].startswith("cuda") and summary["dtype"] == "torch.bfloat16"
    assert len(log) == 6 and all(e["loss"] == e["loss"] and e["tok_s"] > 0 for e in log)  # no NaN
    model = hub.load_model(ckpt, dtype=torch.bfloat16, device="cuda")
    methods.load_adapter(model, str(out))
    assert torch.isfinite(model(make_ids(2, 16).cuda()).float()).all()
