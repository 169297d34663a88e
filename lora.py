"""Hand-written LoRA for the frozen MoE transformer of moe.py, by composition (as mistral-finetune's lora.py).

- `LoRALinear` wraps a frozen nn.Linear: y = W x + scale * B A x, A (r, in) kaiming, B (out, r) zeros,
  scale = alpha / r (rsLoRA: alpha / sqrt(r)). B = 0 at the start: exactly the base model.
- `ExpertLoRA` holds A/B for gate, up and down of a chosen subset of one layer's stacked experts (all of them
  for full LoRA, the most-routed for MoE-Sieve) and adds their updates inside moe.Experts (its adapter hook).
  Plainly: x @ A[e].T @ B[e].T * scale on the rows of each adapted expert e, nothing for the others. Its fast
  twin (lora_fast.py) does the same as grouped products over the layer's rows routed to adapted experts only,
  so tokens routed to frozen experts cost no LoRA work and B A is never formed.
Adapter weights are kept in fp32 and cast to the activations' dtype for the products (mixed precision).
Which linears get an adapter for each --method is methods.py's job; freezing the base happens there, once.

Shape letters: D hidden, I expert width, E experts, m adapted experts of a layer, r rank, n rows of one expert.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_fast


def lora_scale(r, alpha, rslora):
    return alpha / math.sqrt(r) if rslora else alpha / r


def kaiming_A(shape, device=None):
    """A LoRA A factor (..., r, in) in fp32, each (r, in) matrix drawn as nn.Linear and peft draw it:
    kaiming_uniform(a=sqrt(5)). Every adapter of the project that starts from LoRA's init draws A here."""
    A = torch.empty(shape, device=device, dtype=torch.float32)
    for a in A.view(-1, *shape[-2:]):
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return nn.Parameter(A)


class LoRALinear(nn.Module):
    def __init__(self, base, r, alpha, dropout=0.0, rslora=False):
        super().__init__()
        self.base = base
        self.lora_A = kaiming_A((r, base.in_features), base.weight.device)  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))  # (out, r)
        self.scale = lora_scale(r, alpha, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        a, b = self.lora_A.to(x.dtype), (self.lora_B * self.scale).to(x.dtype)  # scale folded into B (small)
        return y + F.linear(F.linear(self.dropout(x), a), b)

    @torch.no_grad()
    def merge(self, sign=1):  # W += scale * B A, in fp32, then cast back to W's dtype
        W = self.base.weight
        W.copy_((W.float() + sign * self.scale * (self.lora_B.float() @ self.lora_A.float())).to(W.dtype))
        self.merged = sign > 0


class ExpertLoRA(nn.Module):
    """LoRA on gate, up and down of the experts `ids` of one layer: the adapter hook of moe.Experts (its
    docstring has the protocol). The j-th adapted expert, ids[j], owns gate_A[j], gate_B[j], and so on."""

    def __init__(self, experts, ids, r, alpha, dropout=0.0, rslora=False):
        super().__init__()
        E, I, D = experts.E, experts.I, experts.gate_up_proj.shape[-1]
        dev = experts.gate_up_proj.device
        self.ids, self.E, self.r = sorted(int(e) for e in ids), E, r
        self.slot = {e: j for j, e in enumerate(self.ids)}  # expert id -> its index among the adapted experts
        m = len(self.ids)
        self.gate_A, self.up_A, self.down_A = kaiming_A((m, r, D), dev), kaiming_A((m, r, D), dev), kaiming_A((m, r, I), dev)
        self.gate_B = nn.Parameter(torch.zeros(m, I, r, device=dev))
        self.up_B = nn.Parameter(torch.zeros(m, I, r, device=dev))
        self.down_B = nn.Parameter(torch.zeros(m, D, r, device=dev))
        self.scale = lora_scale(r, alpha, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        adapted = torch.zeros(E, dtype=torch.bool, device=dev)
        adapted[self.ids] = True  # for the grouped products: which sorted rows carry LoRA work
        self.register_buffer("adapted", adapted, persistent=False)  # (E,)
        self.register_buffer("expert_ids", torch.tensor(self.ids, dtype=torch.long, device=dev), persistent=False)
        self.merged = False

    # ---- plain: one expert's rows at a time (moe.Experts.forward_loop)

    def _delta(self, x, j, A, B):  # x @ A_j^T @ B_j^T * scale, the update of adapted expert ids[j] on its rows x
        return x @ A[j].T.to(x.dtype) @ B[j].T.to(x.dtype) * self.scale

    def gate_up(self, e, gu, x):  # gu (n, 2I) + scale [B_g A_g x, B_u A_u x] if expert e is adapted
        j = self.slot.get(e)
        if j is None or self.merged:
            return gu
        # gate and up are two modules with a dropout each (peft's lora_dropout per target): two masks on one x
        gate, up = self._delta(self.dropout(x), j, self.gate_A, self.gate_B), self._delta(self.dropout(x), j, self.up_A, self.up_B)
        return gu + torch.cat([gate, up], -1)

    def down(self, e, y, h, x):  # y (n, D) + scale B_d A_d h if expert e is adapted, h (n, I) = swiglu(gu)
        j = self.slot.get(e)
        if j is None or self.merged:
            return y
        return y + self._delta(self.dropout(h), j, self.down_A, self.down_B)

    # ---- fast: the layer's sorted rows at once (moe_fast.grouped_experts), bodies in lora_fast.py

    def grouped_prepare(self, groups, x):
        return lora_fast.expert_lora_prepare(self, groups, x)

    def grouped_gate_up(self, gu, x, work):
        return lora_fast.expert_lora_gate_up(self, gu, x, work)

    def grouped_down(self, y, h, gu, x, work):
        return lora_fast.expert_lora_down(self, y, h, gu, work)

    @torch.no_grad()
    def merge(self, experts, sign=1):
        I = experts.I
        for j, e in enumerate(self.ids):
            for W, A, B in ((experts.gate_up_proj[e, :I], self.gate_A, self.gate_B),
                            (experts.gate_up_proj[e, I:], self.up_A, self.up_B),
                            (experts.down_proj[e], self.down_A, self.down_B)):
                W.copy_((W.float() + sign * self.scale * (B[j].float() @ A[j].float())).to(W.dtype))
        self.merged = sign > 0
