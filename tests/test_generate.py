"""Generation: greedy tokens equal HF `generate`, the KV cache equals a full recompute, sampling is seeded."""

import pytest
import torch
from conftest import FORWARD, assert_decisive, assert_logits_close, make_ids
from transformers import GenerationConfig

import generate
from files import hub

NAMES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe"]
PAD = 0


def hf_greedy(hf, ids, mask, new, eos=None):
    """HF greedy decoding; eos None means never stop (the saved generation_config's eos is overridden)."""
    gc = GenerationConfig(do_sample=False, max_new_tokens=new, pad_token_id=PAD, eos_token_id=eos)
    saved = hf.generation_config.eos_token_id
    hf.generation_config.eos_token_id = eos  # HF fills a None in `gc` from the model's own generation_config
    try:
        with torch.no_grad():
            return hf.generate(ids, attention_mask=mask, generation_config=gc)
    finally:
        hf.generation_config.eos_token_id = saved


def assert_greedy_decisive(hf, seqs, mask, new):
    """Premise of comparing greedy tokens exactly: at every generated position HF's winning logit beats the
    runner-up by far more than the logits' tolerance (FORWARD), so no CPU's rounding can change a choice."""
    full = torch.cat([mask, torch.ones(mask.shape[0], new, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        logits = hf(seqs, attention_mask=full, position_ids=(full.cumsum(-1) - 1).clamp(min=0)).logits
    assert_decisive(logits[:, -new - 1:-1], 1, FORWARD)


def left_padded_batch():
    """Three prompts of lengths 7, 3 and 10, left-padded with PAD to length 10."""
    ids = make_ids(3, 10, seed=7)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :7] = 0
    return ids.masked_fill(mask == 0, PAD), mask


@pytest.mark.parametrize("name", NAMES)
def test_greedy_single_prompt_matches_hf(checkpoints, name):
    """Greedy generation of one prompt gives HF's tokens, prompt included."""
    ck = checkpoints(name)
    ids = make_ids(1, 8, seed=6)
    ref = hf_greedy(ck.hf, ids, torch.ones_like(ids), new=12)
    assert ref.shape == (1, 20)
    assert_greedy_decisive(ck.hf, ref, torch.ones_like(ids), 12)
    out = generate.generate(hub.load_model(ck.path), ids, max_new_tokens=12)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_left_padded_batch_matches_hf(checkpoints, name):
    """Greedy generation of a left-padded batch of different lengths gives HF's tokens row by row."""
    ck = checkpoints(name)
    ids, mask = left_padded_batch()
    ref = hf_greedy(ck.hf, ids, mask, new=10)
    assert ref.shape == (3, 20)
    assert_greedy_decisive(ck.hf, ref, mask, 10)  # also the premise of the EOS test below (mixtral, same prompts)
    out = generate.generate(hub.load_model(ck.path), ids, attention_mask=mask, max_new_tokens=10, pad_token_id=PAD)
    assert torch.equal(out, ref)


def test_eos_then_pad_matches_hf(checkpoints):
    """A row that emits EOS keeps emitting pad, and generation stops as HF's does when every row is done."""
    ck = checkpoints("mixtral")
    model = hub.load_model(ck.path)
    ids, mask = left_padded_batch()
    free = hf_greedy(ck.hf, ids, mask, new=10)
    eos = int(free[0, 12])  # row 0's third new token: row 0 stops early, other rows (likely) later
    ref = hf_greedy(ck.hf, ids, mask, new=10, eos=eos)
    assert (ref[0, 13:] == PAD).all() and ref.shape[1] > 13  # the fixture really exercises "pad after EOS"
    out = generate.generate(model, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(out[:, : ref.shape[1]], ref)
    assert (out[:, ref.shape[1]:] == PAD).all()


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_kv_cache_matches_full_forward(checkpoints, name):
    """Prefill a prompt into the KV cache, feed 4 tokens one by one: each step's logits equal a full forward."""
    model = hub.load_model(checkpoints(name).path)
    ids = make_ids(2, 10, seed=8)
    full = model(ids)
    cache = generate.KVCache(model.config, 2, 10, torch.device("cpu"), torch.float32)
    steps = [model(ids[:, :6], cache=cache)]
    for t in range(6, 10):
        steps.append(model(ids[:, t:t + 1], cache=cache))
    assert_logits_close(torch.cat(steps, dim=1), full)


@torch.no_grad()
def test_kv_cache_left_padded_matches_full_forward(checkpoints):
    """With left padding and mask-derived positions, cached decoding equals a full forward on real tokens."""
    model = hub.load_model(checkpoints("olmoe").path)
    ids, mask = left_padded_batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    full = model(ids, attention_mask=mask, position_ids=pos)
    cache = generate.KVCache(model.config, 3, 10, torch.device("cpu"), torch.float32)
    steps = [model(ids[:, :8], attention_mask=mask[:, :8], position_ids=pos[:, :8], cache=cache)]
    for t in range(8, 10):
        steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1], cache=cache))
    real = mask.bool()
    assert_logits_close(torch.cat(steps, dim=1)[real], full[real])


def sample(model, ids, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    return generate.generate(model, ids, max_new_tokens=16, temperature=1.0, generator=g, **kw)


def test_sampling_reproducible_with_generator(checkpoints):
    """Sampling with the same seeded torch.Generator gives the same tokens; another seed gives others."""
    model = hub.load_model(checkpoints("olmoe").path)
    ids = make_ids(2, 6, seed=9)
    a, b, c = sample(model, ids, 0), sample(model, ids, 0), sample(model, ids, 1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # 32 draws from a ~flat distribution over 128 tokens: a tie is ~impossible


def test_tiny_top_p_equals_greedy(checkpoints):
    """top_p -> 0 keeps only the most likely token, so sampling equals greedy."""
    model = hub.load_model(checkpoints("qwen2_moe").path)
    ids = make_ids(2, 6, seed=10)
    greedy = generate.generate(model, ids, max_new_tokens=16)
    assert torch.equal(sample(model, ids, 0, top_p=1e-6), greedy)


def test_top_p_keeps_the_smallest_set_reaching_it():
    """Nucleus sampling keeps the fewest most likely tokens whose mass reaches top_p: four equally likely tokens
    (0.25 each, exact in fp32) at top_p 0.5 leave two, not three (the mass before the third is exactly 0.5)."""
    g = torch.Generator().manual_seed(0)
    drawn = {int(generate.sample(torch.zeros(1, 4), 1.0, 0.5, g)) for _ in range(200)}
    assert len(drawn) == 2
    assert len({int(generate.sample(torch.zeros(1, 4), 1.0, 0.0, g)) for _ in range(50)}) == 1  # top_p 0: still one token


def test_generation_runs_without_autograd_when_the_base_requires_grad(checkpoints):
    """generate switches autograd off itself: with every parameter requiring gradients (as train.py's base before
    it is frozen), each module forward inside runs with gradients disabled, the tokens keep no graph, and the
    caller's mode is given back."""
    from conftest import NoGradWatch, assert_no_graph
    model = hub.load_model(checkpoints("olmoe").path)
    model.requires_grad_(True)
    ids, mask = left_padded_batch()
    with NoGradWatch(model) as watch:
        out = generate.generate(model, ids, mask, max_new_tokens=3, temperature=0.7,
                                generator=torch.Generator().manual_seed(0))
    watch.check()
    assert_no_graph(out)
    assert torch.is_grad_enabled()
