"""PERFT (Parameter-Efficient Routed Fine-Tuning, arXiv 2508.02587): adapter experts for a frozen MoE block.

Every adapter expert is B act(A h) on the MoE block's input h (D -> r -> D), scaled by alpha / r. The four
variants, one constructor each below (`attach`, called by methods.attach, places them, one per MoE layer):

    perft_s   PERFT-S  one always-on adapter beside the MoE block                  (ParallelAdapter, n = 1)
    perft_d   PERFT-D  M always-on adapters beside the block, summed                (ParallelAdapter, n = M)
    perft_r   PERFT-R  N adapters and a NEW trainable router D -> N: top-K per token, each chosen adapter
                       weighted by that router's own softmax weight (`weights="own"`) or, as the OLMoE
                       file runs it, by the BASE router's top-K weight of its slot (`"base"`)
                                                                                   (ParallelAdapter + router)
    perft_e   PERFT-E  one adapter inside every routed expert, weighted by the frozen base router's top-k
                       weights (ExpertAdapter: it runs in the expert hook of moe.Experts, as
                       lora.ExpertLoRA does, on the (token, expert) pairs the base router chose)
PERFT-R's router routes as the base model's does (moe.route: softmax in fp32, top-K, renormalised or not).

Faithful to the public code of the paper (github.com/yuninxia/moe-routing-bench, 3rdparty/PERFT-MoE):
- initialisation (commonsense/utils.py: init_trainable_parameters): every adapter's A (r x D) ~ N(0,1)*sqrt(2/r),
  B ~ N(0,1)*1e-6; PERFT-R's router is an nn.Linear that transformers initialises with N(0, 0.02)
  (initializer_range). `init="kaiming"` keeps LoRA's usual init (A kaiming-uniform, B = 0: exactly the base
  model at step 0) as an option.
- PERFT-R's top-K weights are renormalised as the base model renormalises its own (olmoe_modification/
  modeling_olmoe.py: OlmoeSparseMoeBlock.forward uses norm_topk_prob; the Mixtral copy always does).
- PERFT-R's weights (`--perft-weights`, WEIGHTS below). The Mixtral file (mixtral_modification/modeling_mixtral.py
  l. 1041) and the paper weight adapter j by the adapter router's own weight,
  `shared_routing_adapter_routing_weights[top_x, idx]` ("own"). The OLMoE file (olmoe_modification/
  modeling_olmoe.py l. 882, OlmoeSparseMoeBlock.forward) multiplies by `routing_weights[top_x, idx]`, the BASE
  router's top-K weights (l. 817-822) indexed by the slot idx in which the adapter router chose adapter j
  ("base"): the adapter router's weights are computed and unused, and that router only chooses which adapters
  run; it gets no gradient from the language-model loss, only from its balancing loss (kept). The paper's OLMoE
  numbers come from the OLMoE file, so the recipe follows each base's file.
- dropout: every adapter expert has its own nn.Dropout (OlmoeBlockLoraExpert, l. 704-719), so each of the n
  adapters draws its own mask on h (`gated` with a (n, T, D) input).
- losses (modeling_olmoe.py: OlmoeAdapterForCausalLM.forward, trained with output_router_logits=True): the
  base router's load-balancing loss (coefficient 0.01, transformers' default) plus ONE balancing loss over the
  adapter routers' logits of all layers pooled (coefficient 0.01): `balance_loss` below.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
import lora_fast
import moe

INITS = ("theirs", "kaiming")
WEIGHTS = ("own", "base")  # PERFT-R: the adapter router's own top-K weights, or the base router's (OLMoE file)
# --perft-weights also takes "file": as the public code of the base model's family runs it (file_weights)
ROUTER_STD = 0.02  # transformers' initializer_range default (OLMoE, Mixtral), used by _init_weights for new Linears
ACTS = {"identity": nn.Identity, "silu": nn.SiLU, "relu": nn.ReLU}

# `python train.py --recipe perft`: the public code's OLMoE LoRA-adapter runs, keyed by train.py's flag names.
RECIPE = dict(
    method="perft-r",
    rank=8, alpha=16,  # math/OLMoE-1B-7B.lora.sh: configs "8 16 ... 4 2 8.4-2" (r 8, alpha 2r)
    perft_experts=4, perft_topk=2,  # the same script's "4 2" (N = 4 adapter experts, top-2)
    perft_renorm="base",  # as the base model's norm_topk_prob (modeling_olmoe.py, OlmoeSparseMoeBlock)
    perft_weights="file",  # as the base model's public file: the OLMoE file's base-router weights on an OLMoE base,
    # the Mixtral file's own weights on Mixtral (modeling_olmoe.py l. 882 / modeling_mixtral.py l. 1041): file_weights
    perft_aux_coef=0.01,  # configuration_olmoe.py: shared_routing_adapter_router_aux_loss_coef=0.01
    aux_coef=0.01,  # the base router's loss is on too: finetune.py output_router_logits=True, router_aux_loss_coef 0.01
    adapter_act="identity",  # adapter_type 'LoRA' (OlmoeBlockLoraExpert)
    perft_init="theirs",  # commonsense/utils.py: init_trainable_parameters
    dropout=0.05,  # commonsense/finetune.py: dropout default 0.05 (lora_dropout)
    lr=1e-5,  # math/OLMoE-1B-7B.lora.sh: --learning_rate 1e-5
    weight_decay=0.0,  # finetune.py: weight_decay default 0.0
    warmup=0.003,  # finetune.py: warmup_steps=100, about 0.3% of 3 epochs of commonsense_170k at batch 16
    schedule="linear",  # transformers.TrainingArguments' default lr_scheduler_type
    epochs=3, batch_size=16, grad_accum=1,  # the .sh scripts: --batch_size 16 --micro_batch_size 16 --num_epochs 3
    seq_len=256,  # --cutoff_len 256
    loss_on="all",  # finetune.py: train_on_inputs=True (loss on the prompt too)
    eos="on",  # math/finetune.py l. 210-225: tokenize(prompt, add_eos_token=True) appends EOS
)


def file_weights(model_type):
    """PERFT-R's weights as the public code of this base runs them: "base" on OLMoE (modeling_olmoe.py l. 882),
    "own" on Mixtral (modeling_mixtral.py l. 1041) and on any other base (no file; the paper's formula)."""
    return "base" if model_type == "olmoe" else "own"


def init_factors(n, r, d_in, d_out, init, device=None):
    """(A (n, r, d_in), B (n, d_out, r)) of n adapter experts, as parameters in fp32.
    theirs: A ~ N(0,1)*sqrt(2/r), B ~ N(0,1)*1e-6 (PERFT's init_trainable_parameters; size[0] of nn.Linear(D, r)'s
    weight is r). kaiming: A kaiming-uniform(a=sqrt(5)) per expert as nn.Linear / peft, B = 0."""
    if init not in INITS:
        raise ValueError(f"--perft-init {init!r} is not one of {', '.join(INITS)}")
    if init == "kaiming":
        return lora.kaiming_A((n, r, d_in), device), nn.Parameter(torch.zeros(n, d_out, r, device=device))
    A = torch.empty(n, r, d_in, device=device).normal_().mul_(math.sqrt(2 / r))
    B = torch.randn(n, d_out, r, device=device) * 1e-6
    return nn.Parameter(A), nn.Parameter(B)


def gated(x, A, B, act, gate, scale):
    """sum_j gate_j * B_j act(A_j x_j) over n small adapter experts, computed densely (n*r is tiny next to
    the base) with unchosen experts gated by exactly 0. x (T, in), the same input for all, or (n, T, in), one
    per expert (each with its own dropout mask: `dropped`); A (n, r, in), B (n, out, r), gate (T, n) or None."""
    n, r, _ = A.shape
    if x.dim() == 3:  # (n, T, in): expert j reads x[j]
        z = act(torch.einsum("ntd,nrd->tnr", x, A.to(x.dtype))).reshape(x.shape[1], n * r)  # (T, n*r)
    else:
        z = act(F.linear(x, A.reshape(n * r, -1).to(x.dtype)))  # (T, n*r)
    if gate is not None:
        z = (z.view(-1, n, r) * gate.to(z.dtype)[..., None]).reshape(-1, n * r)
    return F.linear(z, B.permute(1, 0, 2).reshape(B.shape[1], n * r).to(x.dtype)) * scale  # (T, out)


def dropped(dropout, x, n):
    """The input of n adapter experts that each own a dropout (as the public code's one nn.Dropout per expert
    module): (n, T, in), a mask of its own for each, while `dropout` is active; else x itself (T, in), shared."""
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
        return dropout(x.unsqueeze(0).expand(n, *x.shape))
    return x


def keep_router_logits(module, logits):
    """module.router_logits = logits, for the balancing loss and DMEP's tracking, except inside a backward pass:
    there --grad-checkpoint is recomputing this forward, and the recomputed logits, kept until the next forward,
    would keep the whole recomputed graph of the block alive with them (every layer's, by the end of backward).
    Compiled, the check would break the block's graph: there they are always kept, as before."""
    if torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1:  # -1: not inside a backward
        module.router_logits = logits


def dense_gate(logits, k, renorm, base_w=None):
    """moe.route's top-k weights spread out densely: the (T, n) fp32 gate, 0 for the unchosen experts. base_w
    (T, >= k), PERFT-R's "base" weights: the expert chosen in slot j gets base_w[:, j] instead of its own weight
    (modeling_olmoe.py l. 882: routing_weights[top_x, idx], idx the slot)."""
    w, idx = moe.route(logits, k, renorm)  # (T, k)
    if base_w is not None:
        w = base_w[:, :k].float()
    return torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter_(-1, idx, w)


class ParallelAdapter(nn.Module):
    """PERFT-S/D/R: n adapter experts B_j act(A_j h) beside the MoE block, reading its input h (T, D).
    No router (top_k None): all n on and summed (S: n=1, D: n=M). With a router (R): a new trainable
    router D -> n picks the top-k per token; each chosen expert is weighted by that router's own weight
    (weights "own": the paper, the Mixtral file) or by the base router's top-K weight of the slot it was chosen
    in (weights "base": the OLMoE file; then the router learns from its balancing loss only: the weights that
    reach the output do not depend on it). Each of the n adapters draws its own dropout mask (`dropped`)."""

    def __init__(self, D, n, r, scale, act="identity", top_k=None, renorm=False, dropout=0.0, init="theirs",
                 device=None, weights="own"):
        super().__init__()
        if weights not in WEIGHTS:
            raise ValueError(f"--perft-weights {weights!r} is not one of {', '.join(WEIGHTS)}")
        self.A, self.B = init_factors(n, r, D, D, init, device)
        self.router = nn.Parameter(torch.randn(n, D, device=device) * ROUTER_STD) if top_k else None  # (n, D)
        self.top_k, self.renorm, self.act, self.scale, self.weights = top_k, renorm, ACTS[act](), scale, weights
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router_logits = None  # the last forward's (T, n) router logits, for balance_loss

    def forward(self, h, base_w=None):  # h (T, D); base_w (T, K) the base router's top-K weights (moe.MoE passes them)
        gate = None
        if self.router is not None:
            logits = F.linear(h, self.router.to(h.dtype))  # (T, n)
            keep_router_logits(self, logits)
            if self.weights == "base" and base_w is None:
                raise ValueError("PERFT-R with --perft-weights base needs the base router's top-K weights")
            gate = dense_gate(logits, self.top_k, self.renorm, base_w if self.weights == "base" else None)
        return gated(dropped(self.dropout, h, self.A.shape[0]), self.A, self.B, self.act, gate, self.scale)


def perft_s(D, r, scale, act="identity", dropout=0.0, init="theirs", device=None):
    """PERFT-S: one always-on adapter beside the MoE block (a shared adapter expert)."""
    return ParallelAdapter(D, 1, r, scale, act, None, False, dropout, init, device)


def perft_d(D, m, r, scale, act="identity", dropout=0.0, init="theirs", device=None):
    """PERFT-D: m always-on adapters beside the MoE block, their outputs summed."""
    return ParallelAdapter(D, m, r, scale, act, None, False, dropout, init, device)


def perft_r(D, n, k, renorm, r, scale, act="identity", dropout=0.0, init="theirs", device=None, weights="own"):
    """PERFT-R: n adapters and a new router D -> n; the top-k adapters per token, weighted by its softmax
    (weights "own") or by the base router's top-K weights slot by slot ("base")."""
    if not 1 <= k <= n:
        raise ValueError(f"--perft-topk {k} must be between 1 and --perft-experts {n}")
    return ParallelAdapter(D, n, r, scale, act, k, renorm, dropout, init, device, weights)


class ExpertAdapter(nn.Module):
    """PERFT-E: an adapter B_e act(A_e x) inside every routed expert e,
    added to the expert's output, so the frozen base router weights it: y = sum_i w_i (E_i(h) + adapter_i(h)).
    Runs in moe.Experts' adapter hook (the protocol in its docstring), on the (token, expert) pairs the router
    chose only: plain, expert by expert; fast, as lora_fast.py's grouped products over the layer's sorted rows
    (the same as lora.ExpertLoRA's). Initialised as PERFT's public code (init_factors)."""

    def __init__(self, experts, r, scale, act="identity", dropout=0.0, init="theirs"):
        super().__init__()
        E, D, dev = experts.E, experts.gate_up_proj.shape[-1], experts.gate_up_proj.device
        self.A, self.B = init_factors(E, r, D, D, init, dev)  # (E, r, D), (E, D, r)
        self.act, self.scale = ACTS[act](), scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # ---- plain: one expert's rows at a time (moe.Experts.forward_loop)

    def gate_up(self, e, gu, x):
        return gu

    def down(self, e, y, h, x):  # y (n, D) + scale B_e act(A_e x), x (n, D) expert e's rows of the block input
        x = self.dropout(x)
        return y + F.linear(self.act(F.linear(x, self.A[e].to(x.dtype))), self.B[e].to(x.dtype)) * self.scale

    # ---- fast: the layer's sorted rows at once (moe_fast.grouped_experts), the body in lora_fast.py

    def grouped_prepare(self, groups, x):
        return groups.offs, x, groups.token

    def grouped_gate_up(self, gu, x, work):
        return gu

    def grouped_down(self, y, h, gu, x, work):
        return lora_fast.expert_adapter_down(self, y, x, work)


def perft_e(experts, r, scale, act="identity", dropout=0.0, init="theirs"):
    """PERFT-E: one adapter inside every routed expert of `experts` (moe.Experts), weighted by the base router."""
    return ExpertAdapter(experts, r, scale, act, dropout, init)


def attach(mlp, method, cfg, r, scale, dropout, options):
    """PERFT's adapter of one MoE layer `mlp` (moe.MoE): inside its experts (E) or beside the block (S, D, R).
    options: methods.OPTIONS's act, perft_init, perft_shared, perft_experts, perft_topk, perft_renorm,
    perft_weights (own, base; methods.attach has resolved "file")."""
    o, D, dev = options, cfg.hidden_size, mlp.gate.weight.device
    if method == "perft-e":
        mlp.experts.adapter = perft_e(mlp.experts, r, scale, o["act"], dropout, o["perft_init"])
        return
    common = dict(act=o["act"], dropout=dropout, init=o["perft_init"], device=dev)
    if method == "perft-s":
        mlp.adapter = perft_s(D, r, scale, **common)
    elif method == "perft-d":
        mlp.adapter = perft_d(D, o["perft_shared"], r, scale, **common)
    else:  # PERFT-R renormalises its top-K weights as the base model renormalises its own, unless told
        renorm = cfg.norm_topk_prob if o["perft_renorm"] is None else bool(o["perft_renorm"])
        weights = o["perft_weights"]
        mlp.adapter = perft_r(D, o["perft_experts"], o["perft_topk"], renorm, r, scale, **common, weights=weights)


def balance_loss(model, attention_mask=None, all_sum=None):
    """PERFT-R's adapter-router loss: transformers' load-balancing loss over the adapter routers' logits of ALL
    layers pooled into one (as the public code passes the tuple of every layer's logits to
    load_balancing_loss_func). None when the model has no PERFT-R router or no forward has run."""
    mods = [m for m in model.modules() if isinstance(m, ParallelAdapter) and m.router_logits is not None]
    if not mods:
        return None
    n, k = mods[0].router.shape[0], mods[0].top_k
    return moe.load_balancing_loss([m.router_logits for m in mods], n, k, attention_mask, all_sum)
