"""Hand-written LoRA for the frozen MoE transformer of moe.py, by composition (as mistral-finetune's lora.py).

- `LoRALinear` wraps a frozen nn.Linear: y = W x + scale * B A x, A (r, in) kaiming, B (out, r) zeros,
  scale = alpha / r (rsLoRA: alpha / sqrt(r)).
- `ExpertLoRA` holds A/B for gate, up and down of a chosen subset of one layer's stacked experts, and adds
  their updates inside moe.Experts (its adapter hook). Plain: x @ A[e].T @ B[e].T * scale, expert by
  expert. Fast (kernels.py): grouped products over the layer's rows sorted by expert, on the rows routed
  to adapted experts only, so tokens routed to frozen experts cost no LoRA work and B·A is never formed:
  adapting only the most-routed experts (MoE-Sieve) really saves the work of the others.
- `attach` places the adapters of every method: for the LoRA methods attention q/k/v/o always, and for the
  expert methods also the router, the shared expert, dense MLP layers and the planned routed experts; PERFT's
  adapters (perft.py) and DMEP's LoRA-MoE modules (dmep.py). The whole network is
  frozen once; only adapter tensors train. Adapters save as adapter.safetensors + adapter_config.json.
Adapter weights are kept in fp32 and cast to the activations' dtype for the products (mixed precision).

Shape letters: D hidden, I expert width, E experts, m adapted experts of a layer, r rank, P sorted rows.
"""
import hashlib
import json
import math
import os
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import dmep
import kernels
import moe
import perft
from dmep import LoRAMoELinear
from perft import ExpertAdapter, ParallelAdapter

LORA_METHODS = ("lora", "attn", "sieve", "random", "coverage", "budget")  # plain LoRA: mergeable, exportable
EXPERT_METHODS = ("lora", "sieve", "random", "coverage", "budget")  # LoRA on routed experts
METHODS = LORA_METHODS + ("perft-s", "perft-d", "perft-r", "perft-e", "dmep")
# PERFT's shapes (perft_renorm None: as the base model's norm_topk_prob; perft_init: perft.INITS) and DMEP's
OPTIONS = dict(act="identity", perft_experts=4, perft_topk=2, perft_shared=2, perft_renorm=None, perft_init="theirs",
               dmep_experts=8, dmep_topk=2, dmep_targets="q_proj,k_proj,v_proj,o_proj,dense", dmep_counts=None)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


class AdapterError(ValueError):
    pass


def fingerprint(cfg):
    """A short hash of a moe.Config's architecture (adapters record it to refuse another base); the storage
    dtype and the aux-loss coefficient are left out: they do not change what an adapter applies to."""
    arch = {k: v for k, v in asdict(cfg).items() if k not in ("torch_dtype", "router_aux_loss_coef")}
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


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
        a, b = self.lora_A.to(x.dtype), (self.lora_B * self.scale).to(x.dtype)  # scale folded into B (small)
        return y + F.linear(F.linear(self.dropout(x), a), b)

    @torch.no_grad()
    def merge(self, sign=1):  # W += scale * B A, in fp32, then cast back to W's dtype
        W = self.base.weight
        W.copy_((W.float() + sign * self.scale * (self.lora_B.float() @ self.lora_A.float())).to(W.dtype))
        self.merged = sign > 0


class ExpertLoRA(nn.Module):
    """LoRA on gate, up and down of the experts `ids` of one layer: the adapter hook of moe.Experts (its
    docstring has the protocol). `reference` (moe.set_reference): the plain per-expert products, else the
    grouped ones of kernels.py, as its experts compute."""

    def __init__(self, experts, ids, r, alpha, dropout=0.0, rslora=False):
        super().__init__()
        E, I, D = experts.E, experts.I, experts.gate_up_proj.shape[-1]
        dev = experts.gate_up_proj.device
        self.ids, self.E, self.r = sorted(int(e) for e in ids), E, r
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
        self.groupable, self.reference = kernels.can_group(D, I), experts.reference
        self.merged = False

    def prepare(self, g, x):
        """Once per kernels.ExpertGroups g. Plain: [(j, lo, hi)], the rows lo:hi of each adapted expert
        ids[j] that has rows. Grouped: (rows, offs, x, index), the sorted rows that carry LoRA work, the
        group ends of the adapted experts, the layer input x (N, D) and the token of each of those rows.
        Every expert adapted: all rows (None). Otherwise the rows routed to adapted experts, ascending, so
        still grouped by expert; None if there are none. Finding them is one host sync per layer (nonzero);
        in exchange every LoRA tensor has those rows only. (Masking full (P, width) tensors instead, as a
        sync-free version must, costs more memory traffic than full LoRA's work: the sieve would be slower.)"""
        if self.reference or not self.groupable:
            return g.spans(self.ids)
        if len(self.ids) == self.E:
            return None, g.offs, x, g.token
        rows = self.adapted[g.expert].nonzero().squeeze(1)  # (n,)
        if rows.numel() == 0:
            return None  # no row reaches an adapted expert: no LoRA work in this layer
        offs = g.counts[self.expert_ids].cumsum(0).to(torch.int32)  # (m,) ends, the last one n
        return rows, offs, x, g.token[rows]

    def _one(self, x, j, A, B):  # plain LoRA for the rows of expert ids[j]: x @ A_j^T @ B_j^T * scale
        return x @ A[j].T.to(x.dtype) @ B[j].T.to(x.dtype) * self.scale

    def _plain(self, x, spans, A, B):  # _one on the rows of each adapted expert, 0 on the other rows
        out = x.new_zeros(x.shape[0], B.shape[1])
        for j, lo, hi in spans:
            out[lo:hi] = self._one(x[lo:hi], j, A, B)
        return out

    @staticmethod
    def _add(base, y, rows):  # grouped: base[rows] += y in place (base is a grouped_mm output held by nothing else)
        # index_put_, not index_add_: autograd's index_add keeps its (rows, width) source for backward
        return base.add_(y) if rows is None else base.index_put_((rows,), y, accumulate=True)

    def gate_up(self, gu, x, at):  # gu (rows, 2I) + scale [B_g A_g x, B_u A_u x], x (rows, D)
        if self.merged or not at:  # merged, or no row of an adapted expert
            return gu
        if self.reference or not self.groupable:
            x = self.dropout(x)  # one dropout mask for gate and up: they read the same x
            return gu + torch.cat([self._plain(x, at, self.gate_A, self.gate_B), self._plain(x, at, self.up_A, self.up_B)], -1)
        rows, offs, src, index = at
        gA, gB = kernels.grouped_lora_factors(self.gate_A, self.gate_B, self.scale, x.dtype)
        uA, uB = kernels.grouped_lora_factors(self.up_A, self.up_B, self.scale, x.dtype)
        rp = gA.shape[1]
        A = torch.cat([gA, uA], 1)  # (m, 2rp, D): gate's and up's A in one product
        B = torch.cat([F.pad(gB, (0, rp)), F.pad(uB, (rp, 0))], 1)  # (m, 2I, 2rp) block diagonal: one product writes [gate, up]
        z = kernels.a_product(self.dropout, x if rows is None else x[rows], A, offs, src, index)  # (n, 2rp)
        return self._add(gu, kernels.grouped_mm(z, B.transpose(1, 2), offs=offs), rows)

    def down(self, y, h, gu, x, at):  # y (rows, D) + scale B_d A_d h, h (rows, I) = swiglu(gu)
        if self.merged or not at:
            return y
        if self.reference or not self.groupable:
            return y + self._plain(self.dropout(h), at, self.down_A, self.down_B)
        rows, offs = at[:2]
        A, B = kernels.grouped_lora_factors(self.down_A, self.down_B, self.scale, h.dtype)
        z = kernels.a_product(self.dropout, h if rows is None else h[rows], A, offs, gu, rows, swiglu=True)  # (n, rp)
        return self._add(y, kernels.grouped_mm(z, B.transpose(1, 2), offs=offs), rows)

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


def attach(model, method, r, alpha, dropout=0.0, rslora=False, plan=None, **options):
    """Freeze the whole network, then add the adapters of `method`. `plan` {layer: [expert ids]} chooses the
    routed experts of sieve/random/coverage/budget (sieve.py makes it); `lora` adapts every expert.
    `options` (see OPTIONS) set PERFT's and DMEP's shapes. Returns the adapter config (what save_adapter
    writes and load_adapter rebuilds from)."""
    if method not in METHODS:
        raise AdapterError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if r < 1:
        raise AdapterError(f"--rank must be at least 1, got {r}")
    if set(options) - set(OPTIONS):
        raise AdapterError(f"unknown adapter options {sorted(set(options) - set(OPTIONS))}")
    o = {**OPTIONS, **options}
    if method == "perft-r" and not 1 <= o["perft_topk"] <= o["perft_experts"]:
        raise AdapterError(f"--perft-topk {o['perft_topk']} must be between 1 and --perft-experts {o['perft_experts']}")
    if method == "dmep" and not 1 <= o["dmep_topk"] <= o["dmep_experts"]:
        raise AdapterError(f"--dmep-topk {o['dmep_topk']} must be between 1 and --dmep-experts {o['dmep_experts']}")
    if o["perft_init"] not in perft.INITS:
        raise AdapterError(f"--perft-init {o['perft_init']!r} is not one of {', '.join(perft.INITS)}")
    cfg = model.config
    if method in ("sieve", "random", "coverage", "budget") and plan is None:
        raise AdapterError(f"method {method!r} needs an expert plan (sieve.py)")
    if method == "lora":
        plan = {i: list(range(cfg.num_experts)) for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)}
    plan = {int(i): sorted(int(e) for e in ids) for i, ids in (plan or {}).items()}
    model.requires_grad_(False)  # freeze once, for the whole network
    kw = dict(r=r, alpha=alpha, dropout=dropout, rslora=rslora)
    scale = lora_scale(r, alpha, rslora)
    for i, block in enumerate(model.model.layers):
        mlp = block.mlp
        moe_layer = isinstance(mlp, moe.MoE)
        if method == "dmep":  # LoRA-MoE on the chosen linears: attention, and "dense" = shared experts / dense MLPs
            for parent, name in dmep.sites(block, cfg, o["dmep_targets"]):
                setattr(parent, name, LoRAMoELinear(getattr(parent, name), o["dmep_experts"], o["dmep_topk"], r, scale, dropout))
            continue
        if method.startswith("perft"):  # beside (S/D/R) or inside (E) the MoE block; attention untouched
            if moe_layer:
                perft.attach(mlp, method, cfg, r, scale, dropout, o)
            continue
        for name in ATTN:
            _wrap(block.self_attn, name, **kw)
        if method == "attn":
            continue
        if moe_layer:
            _wrap(mlp, "gate", **kw)  # the router linear
            if cfg.shared_expert_intermediate_size:
                for name in ("gate_proj", "up_proj", "down_proj"):
                    _wrap(mlp.shared_expert, name, **kw)
            if plan.get(i):
                mlp.experts.adapter = ExpertLoRA(mlp.experts, plan[i], **kw)
        else:  # a dense layer (Qwen's mlp_only_layers): LoRA on its MLP like any other linear
            for name in ("gate_proj", "up_proj", "down_proj"):
                _wrap(mlp, name, **kw)
    for name, m in model.named_modules():  # a pruned DMEP adapter being loaded: rebuild its smaller shapes
        if isinstance(m, LoRAMoELinear) and name in (o["dmep_counts"] or {}):
            m.prune(list(range(o["dmep_counts"][name])))
    model.train(model.training)  # the new modules (dropout) follow the model's train/eval mode
    return dict(format=1, method=method, r=r, alpha=alpha, dropout=dropout, rslora=rslora,
                plan={str(i): ids for i, ids in sorted(plan.items())} if method in EXPERT_METHODS else {},
                options={k: v for k, v in o.items() if k.startswith(method.split("-")[0]) or k == "act"},
                base=dict(model_type=cfg.model_type, fingerprint=fingerprint(cfg)))


ADAPTERS = (LoRALinear, ExpertLoRA, ParallelAdapter, ExpertAdapter, LoRAMoELinear)


def adapter_modules(model):
    return [m for m in model.modules() if isinstance(m, ADAPTERS)]


def current_config(model, config):
    """The adapter config as the model now is: DMEP records each module's expert count after pruning,
    so that loading rebuilds the pruned shapes."""
    if config["method"] != "dmep":
        return config
    counts = {n: m.A.shape[0] for n, m in model.named_modules() if isinstance(m, LoRAMoELinear)}
    return {**config, "options": {**config["options"], "dmep_counts": counts}}


def adapter_state(model):
    """{name: tensor} of every adapter tensor, under its name in the model."""
    own = {id(p) for m in adapter_modules(model) for n, p in m.named_parameters() if not n.startswith("base.")}
    return {n: p for n, p in model.named_parameters() if id(p) in own}


def count_trainable(model):
    return sum(p.numel() for p in adapter_state(model).values())


def router_balance_loss(model, attention_mask=None, all_sum=None):
    """The balancing loss of the adapters' own routers, from the last forward's router logits: PERFT-R's pooled
    over all layers (perft.balance_loss, as its public code), DMEP's per module and averaged (dmep.balance_loss).
    all_sum as in moe.load_balancing_loss."""
    loss = perft.balance_loss(model, attention_mask, all_sum)
    return dmep.balance_loss(model, attention_mask, all_sum) if loss is None else loss


def merge(model, sign=1):
    """Fold every adapter into the base weights (fp32 math, cast back); sign=-1 unmerges. In bf16 the
    round trip is exact only up to rounding of the base weights."""
    if any(isinstance(m, (ParallelAdapter, ExpertAdapter, LoRAMoELinear)) for m in model.modules()):
        raise AdapterError("PERFT and DMEP adapters depend on the input (routers of their own, or per-expert "
                           "outputs): they cannot be merged into plain weights")
    for m in model.modules():
        if isinstance(m, LoRALinear) and m.merged != (sign > 0):
            m.merge(sign)
        elif isinstance(m, moe.Experts) and isinstance(m.adapter, ExpertLoRA) and m.adapter.merged != (sign > 0):
            m.adapter.merge(m, sign)


# ----------------------------------------------------------------------------- save / load

def atomic_write(path, write):
    """write(tmp) then rename tmp -> path: readers see the old file or the whole new one, never half of one.
    The file and then its directory are fsynced, so a power cut after the return cannot lose the rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapter(model, out_dir, config):
    """adapter.safetensors, then adapter_config.json (written last: its presence means the pair is complete)."""
    config = current_config(model, config)
    os.makedirs(out_dir, exist_ok=True)
    tensors = {n: p.detach().float().contiguous().cpu() for n, p in adapter_state(model).items()}
    atomic_write(os.path.join(out_dir, "adapter.safetensors"), lambda t: save_file(tensors, t))
    atomic_write(os.path.join(out_dir, "adapter_config.json"), lambda t: open(t, "w").write(json.dumps(config, indent=1)))


def read_adapter_config(path):
    f = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(f):
        raise AdapterError(f"{f}: adapter_config.json not found")
    try:
        with open(f) as fh:
            config = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{f}: expected a JSON object, got {type(config).__name__}")
    for key, ok in (("method", isinstance(config.get("method"), str)),
                    ("r", isinstance(config.get("r"), int) and not isinstance(config.get("r"), bool)),
                    ("alpha", isinstance(config.get("alpha"), (int, float)) and not isinstance(config.get("alpha"), bool)),
                    ("options", isinstance(config.get("options", {}), dict)), ("base", isinstance(config.get("base", {}), dict)),
                    ("plan", isinstance(config.get("plan") or {}, dict))):
        if not ok:
            raise AdapterError(f"{f}: {key!r} is missing or has the wrong type ({config.get(key)!r})")
    return config


def load_adapter(model, path):
    """Rebuild the adapter described by PATH/adapter_config.json on `model` and load its tensors strictly.
    Refuses an adapter made for another base model."""
    config = read_adapter_config(path)
    base, cfg = config.get("base", {}), model.config
    if base.get("model_type") != cfg.model_type or base.get("fingerprint") != fingerprint(cfg):
        raise AdapterError(f"{path}: adapter was made for a {base.get('model_type')} base with config fingerprint "
                           f"{base.get('fingerprint')}, but this model is {cfg.model_type} {fingerprint(cfg)}")
    try:
        attach(model, config["method"], config["r"], config["alpha"], config.get("dropout", 0.0),
               config.get("rslora", False), plan=config.get("plan"), **config.get("options", {}))
    except (AdapterError, ValueError, TypeError) as e:  # the values came from the file, not from flags
        raise AdapterError(f"{os.path.join(path, 'adapter_config.json')}: {e}") from None
    load_adapter_tensors(model, os.path.join(path, "adapter.safetensors"))
    return config


def load_adapter_tensors(model, file, state=None):
    state = adapter_state(model) if state is None else state
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
                if not torch.isfinite(t).all():
                    raise AdapterError(f"{file}: tensor {n!r} has non-finite values (inf or NaN)")
                with torch.no_grad():
                    p.copy_(t)
    except AdapterError:
        raise
    except Exception as e:
        raise AdapterError(f"{file}: cannot read adapter tensors ({e})") from None


def save_adapter_tensors(model, file, state=None):
    """The adapter's tensors (or `state`, e.g. every weight for full training) in fp32, atomically."""
    tensors = {n: p.detach().float().contiguous().cpu() for n, p in (state or adapter_state(model)).items()}
    atomic_write(file, lambda t: save_file(tensors, t))
