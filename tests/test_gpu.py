"""CUDA-only checks (skipped without a GPU): the same tiny checkpoints on the GPU.

Tolerances: fp32 on CUDA vs HF fp32 on CPU within 1e-4 of the logit scale (different kernels, TF32 kept off);
bf16 fast vs loop within 2e-2 of the logit scale, as on the CPU.
"""

import pytest
import torch
from conftest import assert_logits_close, make_ids

import moe

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
    """On CUDA in bf16 the grouped_mm path equals the per-expert loop within 2e-2 of the logit scale."""
    model = moe.load_model(checkpoints(name).path, dtype=torch.bfloat16, device="cuda")
    ids = make_ids(4, 64, seed=20).cuda()
    model.set_expert_path("loop")
    loop, r_loop = model(ids, return_routing=True)
    model.set_expert_path("fast")
    fast, r_fast = model(ids, return_routing=True)
    assert fast.dtype == torch.bfloat16 and fast.device.type == "cuda"
    assert torch.equal(r_loop[0].topk_idx, r_fast[0].topk_idx)
    assert_logits_close(fast, loop, rel=2e-2)


@pytest.mark.parametrize("path", ["loop", "fast"])
@pytest.mark.parametrize("name", ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe"])
@torch.no_grad()
def test_cuda_fp32_matches_hf(checkpoints, name, path):
    """fp32 logits on CUDA equal HF's eager CPU logits within 1e-4 of the logit scale, both expert paths."""
    ck = checkpoints(name)
    model = moe.load_model(ck.path, device="cuda")
    model.set_expert_path(path)
    ids = make_ids(2, 12)
    assert_logits_close(model(ids.cuda()).cpu(), ck.hf(ids).logits, rel=1e-4)


@torch.no_grad()
def test_cuda_greedy_generate_matches_cpu(checkpoints):
    """Greedy generation on CUDA (fp32) gives the same tokens as on the CPU."""
    path = checkpoints("olmoe").path
    ids = make_ids(2, 8, seed=21)
    cpu = moe.generate(moe.load_model(path), ids, max_new_tokens=12)
    gpu = moe.generate(moe.load_model(path, device="cuda"), ids.cuda(), max_new_tokens=12)
    assert torch.equal(gpu.cpu(), cpu)
