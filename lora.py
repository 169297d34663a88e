"""Hand-written LoRA for the frozen MoE transformer of moe.py, by composition (as mistral-finetune's lora.py).

- `LoRALinear` wraps a frozen nn.Linear: y = W x + scale * B A x, A (r, in) kaiming, B (out, r) zeros,
  scale = alpha / r (rsLoRA: alpha / sqrt(r)).
- `ExpertLoRA` holds A/B for gate, up and down of a chosen subset of one layer's stacked experts. Its
  update is computed inside moe.Experts' fast path as grouped products over the same sorted rows, and
  only on the rows routed to adapted experts: tokens routed to frozen experts cost no LoRA work, and
  B·A is never formed (MoE-Sieve's savings made real, DESIGN.md §5-6).
- `attach` places LoRA by method (DESIGN.md §1): attention q/k/v/o always; for the expert methods also
  the router, the shared expert, dense MLP layers and the planned routed experts. The whole network is
  frozen once; only adapter tensors train. Adapters save as adapter.safetensors + adapter_config.json.
Adapter weights are kept in fp32 and cast to the activations' dtype for the products (mixed precision).

Shape letters: D hidden, I expert width, E experts, m adapted experts of a layer, r rank, P sorted rows.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import moe

METHODS = ("lora", "attn", "sieve", "random", "coverage", "budget")
EXPERT_METHODS = ("lora", "sieve", "random", "coverage", "budget")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


class AdapterError(ValueError):
    pass


def lora_scale(r, alpha, rslora):
    return alpha / math.sqrt(r) if rslora else alpha / r


def _kaiming(shape, device):  # as nn.Linear / peft: kaiming_uniform(a=sqrt(5)) on each (r, in) matrix
    A = torch.empty(shape, device=device, dtype=torch.float32)
    for a in A.view(-1, *shape[-2:]):
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return nn.Parameter(A)


class LoRALinear(nn.Module):
    def __init__(self, base, r, alpha, dropout=0.0, rslora=False):
        super().__init__()
        self.base = base
        self.lora_A = _kaiming((r, base.in_features), base.weight.device)  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))  # (out, r)
        self.scale = lora_scale(r, alpha, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return y + F.linear(F.linear(self.dropout(x), a), b) * self.scale

    @torch.no_grad()
    def merge(self, sign=1):  # W += scale * B A, in fp32, then cast back to W's dtype
        W = self.base.weight
        W.copy_((W.float() + sign * self.scale * (self.lora_B.float() @ self.lora_A.float())).to(W.dtype))
        self.merged = sign > 0


def _pad_rank(A, B):
    """grouped_mm wants 16-byte rows: pad the rank to a multiple of 8 with zeros (exact: zero rows of A
    meet zero columns of B). A (m, r, in), B (m, out, r)."""
    pad = -A.shape[1] % 8
    return (A, B) if pad == 0 else (F.pad(A, (0, 0, 0, pad)), F.pad(B, (0, pad)))


class ExpertLoRA(nn.Module):
    """LoRA on gate, up and down of the experts `ids` of one layer (the adapter hook of moe.Experts)."""

    def __init__(self, experts, ids, r, alpha, dropout=0.0, rslora=False):
        super().__init__()
        E, I, D = experts.E, experts.I, experts.gate_up_proj.shape[-1]
        dev = experts.gate_up_proj.device
        self.ids, self.E, self.r = sorted(int(e) for e in ids), E, r
        self.slot = {e: j for j, e in enumerate(self.ids)}
        m = len(self.ids)
        self.gate_A, self.up_A, self.down_A = _kaiming((m, r, D), dev), _kaiming((m, r, D), dev), _kaiming((m, r, I), dev)
        self.gate_B = nn.Parameter(torch.zeros(m, I, r, device=dev))
        self.up_B = nn.Parameter(torch.zeros(m, I, r, device=dev))
        self.down_B = nn.Parameter(torch.zeros(m, D, r, device=dev))
        self.scale = lora_scale(r, alpha, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        adapted = torch.zeros(E, dtype=torch.bool, device=dev)
        adapted[self.ids] = True
        self.register_buffer("adapted", adapted, persistent=False)  # (E,)
        self.register_buffer("expert_ids", torch.tensor(self.ids, dtype=torch.long, device=dev), persistent=False)
        self.merged = False

    def prepare(self, g):
        """Once per layer: the sorted rows that carry LoRA work and their group offsets. With every expert
        adapted these are the rows as sorted. Otherwise the adapted experts' rows are moved to the front
        (in expert order) by a cumsum permutation: no second sort, no host sync. `valid` marks them."""
        if len(self.ids) == self.E:
            return None, None, g.offs
        keep = self.adapted[g.expert]  # (P,) row routed to an adapted expert
        kept, dropped = keep.long().cumsum(0), (~keep).long().cumsum(0)
        dest = torch.where(keep, kept - 1, kept[-1] + dropped - 1)  # (P,) new position of each row
        perm = torch.empty_like(dest).scatter_(0, dest, torch.arange(len(dest), device=dest.device))
        offs = g.counts[self.expert_ids].cumsum(0).to(torch.int32)  # (m,)
        valid = torch.arange(len(dest), device=dest.device) < offs[-1]  # (P,)
        return perm, valid[:, None], offs

    def _one(self, x, j, A, B):  # loop path: scale * B_j A_j x for the rows of one expert
        return F.linear(F.linear(x, A[j].to(x.dtype)), B[j].to(x.dtype)) * self.scale

    def _rows(self, x, at):  # fast path: the rows of the adapted experts, grouped; where() also zeroes
        perm, valid, _ = at  # the gradient of the rows past them (grouped_mm leaves those unset)
        return x if perm is None else torch.where(valid, x[perm], 0)

    def _back(self, y, at):  # fast path: scatter back to the layer's expert-sorted order
        perm, valid, _ = at
        return y if perm is None else torch.zeros_like(y).index_copy_(0, perm, torch.where(valid, y, 0))

    def gate_up(self, x, at):  # x (rows, D) -> (rows, 2I)
        if self.merged or (isinstance(at, int) and at not in self.slot):
            return 0.0  # merged, or a frozen expert: no LoRA work
        x = self.dropout(x)  # one dropout mask for gate and up: they read the same x
        if isinstance(at, int):
            j = self.slot[at]
            return torch.cat([self._one(x, j, self.gate_A, self.gate_B), self._one(x, j, self.up_A, self.up_B)], -1)
        offs, dt = at[2], x.dtype
        (gA, gB), (uA, uB) = _pad_rank(self.gate_A.to(dt), self.gate_B.to(dt)), _pad_rank(self.up_A.to(dt), self.up_B.to(dt))
        rp = gA.shape[1]
        h = moe._grouped_mm(self._rows(x, at), torch.cat([gA, uA], 1).transpose(1, 2), offs=offs)  # (P, 2r)
        y = torch.cat([moe._grouped_mm(h[:, :rp], gB.transpose(1, 2), offs=offs),
                       moe._grouped_mm(h[:, rp:], uB.transpose(1, 2), offs=offs)], dim=-1)  # (P, 2I)
        return self._back(y * self.scale, at)

    def down(self, h, at):  # h (rows, I) -> (rows, D)
        if self.merged or (isinstance(at, int) and at not in self.slot):
            return 0.0
        h = self.dropout(h)
        if isinstance(at, int):
            return self._one(h, self.slot[at], self.down_A, self.down_B)
        A, B = _pad_rank(self.down_A.to(h.dtype), self.down_B.to(h.dtype))
        z = moe._grouped_mm(self._rows(h, at), A.transpose(1, 2), offs=at[2])  # (P, r)
        return self._back(moe._grouped_mm(z, B.transpose(1, 2), offs=at[2]) * self.scale, at)

    @torch.no_grad()
    def merge(self, experts, sign=1):
        I = experts.I
        for j, e in enumerate(self.ids):
            for W, A, B in ((experts.gate_up_proj[e, :I], self.gate_A, self.gate_B),
                            (experts.gate_up_proj[e, I:], self.up_A, self.up_B),
                            (experts.down_proj[e], self.down_A, self.down_B)):
                W.copy_((W.float() + sign * self.scale * (B[j].float() @ A[j].float())).to(W.dtype))
        self.merged = sign > 0


# ----------------------------------------------------------------------------- attach

def _wrap(parent, name, **kw):
    setattr(parent, name, LoRALinear(getattr(parent, name), **kw))


def attach(model, method, r, alpha, dropout=0.0, rslora=False, plan=None):
    """Freeze the whole network, then put LoRA where `method` says. `plan` {layer: [expert ids]} chooses the
    routed experts of sieve/random/coverage/budget (sieve.py makes it); `lora` adapts every expert.
    Returns the adapter config (what save_adapter writes and load_adapter rebuilds from)."""
    if method not in METHODS:
        raise AdapterError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if r < 1:
        raise AdapterError(f"--rank must be at least 1, got {r}")
    cfg = model.config
    if method in EXPERT_METHODS and method != "lora" and plan is None:
        raise AdapterError(f"method {method!r} needs an expert plan (sieve.py)")
    if method == "lora":
        plan = {i: list(range(cfg.num_experts)) for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)}
    plan = {int(i): sorted(int(e) for e in ids) for i, ids in (plan or {}).items()}
    model.requires_grad_(False)  # freeze once, for the whole network
    kw = dict(r=r, alpha=alpha, dropout=dropout, rslora=rslora)
    for i, block in enumerate(model.model.layers):
        for name in ATTN:
            _wrap(block.self_attn, name, **kw)
        if method == "attn":
            continue
        mlp = block.mlp
        if isinstance(mlp, moe.MoE):
            _wrap(mlp, "gate", **kw)  # the router linear
            if cfg.shared_expert_intermediate_size:
                for name in ("gate_proj", "up_proj", "down_proj"):
                    _wrap(mlp.shared_expert, name, **kw)
            if plan.get(i):
                mlp.experts.adapter = ExpertLoRA(mlp.experts, plan[i], **kw)
        else:  # a dense layer (Qwen's mlp_only_layers): LoRA on its MLP like any other linear
            for name in ("gate_proj", "up_proj", "down_proj"):
                _wrap(mlp, name, **kw)
    model.train(model.training)  # the new modules (dropout) follow the model's train/eval mode
    return dict(format=1, method=method, r=r, alpha=alpha, dropout=dropout, rslora=rslora,
                targets=list(ATTN) if method == "attn" else list(ATTN) + ["router", "shared_expert", "dense_mlp", "experts"],
                plan={str(i): ids for i, ids in sorted(plan.items())} if method != "attn" else {},
                base=dict(model_type=cfg.model_type, fingerprint=cfg.fingerprint()))


def adapter_modules(model):
    return [m for m in model.modules() if isinstance(m, (LoRALinear, ExpertLoRA))]


def adapter_state(model):
    """{name: tensor} of every adapter tensor, under its name in the model."""
    own = {id(p) for m in adapter_modules(model) for n, p in m.named_parameters() if not n.startswith("base.")}
    return {n: p for n, p in model.named_parameters() if id(p) in own}


def count_trainable(model):
    return sum(p.numel() for p in adapter_state(model).values())


def merge(model, sign=1):
    """Fold every adapter into the base weights (fp32 math, cast back); sign=-1 unmerges. In bf16 the
    round trip is exact only up to rounding of the base weights."""
    for m in model.modules():
        if isinstance(m, LoRALinear) and m.merged != (sign > 0):
            m.merge(sign)
        elif isinstance(m, moe.Experts) and isinstance(m.adapter, ExpertLoRA) and m.adapter.merged != (sign > 0):
            m.adapter.merge(m, sign)


# ----------------------------------------------------------------------------- save / load

def _atomic(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapter(model, out_dir, config):
    """adapter.safetensors, then adapter_config.json (written last: its presence means the pair is complete)."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = {n: p.detach().float().contiguous().cpu() for n, p in adapter_state(model).items()}
    _atomic(os.path.join(out_dir, "adapter.safetensors"), lambda t: save_file(tensors, t))
    _atomic(os.path.join(out_dir, "adapter_config.json"), lambda t: open(t, "w").write(json.dumps(config, indent=1)))


def read_adapter_config(path):
    f = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(f):
        raise AdapterError(f"{f}: adapter_config.json not found")
    try:
        with open(f) as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{f}: not valid JSON ({e})") from None


def load_adapter(model, path):
    """Rebuild the adapter described by PATH/adapter_config.json on `model` and load its tensors strictly.
    Refuses an adapter made for another base model."""
    config = read_adapter_config(path)
    base, cfg = config.get("base", {}), model.config
    if base.get("model_type") != cfg.model_type or base.get("fingerprint") != cfg.fingerprint():
        raise AdapterError(f"{path}: adapter was made for a {base.get('model_type')} base with config fingerprint "
                           f"{base.get('fingerprint')}, but this model is {cfg.model_type} {cfg.fingerprint()}")
    attach(model, config["method"], config["r"], config["alpha"], config.get("dropout", 0.0),
           config.get("rslora", False), plan=config.get("plan"))
    load_adapter_tensors(model, os.path.join(path, "adapter.safetensors"))
    return config


def load_adapter_tensors(model, file):
    state = adapter_state(model)
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            names = set(f.keys())
            for n in sorted(names - set(state)):
                raise AdapterError(f"{file}: unexpected adapter tensor {n!r}")
            for n in sorted(set(state) - names):
                raise AdapterError(f"{file}: missing adapter tensor {n!r}")
            for n, p in state.items():
                t = f.get_tensor(n)
                if t.shape != p.shape:
                    raise AdapterError(f"{file}: tensor {n!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(t)
    except AdapterError:
        raise
    except Exception as e:
        raise AdapterError(f"{file}: cannot read adapter tensors ({e})") from None


def save_adapter_tensors(model, file):
    tensors = {n: p.detach().float().contiguous().cpu() for n, p in adapter_state(model).items()}
    _atomic(file, lambda t: save_file(tensors, t))
