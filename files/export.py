"""Checkpoints out: a trained model, or base + adapter merged, as a hub checkpoint; the adapter in PEFT's layout.

- `export_merged`: base + adapter folded into a complete checkpoint directory under the hub's tensor names
  (hub.checkpoint_names, the same map loading reads), loadable by transformers; `write_checkpoint` writes one
  (a shard at a time, from `checkpoint_views` of the model's own tensors, or `model_tensors` gathered whole).
- `export_peft`: the adapter alone in PEFT's on-disk layout.
Only the plain LoRA methods export: input-dependent adapters (PERFT, DMEP) cannot become plain weights.
Directories are built under a temporary name and swapped in (files/atomic.py): no half-written output.
"""
import json
import math
import os

import torch
from safetensors.torch import save_file

import lora
import methods
from files import atomic, hub, tokenizer_files


def _base_param(params, name):  # "…q_proj.weight" lives at "…q_proj.base.weight" once wrapped
    if name in params:
        return params[name]
    head, leaf = name.rsplit(".", 1)
    return params[f"{head}.base.{leaf}"]


def checkpoint_views(model):
    """{hub tensor name: that tensor as it lies in the model}: views of the parameters on their device, no
    copy (one process: FSDP2 shards hold only their rows; see model_tensors). write_checkpoint copies them
    to the host a shard at a time."""
    params = dict(model.named_parameters())
    return {disk: (_base_param(params, name) if index is None else _base_param(params, name)[index]).detach()
            for disk, (name, index) in hub.checkpoint_names(model.config).items()}


def model_tensors(model):
    """{hub tensor name: CPU copy} of the (base) weights, under the names load_model reads: the whole model
    in host memory at once. FSDP2 shards are gathered whole first (every rank must call this). One process
    needs none of it: checkpoint_views + write_checkpoint hold one shard at a time."""
    params = {n: p.full_tensor() if type(p).__name__ == "DTensor" else p for n, p in model.named_parameters()}
    return {disk: (_base_param(params, name) if index is None else _base_param(params, name)[index]).detach().to("cpu", copy=True).contiguous()
            for disk, (name, index) in hub.checkpoint_names(model.config).items()}


def write_checkpoint(tensors, out_dir, config, src_dir, shard_bytes=4 << 30):
    """A hub-style checkpoint directory: sharded safetensors + index, config.json (its dtype set to the
    tensors'), and the tokenizer files of src_dir (tokenizer_files.write). Written under a temporary name, then
    swapped in.
    `tensors` may lie on any device: each shard is copied to the host just before it is written and let
    go after, so host memory holds one shard (at most shard_bytes, or one larger tensor) at a time."""
    def fill(tmp):
        shards = shard_names(tensors, shard_bytes)
        weight_map = {}
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            shard = {n: tensors[n].detach().to("cpu", copy=True).contiguous() for n in names}
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            del shard  # before the next shard is made
            weight_map.update({n: fname for n in names})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        written = {**config, **({k: dtype for k in ("torch_dtype", "dtype") if k in config} or {"torch_dtype": dtype})}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(written, f, indent=1)
        tokenizer_files.write(src_dir, tmp)  # as they are; a tokenizer.json converted from a lone tokenizer.model

    atomic.write_dir(out_dir, fill)


def shard_names(tensors, shard_bytes):
    """The tensor names of each shard write_checkpoint writes: in order, a new shard when the next tensor would
    take this one past shard_bytes (a larger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def export_merged(model, src_dir, out_dir, shard_bytes=4 << 30):
    """A complete checkpoint of base + adapter under the hub's tensor names (sharded, with an index),
    config.json and tokenizer files copied, loadable by transformers. Merges in place, writes the merged
    weights a shard at a time (host memory: one shard, not the model), unmerges."""
    with open(os.path.join(src_dir, "config.json")) as f:
        config = json.load(f)
    methods.merge(model)
    try:
        write_checkpoint(checkpoint_views(model), out_dir, config, src_dir, shard_bytes)
    finally:
        methods.merge(model, -1)


def export_peft(model, adapter_config, out_dir):
    """The adapter in PEFT's layout for transformers 5 (peft 0.21), where experts are fused 3D parameters.

    Attention LoRA goes under `target_modules` as usual. The router, shared experts, dense MLPs and routed
    experts go under `target_parameters` (PEFT's ParamWrapper): for a 3D expert tensor (E, out, in) PEFT
    keeps one LoRA per expert packed as lora_A (E*R, in), row e*R + j, and lora_B (out, R*E), column j*E + e.
    gate and up share the fused gate_up_proj, so they export as one rank-2r LoRA per expert (A stacked, B
    block-diagonal, alpha doubled to keep alpha/r). Experts without an adapter get zeros: exactly no change.
    Per-expert hub names (experts.3.gate_proj.lora_A) are not used: peft 0.21 loads those only when every
    expert of every layer has an adapter, and then mis-scales rsLoRA (see README)."""
    if adapter_config["method"] not in methods.LORA_METHODS:
        raise methods.AdapterError(f"--export-peft: method {adapter_config['method']!r} has input-dependent adapters "
                                "(routers of its own) that PEFT's LoRA cannot express")
    cfg, r, alpha, rs = model.config, adapter_config["r"], adapter_config["alpha"], adapter_config["rslora"]
    E, P, sd = cfg.num_experts, "base_model.model.model.layers.", {}
    targets = set()
    for i, block in enumerate(model.model.layers):
        for name in methods.ATTN:
            m = getattr(block.self_attn, name)
            sd[f"{P}{i}.self_attn.{name}.lora_A.weight"], sd[f"{P}{i}.self_attn.{name}.lora_B.weight"] = m.lora_A, m.lora_B
        mlp = block.mlp
        linears = {"mlp.gate": getattr(mlp, "gate", None)}  # the router
        for name in ("gate_proj", "up_proj", "down_proj"):
            linears[f"mlp.shared_expert.{name}"] = getattr(getattr(mlp, "shared_expert", None), name, None)
            linears[f"mlp.{name}"] = getattr(mlp, name, None)  # a dense layer
        for key, m in linears.items():
            if isinstance(m, lora.LoRALinear):
                sd[f"{P}{i}.{key}.lora_A.weight"], sd[f"{P}{i}.{key}.lora_B.weight"] = m.lora_A, m.lora_B
                targets.add(key.removeprefix("mlp.") + ".weight" if "shared" in key else key + ".weight")
        ad = getattr(getattr(mlp, "experts", None), "adapter", None)
        if isinstance(ad, lora.ExpertLoRA):
            targets |= {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
            D, I = ad.gate_A.shape[-1], ad.gate_B.shape[1]
            A_gu, B_gu = torch.zeros(E, 2 * r, D), torch.zeros(2 * I, 2 * r, E)
            A_dn, B_dn = torch.zeros(E, r, I), torch.zeros(D, r, E)
            for j, e in enumerate(ad.ids):
                A_gu[e] = torch.cat([ad.gate_A[j], ad.up_A[j]]).detach()
                B_gu[:, :, e] = torch.block_diag(ad.gate_B[j], ad.up_B[j]).detach()
                A_dn[e], B_dn[:, :, e] = ad.down_A[j].detach(), ad.down_B[j].detach()
            sd[f"{P}{i}.mlp.experts.base_layer.lora_A.weight"] = A_gu.reshape(E * 2 * r, D)  # gate_up: inner wrapper
            sd[f"{P}{i}.mlp.experts.base_layer.lora_B.weight"] = B_gu.reshape(2 * I, 2 * r * E)
            sd[f"{P}{i}.mlp.experts.lora_A.weight"] = A_dn.reshape(E * r, I)  # down_proj: outer wrapper
            sd[f"{P}{i}.mlp.experts.lora_B.weight"] = B_dn.reshape(D, r * E)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=alpha, use_rslora=rs, lora_dropout=0.0,
                  bias="none", fan_in_fan_out=False, inference_mode=True, target_modules=list(methods.ATTN),
                  target_parameters=sorted(targets))
    if "mlp.experts.gate_up_proj" in targets:  # the fused rank-2r gate+up LoRA keeps the per-expert scale
        # (peft 0.21 warns that this pattern "did not match any targeted module": it checks module names only,
        # and does apply the pattern to the targeted parameter)
        config.update(rank_pattern={r".*\.gate_up_proj": 2 * r},
                      alpha_pattern={r".*\.gate_up_proj": alpha * (math.sqrt(2) if rs else 2)})

    def fill(tmp):
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=1)

    atomic.write_dir(out_dir, fill)
