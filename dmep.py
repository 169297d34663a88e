"""DMEP (Dynamic Module-wise Expert Pruning for LoRA-MoE, arXiv 2604.26340), all of it in one place.

    LoRAMoELinear   the LoRA-MoE module on a frozen linear: N LoRA experts and a router, top-K, renormalised
    sites, attach   which linears of a block get one (attention q/k/v/o, and "dense": shared experts, dense MLPs)
    track           utilization tracking: each module's top-K assignments counted over the first stage
    keep            the keep rule: utilization >= tau / N, and at least the K most used
    prune           physical pruning of every module (smaller tensors, router rows removed) with the optimizer's
                    state sliced to match; returns the report (counts before / after, utilization, kept ids)
    prune_step      the whole pruning step of a run: the counts summed over processes, prune, the report
                    printed and written (dmep.json, dmep_utilization.png)
    balance_loss    the load-balancing loss of the first stage (each module balanced on its own)
    RECIPE          the phase schedule and defaults (`--recipe dmep`)

The phases (train.py runs them): stage 1, the first `dmep_warmup` of the steps, trains every LoRA expert with
the balancing loss while `track` counts assignments; then `prune_step`; stage 2 trains the survivors without it.

The paper has no public code. Its utilization is "routing statistics gathered online during the first stage":
`track` counts every top-K assignment of every real token over the whole stage (util = counts, the shares are
counts / their sum). `beta` gives an exponential moving average of each micro-batch's shares instead, an
option that weights the last ~1/(1-beta) micro-batches.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
import moe
import perft
from files import atomic, plots

# `python train.py --recipe dmep`. The paper has no public code and the numbers below that it does not state are
# this project's defaults, marked so; notes/fidelity.md lists which is which.
RECIPE = dict(
    method="dmep",
    dmep_util="stage",  # paper (method): pruning from routing statistics gathered online during the first stage
    dmep_aux_coef=0.01,  # paper (method): load balancing in the first stage only; 0.01 (transformers' default) ours
    dmep_experts=8, dmep_topk=2,  # ours: a uniform LoRA-MoE of 8 experts top-2 (the paper's N, K: not in its summary)
    dmep_warmup=0.2,  # ours: the first stage is 20% of the steps (the paper prunes "once routing stabilises")
    dmep_tau=0.5,  # ours: keep experts with utilization >= tau / N (half the uniform share)
    rank=8, alpha=16, dropout=0.05, lr=2e-4,  # ours: LoRA-MoE hyper-parameters the paper's summary does not give
    schedule="cosine", warmup=0.03, loss_on="answer",  # ours: train.py's defaults
)


class LoRAMoELinear(nn.Module):
    """DMEP's LoRA-MoE on a frozen linear: y = W x + scale * sum_{j in topK(R x)} g_j B_j A_j x, g the
    renormalised softmax weights of its router R (in -> n). `util` holds the module's top-K assignment counts
    over the tracked stage (NaN: nothing tracked yet); `prune` removes experts physically."""

    def __init__(self, base, n, top_k, r, scale, dropout=0.0):
        super().__init__()
        dev = base.weight.device
        self.base = base
        self.A, self.B = perft.init_factors(n, r, base.in_features, base.out_features, "kaiming", dev)  # B = 0
        self.router = lora.kaiming_A((n, base.in_features), dev)  # (n, in), drawn as nn.Linear's weight
        self.top_k, self.scale = top_k, scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("util", torch.full((n,), float("nan"), device=dev))
        self.router_logits = None

    def forward(self, x):
        xf = x.reshape(-1, x.shape[-1])  # (T, in)
        logits = F.linear(xf, self.router.to(x.dtype))  # (T, n)
        perft.keep_router_logits(self, logits)
        gate = perft.dense_gate(logits, self.top_k, renorm=True)  # (T, n)
        out = perft.gated(self.dropout(xf), self.A, self.B, nn.Identity(), gate, self.scale)
        return self.base(x) + out.view(*x.shape[:-1], -1)

    @torch.no_grad()
    def prune(self, keep):
        """Keep experts `keep` (sorted ids): new, smaller parameters. Returns {old parameter: new parameter}."""
        idx = torch.tensor(keep, device=self.A.device)
        swap = {}
        for name in ("A", "B", "router"):
            old = getattr(self, name)
            new = nn.Parameter(old[idx].clone(), requires_grad=old.requires_grad)
            setattr(self, name, new)
            swap[old] = new
        self.util = self.util[idx]
        return swap


def sites(block, cfg, targets):
    """The (parent module, attribute) of each linear of `block` that gets a LoRA-MoE: attention projections
    named in `targets`, and with "dense" the shared expert's (Qwen2-MoE) or a dense layer's MLP projections."""
    names, mlp = targets.split(","), block.mlp
    out = [(block.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj") if n in names]
    if "dense" in names:
        moe_layer = isinstance(mlp, moe.MoE)
        dense = (mlp.shared_expert if cfg.shared_expert_intermediate_size else None) if moe_layer else mlp
        out += [(dense, n) for n in ("gate_proj", "up_proj", "down_proj") if dense is not None]
    return out


def attach(block, cfg, options, r, scale, dropout):
    """A LoRA-MoE module on each of the block's linears that sites() names (methods.attach calls it per block)."""
    for parent, name in sites(block, cfg, options["dmep_targets"]):
        base = getattr(parent, name)
        setattr(parent, name, LoRAMoELinear(base, options["dmep_experts"], options["dmep_topk"], r, scale, dropout))


def modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAMoELinear)]


def expert_counts(model):
    """{module name: LoRA experts it has now}: what a saved adapter records, so that loading rebuilds the shapes."""
    return {n: m.A.shape[0] for n, m in modules(model)}


def rebuild_pruned(model, counts):
    """A pruned adapter being loaded: cut each named module to its saved count (its tensors are loaded after)."""
    for name, m in modules(model):
        if name in counts:
            m.prune(list(range(counts[name])))


def trainable(model):
    return sum(p.numel() for _, m in modules(model) for n, p in m.named_parameters() if not n.startswith("base."))


@torch.no_grad()
def track(model, attention_mask=None, beta=None):
    """After a forward: add each module's top-K assignments of real tokens to its counts (`util`), so that over
    the stage util_j / sum(util) is the share of the stage's assignments that went to expert j. With `beta`
    (the EMA option): util <- beta util + (1 - beta) share of this forward."""
    real = None if attention_mask is None else attention_mask.reshape(-1, 1).float()  # (T, 1)
    for _, m in modules(model):
        if m.router_logits is None:
            continue
        idx = moe.route(m.router_logits, m.top_k, renorm=False)[1]  # (T, K): the experts the forward chose
        wt = torch.ones(idx.shape, device=idx.device) if real is None else real.expand(idx.shape)
        counts = torch.zeros(m.A.shape[0], device=idx.device).scatter_add_(0, idx.reshape(-1), wt.reshape(-1))
        if beta is None:  # no boolean indexing, no bincount: no host sync
            m.util.copy_(torch.where(torch.isnan(m.util), counts, m.util + counts))
        else:
            share = counts / counts.sum().clamp(min=1)
            m.util.copy_(torch.where(torch.isnan(m.util), share, beta * m.util + (1 - beta) * share))


def utilization(util):
    """Shares (a list summing to 1) from a module's `util` (counts or EMA); nothing tracked: all 0."""
    u = [0.0 if math.isnan(x) else float(x) for x in util]
    total = sum(u)
    return [x / total for x in u] if total > 0 else u


def keep(util, tau, k):
    """The experts a module keeps: utilization at least tau / n, and at least its top-k (the most used)."""
    n = len(util)
    kept = [j for j in range(n) if util[j] >= tau / n]
    return kept if len(kept) >= k else sorted(sorted(range(n), key=lambda j: (-util[j], j))[:k])


def prune(model, optimizer=None, tau=0.5):
    """Prune every LoRA-MoE module physically (smaller tensors, router rows removed) and slice the optimizer's
    state to match: nothing dead is carried on. Returns the report {module: {before, after, util, keep, tau}}
    (util: the shares at pruning, keep: the surviving expert ids)."""
    report = {}
    with torch.no_grad():
        for name, m in modules(model):
            util = utilization(m.util.tolist())
            kept = keep(util, tau, m.top_k)
            report[name] = dict(before=len(util), after=len(kept), util=[round(u, 4) for u in util], keep=kept, tau=tau)
            if len(kept) < len(util):
                swap = m.prune(kept)
                if optimizer is not None:
                    _swap_in_optimizer(optimizer, swap, kept)
    return report


def _swap_in_optimizer(opt, swap, kept):
    for group in opt.param_groups:
        group["params"] = [swap.get(p, p) for p in group["params"]]
    for old, new in swap.items():
        state = opt.state.pop(old, None)
        if state:  # AdamW: exp_avg, exp_avg_sq shaped like the parameter (experts first); step a scalar
            idx = torch.tensor(kept, device=new.device)
            opt.state[new] = {k: v[idx].clone() if torch.is_tensor(v) and v.dim() > 0 else v for k, v in state.items()}


def prune_step(model, optimizer, tau, step, out=None, all_sum=None, world=1):
    """DMEP's pruning in a run, all of it. Under torchrun (all_sum: parallel.all_sum) every process first takes
    the utilization over all processes' tokens, so all prune alike; then `prune` (the optimizer's state sliced
    with the parameters); then, where `out` is given (the run's directory, on the first process only), the report
    printed and written: dmep.json and dmep_utilization.png. Returns the report. The caller's lists of the
    trainable parameters are stale after this: it reads them again from the model and the optimizer."""
    if all_sum is not None:
        with torch.no_grad():
            for _, m in modules(model):
                m.util.copy_(all_sum(m.util) / world)
    n_before = trainable(model)
    report = prune(model, optimizer, tau)
    n_after = trainable(model)
    if out is None:
        return report
    before, after = sum(r["before"] for r in report.values()), sum(r["after"] for r in report.values())
    print(f"dmep: pruned {before - after} of {before} LoRA experts; trainable {n_before:,} -> {n_after:,} "
          f"(-{100 * (1 - n_after / n_before):.1f}%); load balancing off from here")
    for name, r in report.items():
        print(f"  {name}: {r['before']} -> {r['after']}  util {r['util']}")
    os.makedirs(out, exist_ok=True)
    atomic.write_json(os.path.join(out, "dmep.json"), dict(step=step, trainable_before=n_before,
                                                           trainable_after=n_after, modules=report))
    plots.dmep(report, os.path.join(out, "dmep_utilization.png"))
    return report


def balance_loss(model, attention_mask=None, all_sum=None):
    """Stage 1's balancing loss: each LoRA-MoE module balanced on its own (transformers' load-balancing loss
    on its router logits), averaged over modules. Each module is its own small MoE with its own expert count,
    so they are not pooled. None when there is no module or no forward has run."""
    mods = [m for _, m in modules(model) if m.router_logits is not None]
    if not mods:
        return None
    return sum(moe.load_balancing_loss([m.router_logits], m.router.shape[0], m.top_k, attention_mask, all_sum)
               for m in mods) / len(mods)
