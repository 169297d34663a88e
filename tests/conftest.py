"""Shared fixtures: tiny Hugging Face MoE checkpoints written to disk, and the HF models that read them back.

Each variant is built from a transformers config (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE), its weights are
re-randomised so that routing is decisive (HF initialises with std 0.02 and, for some routers, zeros),
and it is saved with `save_pretrained`, which in transformers 5.x writes the hub's per-expert tensor names
(`mlp.experts.E.gate_proj.weight`, Mixtral `block_sparse_moe.experts.E.w1.weight`), so the files look
like real checkpoints. The reference is the same directory reloaded by transformers with eager attention
and eager (per-expert loop) experts, in fp32.

Every dimension is a multiple of 16: grouped_mm on CPU wants 16-byte-aligned strides.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

import moe
from tiny import SENTENCES, tiny_checkpoint

VOCAB = 128
# eos/pad inside the tiny vocab (OLMoE's default eos 50279 is not); 0 is left free for tests to use as pad.
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, num_experts_per_tok=2)

# name -> (config class, config kwargs, save_pretrained kwargs, dtype of the file)
VARIANTS = {
    # GQA (4 heads, 2 kv heads), no renormalisation (OLMoE-1B-7B), clip_qkv small enough to bite.
    "olmoe": (OlmoeConfig, dict(COMMON, num_hidden_layers=2, num_key_value_heads=2, intermediate_size=32,
                                num_experts=8, norm_topk_prob=False, clip_qkv=0.8), {}, torch.float32),
    # MHA, renormalised top-k, no clip; saved in several shards with an index json.
    "olmoe_norm_sharded": (OlmoeConfig, dict(COMMON, num_hidden_layers=2, num_key_value_heads=4,
                                             intermediate_size=32, num_experts=8, norm_topk_prob=True),
                           dict(max_shard_size="100KB"), torch.float32),
    # GQA, always-renormalised top-k with fp32 weights.
    "mixtral": (MixtralConfig, dict(COMMON, num_hidden_layers=2, num_key_value_heads=2, intermediate_size=32,
                                    num_local_experts=8), {}, torch.float32),
    # The same architecture stored in bf16: dtype must be read from the file.
    "mixtral_bf16": (MixtralConfig, dict(COMMON, num_hidden_layers=2, num_key_value_heads=2, intermediate_size=32,
                                         num_local_experts=8), {}, torch.bfloat16),
    # q/k/v biases, sigmoid-gated shared expert, a dense MLP layer (layer 1) between two MoE layers.
    "qwen2_moe": (Qwen2MoeConfig, dict(COMMON, num_hidden_layers=3, num_key_value_heads=2, intermediate_size=48,
                                       moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                       num_experts=8, norm_topk_prob=False, mlp_only_layers=[1]), {}, torch.float32),
    # decoder_sparse_step=2: only layer 1 of 0..2 is MoE.
    "qwen2_moe_step2": (Qwen2MoeConfig, dict(COMMON, num_hidden_layers=3, num_key_value_heads=2,
                                             intermediate_size=48, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=32, num_experts=8,
                                             norm_topk_prob=True, decoder_sparse_step=2), {}, torch.float32),
    # explicit head_dim (32) != hidden/heads (16), per-head q/k norm, renormalised top-k, tied embeddings.
    "qwen3_moe": (Qwen3MoeConfig, dict(COMMON, num_hidden_layers=2, num_key_value_heads=2, head_dim=32,
                                       intermediate_size=48, moe_intermediate_size=32, num_experts=8,
                                       norm_topk_prob=True, tie_word_embeddings=True), {}, torch.float32),
}
FP32_VARIANTS = [n for n, v in VARIANTS.items() if v[3] == torch.float32]


@dataclass
class Checkpoint:
    name: str
    path: Path  # directory with config.json + safetensors
    hf: torch.nn.Module  # transformers model reloaded from `path`, eager, fp32, eval
    file_dtype: torch.dtype


def randomise_(model, seed):
    """Overwrite every parameter: norms ~ U(0.8, 1.2), routers std 0.3, everything else std 0.15."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            if name.endswith("norm.weight"):
                p.copy_(0.8 + 0.4 * torch.rand(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):  # the router (HF renames Mixtral's block_sparse_moe -> mlp)
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def load_hf(path, dtype=torch.float32, **config_overrides):
    """The reference: transformers' own loader, eager attention, eager per-expert loop."""
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", experts_implementation="eager", dtype=dtype, **config_overrides
    )
    return model.eval()


def build_checkpoint(name, root):
    cls, cfg_kwargs, save_kwargs, file_dtype = VARIANTS[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(**cfg_kwargs))
    randomise_(model, seed=sum(map(ord, name)))
    path = Path(root) / name
    model.to(file_dtype).save_pretrained(path, **save_kwargs)
    return Checkpoint(name, path, load_hf(path), file_dtype)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """`checkpoints(name) -> Checkpoint`, built once per session on first use."""
    root = tmp_path_factory.mktemp("ckpt")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_checkpoint(name, root)
        return cache[name]

    return get


@pytest.fixture
def ckpt_copy(checkpoints, tmp_path):
    """`ckpt_copy(name) -> Path`: a private copy of a checkpoint directory, free to corrupt."""

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(checkpoints(name).path, dst)
        return dst

    return copy


def make_ids(batch, seq, seed=0, low=3):
    """Random token ids in [low, VOCAB) (0..2 are kept free for pad/bos/eos)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (batch, seq), generator=g)


# ----------------------------------------------------------------------------- tolerances
# A tolerance here is a count of roundings, never a number one CPU happened to print. One rounding to nearest
# changes a value by at most the dtype's unit roundoff u (half the spacing of the numbers in [1, 2)): fp32
# 2^-24 ~ 6e-8, bf16 2^-8 ~ 4e-3, relative. Two computations of the same formula that round differently
# (another summation order, a fused kernel, a CPU whose matmul or sum blocks the reduction otherwise) differ
# by a few u per rounding step, and an fp32 sum of n terms by up to ~n u of the terms' size (worst case; ~sqrt(n)
# u typically). So each tolerance is `steps` u times the size of the values compared (max |reference|), with
# the count of steps stated where it is used. Bit-equality is claimed only where both sides run the same
# elementwise ops in the same order, or no arithmetic at all.

# fp32 logits (or losses) of the tiny models computed two ways (ours vs transformers, fast twins vs plain code,
# cached vs full, sharded vs one process): up to 3 layers and the head, each a few reductions of length <= 64
# (attention over <= 32 head dims and <= 20 positions, the expert and MLP products over D = 64 or I <= 48, the
# norm's mean over D) that the two sides may sum in different orders: 64 u per layer for 4 layers.
FORWARD = 256  # x u(fp32) = 1.5e-5 of the largest logit; one expert off by 1e-3 moves the logits by ~17x that
# (test_parity.py::test_logit_tolerance_sees_a_small_expert_error), the roundings seen use ~16 u of it


def unit_roundoff(dtype):
    """u: the largest relative error of one rounding to nearest in `dtype` (fp32 2^-24, bf16 2^-8)."""
    return torch.finfo(dtype).eps / 2


def tol(dtype, magnitude, steps):
    """The absolute error `steps` roundings in `dtype` can leave in values of size `magnitude`."""
    return steps * unit_roundoff(dtype) * float(torch.as_tensor(magnitude).detach())  # a number or a tensor


def assert_within(ours, ref, steps, dtype=torch.float32, magnitude=None, msg=""):
    """max |ours - ref| <= tol(dtype, magnitude, steps), the magnitude being max |ref| unless given (give it when
    ref has entries far smaller than the quantities that produced them, e.g. a difference of two logits)."""
    ours, ref = torch.as_tensor(ours), torch.as_tensor(ref)
    assert ours.shape == ref.shape, (msg, ours.shape, ref.shape)
    mag = ref.detach().abs().max().item() if magnitude is None else float(torch.as_tensor(magnitude).detach())
    err = (ours.detach().double() - ref.detach().double()).abs().max().item()
    bound = tol(dtype, mag, steps)
    assert err <= bound, (f"{msg} max |diff| {err:.3g} > {steps} u({dtype}) x {mag:.3g} = {bound:.3g} "
                          f"({err / (unit_roundoff(dtype) * max(mag, 1e-30)):.0f} u of the magnitude)")


def assert_logits_close(ours, ref, steps=FORWARD, dtype=torch.float32):
    """fp32 logits computed two ways: within `steps` roundings of the largest reference logit (see FORWARD)."""
    assert_within(ours.float(), ref.float(), steps, dtype, msg="logits:")


def assert_decisive(values, k, steps, dtype=torch.float32):
    """Premise of an exact comparison of a top-k choice (expert sets, greedy tokens) made from values computed
    two ways: in every row the k-th largest value beats the (k+1)-th by more than twice the error allowed for
    the values (tol of `steps` u of their largest size), so rounding on any CPU cannot reorder them. The
    fixtures' smallest gaps are ~8x that (with FORWARD steps); if this fails, the data has a near-tie, not the
    code a bug."""
    top = torch.topk(values.float(), k + 1, dim=-1).values
    gap = (top[..., k - 1] - top[..., k]).min().item()
    need = 2 * tol(dtype, values.abs().max().item(), steps)
    assert gap > need, f"near-tie: the top-{k} choice is decided by a gap {gap:.3g} <= 2 x tolerance {need:.3g}"


def hf_topk(router_logits, top_k):
    """HF's router selection from its logits: softmax in fp32 over all experts, then top-k."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    return torch.topk(probs, top_k, dim=-1)


def read_json(path):
    return json.loads(Path(path).read_text())


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2))


class NoGradWatch:
    """Watches a phase that needs no gradient: every module forward that runs inside `with NoGradWatch(model)`
    records whether autograd was on and whether its output carries a graph (grad_fn). `check()` fails naming the
    first module that ran with gradients enabled. Use it with the model's parameters requiring gradients (as
    train.py's base does before it is frozen): that is when a forward under autograd would build a graph."""

    def __init__(self, model):
        self.model, self.handles, self.seen = model, [], []

    def __enter__(self):
        def hook(module, args, out):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            graph = any(torch.is_tensor(o) and o.grad_fn is not None for o in outs)
            self.seen.append((self.names[module], torch.is_grad_enabled(), graph))
        self.names = {m: n or "model" for n, m in self.model.named_modules()}
        self.handles = [m.register_forward_hook(hook) for m in self.model.modules()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def check(self):
        assert self.seen, "no module forward ran inside the watched phase"
        bad = [(n, g, gf) for n, g, gf in self.seen if g or gf]
        assert not bad, f"{len(bad)} of {len(self.seen)} module forwards ran with autograd on or built a graph, " \
                        f"first: {bad[0][0]} (grad enabled {bad[0][1]}, output grad_fn {bad[0][2]})"


def assert_no_graph(*values):
    """No tensor in `values` (nested lists, tuples, dicts) carries an autograd graph."""
    stack = list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif torch.is_tensor(v):
            assert v.grad_fn is None and not v.requires_grad, f"a returned tensor {tuple(v.shape)} keeps a graph"


# ----------------------------------------------------------------------------- shared by several test files

CONFIGS = os.path.join(os.path.dirname(__file__), "data", "configs")  # the real OLMoE / Mixtral / Qwen configs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint of this repository's own model, with a sentencepiece tokenizer (one per test module)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    """A small training .jsonl with text, prompt and multiple-choice records."""
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    recs = [{"text": s} for s in SENTENCES] + [
        {"prompt": "Question: 2 + 2 =", "completion": " 4"},
        {"query": "Question: What colour is grass?\nAnswer:", "choices": ["red", "green"], "gold": 1}]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs * 2))
    return str(p)


def check_rmsnorm_backward(dtype, device):
    """moe.RMSNorm's gradients equal transformers' OlmoeRMSNorm's on `device` in `dtype` (test_parity, test_gpu)."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    g = torch.Generator().manual_seed(14)
    x = (3 * torch.randn(4, 7, 64, generator=g)).to(device, dtype)
    w = (0.8 + 0.4 * torch.rand(64, generator=g)).to(device, dtype)
    gy = torch.randn(4, 7, 64, generator=g).to(device, dtype)
    grads = []
    for norm in (moe.RMSNorm(64, 1e-5), OlmoeRMSNorm(64, eps=1e-5)):
        norm = norm.to(device, dtype)
        with torch.no_grad():
            norm.weight.copy_(w)
        xi = x.clone().requires_grad_()
        norm(xi).backward(gy)
        grads.append((xi.grad, norm.weight.grad))
    for ours, ref in zip(*grads):
        assert ours.dtype == dtype
        # x's gradient: a mean over D = 64 products, then a few products; weight's: a sum over 28 rows. fp32:
        # the sums' lengths (64 u); bf16: the same math in fp32 on both sides, then one rounding of the result
        # and of the bf16 product gy * w before it: 4 u(bf16) of the largest gradient
        assert_within(ours.float(), ref.float(), 64 if dtype == torch.float32 else 4, dtype)
