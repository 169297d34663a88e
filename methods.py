"""Every --method in one place: which adapters it puts where, and the adapter files.

    method     adapts                                                                        its file
    attn       LoRA on attention q/k/v/o                                                     lora.py
    lora       attn + the router, shared experts, dense MLP layers and EVERY routed expert  lora.py
    sieve      as lora, routed experts only the most-routed per layer (a plan)               sieve.py
    random / coverage / budget   the sieve's ablations: other plans, same placement         sieve.py
    perft-s/d/r/e   adapter experts beside the MoE block, or inside each expert              perft.py
    dmep       LoRA-MoE (LoRA experts + a router) on chosen linears, later pruned            dmep.py

`attach` freezes the whole network once, then places the method's adapters; only adapter tensors train. It
returns the adapter config, which `save_adapter` writes beside the tensors and `load_adapter` rebuilds from.
`OPTIONS` is the one table of the adapter options' defaults: train.py's flags read their defaults from it and
a recipe (sieve.RECIPE, perft.RECIPE, dmep.RECIPE) overrides them.
"""
import hashlib
import json
import os
from dataclasses import asdict

import torch
from safetensors import safe_open

import dmep
import lora
import moe
import perft
import sieve
from dmep import LoRAMoELinear
from files import atomic
from lora import ExpertLoRA, LoRALinear
from perft import ExpertAdapter, ParallelAdapter

PLANNED = ("sieve", "random", "coverage", "budget")  # LoRA on the routed experts of a plan (sieve.py)
EXPERT_METHODS = ("lora",) + PLANNED  # LoRA on routed experts
LORA_METHODS = ("attn",) + EXPERT_METHODS  # plain LoRA: mergeable, exportable to PEFT
METHODS = LORA_METHODS + ("perft-s", "perft-d", "perft-r", "perft-e", "dmep")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
# The adapter options and their defaults. act: PERFT's adapter activation; perft_renorm None: as the base
# model's norm_topk_prob (RENORM: the flag's spellings); perft_weights: own, base or file (as the base's
# public file: perft.file_weights, recorded resolved); dmep_counts: a pruned DMEP adapter's sizes (loading).
OPTIONS = dict(act="identity", perft_experts=4, perft_topk=2, perft_shared=2, perft_renorm=None, perft_init="theirs",
               perft_weights="own",
               dmep_experts=8, dmep_topk=2, dmep_targets="q_proj,k_proj,v_proj,o_proj,dense", dmep_counts=None)
RENORM = {"base": None, "on": True, "off": False}
ADAPTERS = (LoRALinear, ExpertLoRA, ParallelAdapter, ExpertAdapter, LoRAMoELinear)


class AdapterError(ValueError):
    pass


def fingerprint(cfg):
    """A short hash of a moe.Config's architecture (adapters record it to refuse another base); the storage
    dtype and the aux-loss coefficient are left out: they do not change what an adapter applies to."""
    arch = {k: v for k, v in asdict(cfg).items() if k not in ("torch_dtype", "router_aux_loss_coef")}
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- plan and attach

def plan(method, profile, k, seed=0, coverage_p=0.6, budget_kmin=1):
    """{layer: [expert ids]} of a planned method from a routing profile (router_profile.py): sieve's top-k,
    random's draw (seeded), coverage's share p, budget's greedy allocation. k: a count or a fraction of E."""
    if method == "sieve":
        return sieve.topk_plan(profile, k)
    if method == "random":
        return sieve.random_plan(profile, k, seed)
    if method == "coverage":
        return sieve.coverage_plan(profile, coverage_p)
    if method == "budget":
        return sieve.budget_plan(profile, k, budget_kmin)
    raise AdapterError(f"method {method!r} takes no expert plan (planned methods: {', '.join(PLANNED)})")


def attach(model, method, r, alpha, dropout=0.0, rslora=False, plan=None, **options):
    """Freeze the whole network, then add the adapters of `method`. `plan` {layer: [expert ids]} chooses the
    routed experts of the planned methods (methods.plan makes it); `lora` adapts every expert. `options`
    (see OPTIONS) set PERFT's and DMEP's shapes. Returns the adapter config."""
    if method not in METHODS:
        raise AdapterError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if r < 1:
        raise AdapterError(f"--rank must be at least 1, got {r}")
    if set(options) - set(OPTIONS):
        raise AdapterError(f"unknown adapter options {sorted(set(options) - set(OPTIONS))}")
    opts = {**OPTIONS, **options}
    if method == "perft-r" and not 1 <= opts["perft_topk"] <= opts["perft_experts"]:
        raise AdapterError(f"--perft-topk {opts['perft_topk']} must be between 1 and --perft-experts {opts['perft_experts']}")
    if method == "dmep" and not 1 <= opts["dmep_topk"] <= opts["dmep_experts"]:
        raise AdapterError(f"--dmep-topk {opts['dmep_topk']} must be between 1 and --dmep-experts {opts['dmep_experts']}")
    if opts["perft_init"] not in perft.INITS:
        raise AdapterError(f"--perft-init {opts['perft_init']!r} is not one of {', '.join(perft.INITS)}")
    cfg = model.config
    if opts["perft_weights"] == "file":
        opts["perft_weights"] = perft.file_weights(cfg.model_type)
    if opts["perft_weights"] not in perft.WEIGHTS:
        raise AdapterError(f"--perft-weights {opts['perft_weights']!r} is not one of own, base, file")
    if method == "perft-r" and opts["perft_weights"] == "base" and opts["perft_topk"] > cfg.num_experts_per_tok:
        raise AdapterError(f"--perft-weights base: --perft-topk {opts['perft_topk']} is more than the base router's "
                           f"top-K ({cfg.num_experts_per_tok}), whose weights it takes slot by slot")
        raise AdapterError(f"method {method!r} needs an expert plan (methods.plan)")
    if method == "lora":
        plan = {i: list(range(cfg.num_experts)) for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)}
    plan = {int(i): sorted(int(e) for e in ids) for i, ids in (plan or {}).items()}
    model.requires_grad_(False)  # freeze once, for the whole network
    scale = lora.lora_scale(r, alpha, rslora)
    for i, block in enumerate(model.model.layers):
        if method == "dmep":
            dmep.attach(block, cfg, opts, r, scale, dropout)
        elif method.startswith("perft"):  # beside (S/D/R) or inside (E) the MoE block; attention untouched
            if isinstance(block.mlp, moe.MoE):
                perft.attach(block.mlp, method, cfg, r, scale, dropout, opts)
        else:
            _attach_lora(block, method, plan.get(i), cfg, dict(r=r, alpha=alpha, dropout=dropout, rslora=rslora))
    if opts["dmep_counts"]:  # a pruned DMEP adapter being loaded: rebuild its smaller shapes
        dmep.rebuild_pruned(model, opts["dmep_counts"])
    model.train(model.training)  # the new modules (dropout) follow the model's train/eval mode
    return dict(format=1, method=method, r=r, alpha=alpha, dropout=dropout, rslora=rslora,
                plan={str(i): ids for i, ids in sorted(plan.items())} if method in EXPERT_METHODS else {},
                options={k: v for k, v in opts.items() if k.startswith(method.split("-")[0]) or k == "act"},
                base=dict(model_type=cfg.model_type, fingerprint=fingerprint(cfg)))


def _attach_lora(block, method, experts, cfg, kw):
    """The LoRA methods on one block: attention always; then (not attn) the router, the shared expert and the
    planned routed experts of an MoE layer, or a dense layer's MLP like any other linear."""
    def wrap(parent, name):
        setattr(parent, name, LoRALinear(getattr(parent, name), **kw))
    for name in ATTN:
        wrap(block.self_attn, name)
    if method == "attn":
        return
    mlp = block.mlp
    if not isinstance(mlp, moe.MoE):  # a dense layer (Qwen's mlp_only_layers)
        for name in ("gate_proj", "up_proj", "down_proj"):
            wrap(mlp, name)
        return
    wrap(mlp, "gate")  # the router linear
    if cfg.shared_expert_intermediate_size:
        for name in ("gate_proj", "up_proj", "down_proj"):
            wrap(mlp.shared_expert, name)
    if experts:
        mlp.experts.adapter = ExpertLoRA(mlp.experts, experts, **kw)


# ----------------------------------------------------------------------------- what trains

def adapter_modules(model):
    return [m for m in model.modules() if isinstance(m, ADAPTERS)]


def adapter_state(model):
    """{name: parameter} of every adapter tensor, under its name in the model: what trains."""
    own = {id(p) for m in adapter_modules(model) for n, p in m.named_parameters() if not n.startswith("base.")}
    return {n: p for n, p in model.named_parameters() if id(p) in own}


def count_trainable(model):
    return sum(p.numel() for p in adapter_state(model).values())


def current_config(model, config):
    """The adapter config as the model now is: DMEP records each module's expert count after pruning,
    so that loading rebuilds the pruned shapes."""
    if config["method"] != "dmep":
        return config
    return {**config, "options": {**config["options"], "dmep_counts": dmep.expert_counts(model)}}


def router_balance_loss(model, attention_mask=None, all_sum=None):
    """The balancing loss of the adapters' own routers, from the last forward's router logits: PERFT-R's pooled
    over all layers (perft.balance_loss, as its public code), DMEP's per module and averaged (dmep.balance_loss).
    all_sum as in moe.load_balancing_loss. None: no adapter router ran."""
    loss = perft.balance_loss(model, attention_mask, all_sum)
    return dmep.balance_loss(model, attention_mask, all_sum) if loss is None else loss


def forget_router_logits(model):
    """Drop the adapters' router logits of the last forward (PERFT-R's, DMEP's) once the balancing loss and DMEP's
    tracking have read them. Kept, they hold that forward's autograd graph, and under torchrun FSDP2's state with
    the process group in it, through a cycle that runs inside autograd's nodes, which the garbage collector cannot
    see: the group then outlives the run and its worker threads abort the process at exit (parallel.cleanup)."""
    for m in model.modules():
        if isinstance(m, (ParallelAdapter, LoRAMoELinear)):
            m.router_logits = None


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


# ----------------------------------------------------------------------------- adapter files

def save_adapter(model, out_dir, config):
    """adapter.safetensors, then adapter_config.json (written last: its presence means the pair is complete)."""
    config = current_config(model, config)
    os.makedirs(out_dir, exist_ok=True)
    save_adapter_tensors(model, os.path.join(out_dir, "adapter.safetensors"))
    atomic.write_json(os.path.join(out_dir, "adapter_config.json"), config)


def save_adapter_tensors(model, file, state=None):
    """The adapter's tensors (or `state`, e.g. every weight for full training) in fp32, atomically."""
    atomic.write_tensors(file, {n: p.float() for n, p in (state or adapter_state(model)).items()})


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
    number = lambda v, kinds: isinstance(v, kinds) and not isinstance(v, bool)
    for key, ok in (("method", isinstance(config.get("method"), str)), ("r", number(config.get("r"), int)),
                    ("alpha", number(config.get("alpha"), (int, float))),
                    ("options", isinstance(config.get("options", {}), dict)), ("base", isinstance(config.get("base", {}), dict)),
                    ("plan", isinstance(config.get("plan") or {}, dict))):
        if not ok:
            raise AdapterError(f"{f}: {key!r} is missing or has the wrong type ({config.get(key)!r})")
    return config


def attach_from_config(model, config):
    """The adapters a saved config describes (a run's checkpoint, an adapter directory), freshly initialised."""
    return attach(model, config["method"], config["r"], config["alpha"], config.get("dropout", 0.0),
                  config.get("rslora", False), plan=config.get("plan"), **config.get("options", {}))


def load_adapter(model, path):
    """Rebuild the adapter described by PATH/adapter_config.json on `model` and load its tensors strictly.
    Refuses an adapter made for another base model."""
    config = read_adapter_config(path)
    base, cfg = config.get("base", {}), model.config
    if base.get("model_type") != cfg.model_type or base.get("fingerprint") != fingerprint(cfg):
        raise AdapterError(f"{path}: adapter was made for a {base.get('model_type')} base with config fingerprint "
                           f"{base.get('fingerprint')}, but this model is {cfg.model_type} {fingerprint(cfg)}")
    try:
        attach_from_config(model, config)
    except (AdapterError, ValueError, TypeError) as e:  # the values came from the file, not from flags
        raise AdapterError(f"{os.path.join(path, 'adapter_config.json')}: {e}") from None
    load_adapter_tensors(model, os.path.join(path, "adapter.safetensors"))
    return config


def load_adapter_tensors(model, file, state=None):
    """Copy the file's tensors into the adapter (or into `state`): every name present, none extra, shapes equal,
    values finite; an AdapterError naming the file and tensor otherwise."""
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
