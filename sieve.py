"""Expert selection from a routing profile: which routed experts get LoRA (MoE-Sieve, DESIGN.md §5).

A plan is `{layer: [expert ids]}`: keys are the profile's real layer indices (Qwen's dense layers have no
entry), values sorted lists of the experts that carry an adapter. The score of an expert is its routing
count from router_profile.py (how often it is in a token's top-k), as in MoE-Sieve's public code.

    topk_plan      the k most-routed experts in every layer (MoE-Sieve; headline k = 25%)
    random_plan    k experts per layer drawn at random, seeded (MoE-Sieve's ablation)
    coverage_plan  per layer the fewest experts whose counts reach a share p of the layer (ESFT; p=0.6 "cov60")
    budget_plan    k*L experts in all, k_min per layer, the rest greedily to the largest marginal coverage
DMEP's module-wise pruning of LoRA-MoE experts by utilization lives here too (dmep_track, dmep_prune).

Ties in the counts are broken by the lower expert id, so every plan is deterministic.
"""
import heapq
import math
import random

import torch

import lora

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
    """k as a count (int, 1..E) or a fraction of E (float in (0, 1], rounded half up, at least 1)."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"k must be an int count or a float fraction of the experts, not {k!r}")
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise ValueError(f"k={k}: a fraction of the experts must be in (0, 1]")
        return max(1, math.floor(k * E + 0.5))  # half up: Python's round() would send 2.5 to 2
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


# ----------------------------------------------------------------------------- DMEP pruning (DESIGN.md §4)

@torch.no_grad()
def dmep_track(model, attention_mask=None, beta=0.9):
    """After a forward: each LoRA-MoE module's utilization EMA u_j <- beta u_j + (1 - beta) share_j, where
    share_j is the fraction of the module's top-K assignments (real tokens only) that went to expert j."""
    real = None if attention_mask is None else attention_mask.reshape(-1, 1).float()  # (T, 1)
    for m in model.modules():
        if isinstance(m, lora.LoRAMoELinear) and m.router_logits is not None:
            idx = torch.topk(m.router_logits, m.top_k, dim=-1).indices  # (T, K); softmax keeps the order
            wt = torch.ones(idx.shape, device=idx.device) if real is None else real.expand(idx.shape)
            counts = torch.zeros(m.A.shape[0], device=idx.device).scatter_add_(0, idx.reshape(-1), wt.reshape(-1))
            share = counts / counts.sum().clamp(min=1)  # no boolean indexing, no bincount: no host sync
            m.util.copy_(torch.where(torch.isnan(m.util), share, beta * m.util + (1 - beta) * share))


def dmep_keep(util, tau, k):
    """The experts a module keeps: utilization at least tau / n, and at least its top-k (the most used)."""
    n = len(util)
    keep = [j for j in range(n) if util[j] >= tau / n]
    return keep if len(keep) >= k else sorted(sorted(range(n), key=lambda j: (-util[j], j))[:k])


def dmep_prune(model, optimizer=None, tau=0.5):
    """Prune every LoRA-MoE module physically (smaller tensors, router rows removed) and slice the
    optimizer's state to match: nothing dead is carried on. Returns {module: {before, after, util}}."""
    report = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, lora.LoRAMoELinear):
            continue
        util = m.util.nan_to_num(0.0).tolist()
        keep = dmep_keep(util, tau, m.top_k)
        report[name] = dict(before=len(util), after=len(keep), util=[round(u, 4) for u in util])
        if len(keep) < len(util):
            swap = m.prune(keep)
            if optimizer is not None:
                _swap_in_optimizer(optimizer, swap, keep)
    return report


def _swap_in_optimizer(opt, swap, keep):
    for group in opt.param_groups:
        group["params"] = [swap.get(p, p) for p in group["params"]]
    for old, new in swap.items():
        state = opt.state.pop(old, None)
        if state:  # AdamW: exp_avg, exp_avg_sq shaped like the parameter (experts first); step a scalar
            idx = torch.tensor(keep, device=new.device)
            opt.state[new] = {k: v[idx].clone() if torch.is_tensor(v) and v.dim() > 0 else v for k, v in state.items()}


def plot_dmep(report, path):
    """Heatmap of utilization (modules x LoRA experts) before pruning, when matplotlib is installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("sieve: matplotlib not installed, no DMEP heatmap")
        return False
    names, rows = list(report), [r["util"] for r in report.values()]
    fig = Figure(figsize=(2 + 0.4 * len(rows[0]), 1 + 0.22 * len(rows)))
    ax = fig.add_subplot()
    im = ax.imshow(rows, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(names)), [n.removeprefix("model.layers.") for n in names], fontsize=6)
    ax.set_xlabel("LoRA expert")
    ax.set_title("DMEP utilization at pruning")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    lora.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return True
