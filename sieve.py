"""MoE-Sieve (arXiv 2603.24044): profile -> plan -> LoRA on the chosen experts. This file is the plan step.

The three steps: router_profile.py counts, per MoE layer, how often each routed expert is in a token's top-k
on a calibration set (`router_profile.calibration` samples it as the authors do, `router_profile.profile`
counts); the plans below choose the experts; methods.attach puts LoRA on attention, the router, shared experts
and the chosen experts (`--method sieve`). `RECIPE` is the paper's training setup (`--recipe moe-sieve`).

A plan is `{layer: [expert ids]}`: keys are the profile's real layer indices (Qwen's dense layers have no
entry), values sorted lists of the experts that carry an adapter. The score of an expert is its routing
count from router_profile.py (how often it is in a token's top-k), as in MoE-Sieve's public code.

    topk_plan      the k most-routed experts in every layer (MoE-Sieve; headline k = 25%)
    random_plan    k experts per layer drawn at random, seeded (MoE-Sieve's ablation)
    coverage_plan  per layer the fewest experts whose counts reach a share p of the layer (ESFT; p=0.6 "cov60")
    budget_plan    k*L experts in all, k_min per layer, the rest greedily to the largest marginal coverage

Ties in the counts are broken by the lower expert id, so every plan is deterministic.
"""
import heapq
import math
import random


# `python train.py --recipe moe-sieve`: the paper's training details (§5.1) and its public code's defaults
RECIPE = dict(
    method="sieve", sieve_frac=0.25,  # paper §5.2: the top 25% routed experts per layer (16 of 64 for OLMoE)
    rank=32, alpha=64, dropout=0.05,  # paper §5.1 "LoRA rank 32, alpha = 64, dropout 0.05"; src/config.py TrainConfig
    lr=4e-4,  # paper §5.1 "learning rate 4e-4"; src/trainer.py lr default 4e-4
    weight_decay=0.0,  # src/trainer.py: TrainingArguments without weight_decay (0.0)
    warmup=0.0, schedule="linear",  # TrainingArguments' defaults: linear decay, no warm-up
    epochs=3,  # paper §5.1 "3 epochs"; src/config.py epochs 3
    batch_size=8, grad_accum=8,  # paper §5.1 "effective batch size 64"; src/config.py per_device_bs 8, grad_acc 8
    seq_len=2048,  # src/config.py max_len 2048
    loss_on="all",  # src/trainer.py: DataCollatorForLanguageModeling(mlm=False), loss on the whole formatted text
    eos="off",  # src/data_registry.py l. 405-406: tokenizer(fn(ex), truncation=True): the formatted text, no EOS
    calib_samples=None, calib_seed=123, calib_tokens=2048,  # scripts/profiling.py: --n_samples None (the whole
    # split), --seed 123 (the records shuffled with it); src/utils_profiling.py make_profile seq_len 2048
)

# ----------------------------------------------------------------------------- helpers


def _layer_counts(profile):
    """{layer: counts list}, refusing layers with no routed tokens (every score would be 0)."""
    out = {}
    for layer, counts in zip(profile["layers"], profile["counts"]):
        if sum(counts) <= 0:
            raise ValueError(f"profile: layer {layer} has no routed tokens; profile more data")
        out[layer] = counts
    return out


def ranked(counts):
    """Expert ids by count, descending; ties by the lower id."""
    return sorted(range(len(counts)), key=lambda e: (-counts[e], e))


def experts_per_layer(k, E):
    """k as a count (int, 1..E) or a fraction of E (float in (0, 1]: floor(k * E), at least 1). The authors'
    code takes k as a count (scripts/run.py: hotk16 for OLMoE's 64 experts, hotk15 for Qwen's 60, both 25%);
    floor never gives more experts than the fraction names."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"k must be an int count or a float fraction of the experts, not {k!r}")
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise ValueError(f"k={k}: a fraction of the experts must be in (0, 1]")
        return max(1, math.floor(k * E * (1 + 1e-12)))  # the slack: 0.3 * 10 is 2.9999999999999996 in floats
    if not 1 <= k <= E:
        raise ValueError(f"k={k}: must be between 1 and the number of experts ({E})")
    return k


# ----------------------------------------------------------------------------- plans


def topk_plan(profile, k):
    """The same k in every layer: the k experts with the highest counts (MoE-Sieve's selection)."""
    k = experts_per_layer(k, profile["num_experts"])
    return {layer: sorted(ranked(c)[:k]) for layer, c in _layer_counts(profile).items()}


def random_plan(profile, k, seed):
    """The same budget as topk_plan(profile, k), experts drawn uniformly per layer (layers in profile order)."""
    E = profile["num_experts"]
    k = experts_per_layer(k, E)
    rng = random.Random(seed)  # one stream over the layers: the plan depends on seed alone
    return {layer: sorted(rng.sample(range(E), k)) for layer in _layer_counts(profile)}


def coverage_plan(profile, p):
    """Per layer the fewest experts (by count, descending) whose counts reach a share p of the layer's total."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p={p}: the coverage target must be in (0, 1]")
    plan = {}
    for layer, counts in _layer_counts(profile).items():
        target, total, chosen = p * sum(counts), 0, []
        for e in ranked(counts):
            chosen.append(e)
            total += counts[e]
            # a tiny relative slack so that p=0.6 of 100 (60.00000000000001 in floats) is reached by 60
            if total >= target * (1 - 1e-12):
                break
        plan[layer] = sorted(chosen)
    return plan


def budget_plan(profile, k, k_min=1):
    """k*L experts in all: each layer starts with its top k_min, then each remaining slot goes to the layer
    whose next expert adds the most coverage (its count / the layer's total). No layer takes more than E."""
    E = profile["num_experts"]
    k = experts_per_layer(k, E)
    if not 0 <= k_min <= k:
        raise ValueError(f"k_min={k_min}: must be between 0 and k ({k})")
    counts = _layer_counts(profile)
    order = {layer: ranked(c) for layer, c in counts.items()}
    taken = {layer: k_min for layer in counts}
    # max-heap via negation: (-next marginal coverage, layer position); ties go to the earlier layer
    heap = [(-counts[l][order[l][k_min]] / sum(counts[l]), i, l) for i, l in enumerate(counts) if k_min < E]
    heapq.heapify(heap)
    for _ in range((k - k_min) * len(counts)):
        _, i, layer = heapq.heappop(heap)  # never empty: k <= E, so the budget fits
        taken[layer] += 1
        if taken[layer] < E:
            nxt = order[layer][taken[layer]]
            heapq.heappush(heap, (-counts[layer][nxt] / sum(counts[layer]), i, layer))
    return {layer: sorted(order[layer][: taken[layer]]) for layer in counts}


# ----------------------------------------------------------------------------- reading a plan


def check_plan(profile, plan):
    """Raise ValueError unless the plan names exactly the profile's layers, with valid distinct expert ids."""
    if sorted(plan) != sorted(profile["layers"]):
        raise ValueError(f"plan layers {sorted(plan)} != profile layers {sorted(profile['layers'])}")
    E = profile["num_experts"]
    for layer, experts in plan.items():
        if len(set(experts)) != len(experts) or any(not 0 <= e < E for e in experts):
            raise ValueError(f"plan layer {layer}: experts {experts} are not distinct ids in 0..{E - 1}")


def plan_coverage(profile, plan):
    """({layer: share of the layer's routed assignments that go to the plan's experts}, mean over layers)."""
    check_plan(profile, plan)
    counts = _layer_counts(profile)
    cov = {layer: sum(counts[layer][e] for e in plan[layer]) / sum(counts[layer]) for layer in counts}
    return cov, sum(cov.values()) / len(cov)


def describe(profile, plan):
    """A short text: experts per layer and coverage, e.g. for the training log."""
    cov, mean = plan_coverage(profile, plan)
    E, sizes = profile["num_experts"], [len(plan[layer]) for layer in profile["layers"]]
    n, total = sum(sizes), E * len(sizes)
    if len(set(sizes)) == 1:
        per = f"{sizes[0]} of {E} in each of {len(sizes)} MoE layers"
    else:
        per = "per layer " + " ".join(f"{layer}:{s}" for layer, s in zip(profile["layers"], sizes))
    lo, hi = min(cov, key=cov.get), max(cov, key=cov.get)
    return (f"{n}/{total} routed experts ({100 * n / total:.1f}%), {per}\n"
            f"coverage of routed assignments: mean {100 * mean:.1f}%, "
            f"min {100 * cov[lo]:.1f}% (layer {lo}), max {100 * cov[hi]:.1f}% (layer {hi})")
