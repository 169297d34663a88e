"""Hub checkpoints in and out: everything that touches files of weights, so that moe.py holds none.

- Reading: `read_config` (config.json), `load_model` (config.json + *.safetensors, strict, through the one
  explicit name map `checkpoint_names`; FSDP2 shards filled row by row), `pick_device` / `pick_dtype` (the
  scripts' --device and --dtype) and `build_empty` (a model built on the meta device, then given storage).
- Writing: `export_merged` (base + adapter folded into a complete checkpoint directory under the hub's
  tensor names, loadable by transformers), `write_checkpoint`, and `export_peft` (the adapter alone in
  PEFT's on-disk layout). Only plain LoRA methods export: input-dependent adapters (PERFT, DMEP) cannot
  become plain weights.
"""
import json
import math
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lora
import moe


class CheckpointError(ValueError):
    pass


# ----------------------------------------------------------------------------- reading

def read_config(src):
    """moe.Config from a config.json file or the directory holding it."""
    where = os.path.join(src, "config.json") if os.path.isdir(src) else str(src)
    if not os.path.isfile(where):
        raise moe.ConfigError(f"{where}: config.json not found")
    try:
        with open(where) as f:
            c = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise moe.ConfigError(f"{where}: not valid JSON ({e})") from None
    return moe.Config.from_json(c, where)


def checkpoint_names(cfg):
    """The one explicit map: on-disk tensor name -> (our parameter name, index into it or None)."""
    names = {"model.embed_tokens.weight": ("model.embed_tokens.weight", None), "model.norm.weight": ("model.norm.weight", None)}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = ("lm_head.weight", None)
    I = cfg.moe_intermediate_size
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        own = [f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            own.append(f"{p}self_attn.{proj}.weight")
            if cfg.attention_bias or (cfg.qkv_bias and proj != "o_proj"):
                own.append(f"{p}self_attn.{proj}.bias")
        if cfg.qk_norm:
            own += [f"{p}self_attn.q_norm.weight", f"{p}self_attn.k_norm.weight"]
        if not cfg.is_moe_layer(i):
            own += [f"{p}mlp.{w}_proj.weight" for w in ("gate", "up", "down")]
        elif cfg.model_type == "mixtral":  # block_sparse_moe.experts.E.w1 (gate), w3 (up), w2 (down)
            names[f"{p}block_sparse_moe.gate.weight"] = (f"{p}mlp.gate.weight", None)
            for e in range(cfg.num_experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                names[q + "w1.weight"] = (f"{p}mlp.experts.gate_up_proj", (e, slice(0, I)))
                names[q + "w3.weight"] = (f"{p}mlp.experts.gate_up_proj", (e, slice(I, 2 * I)))
                names[q + "w2.weight"] = (f"{p}mlp.experts.down_proj", (e,))
        else:
            own.append(f"{p}mlp.gate.weight")
            for e in range(cfg.num_experts):
                q = f"{p}mlp.experts.{e}."
                names[q + "gate_proj.weight"] = (f"{p}mlp.experts.gate_up_proj", (e, slice(0, I)))
                names[q + "up_proj.weight"] = (f"{p}mlp.experts.gate_up_proj", (e, slice(I, 2 * I)))
                names[q + "down_proj.weight"] = (f"{p}mlp.experts.down_proj", (e,))
            if cfg.shared_expert_intermediate_size:
                own += [f"{p}mlp.shared_expert.{w}_proj.weight" for w in ("gate", "up", "down")]
                own.append(f"{p}mlp.shared_expert_gate.weight")
        names.update({n: (n, None) for n in own})
    return names


def checkpoint_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    else:
        files = [os.path.join(path, "model.safetensors")]
    for f in files:
        if not os.path.isfile(f):
            raise CheckpointError(f"{f}: checkpoint file not found")
    return files


def pick_device(name=None):
    """The device a script's --device names (None: cuda if available, else cpu); a clear error for a name
    torch does not know or a CUDA device on a machine without one."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available")
    return device


def pick_dtype(name, device):
    """The dtype a script's --dtype names; "auto" (or None): bfloat16 on CUDA, float32 elsewhere."""
    if name in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {name}: not one of auto, float32, bfloat16, float16")
    return getattr(torch, name)


def build_empty(cfg, dtype, device, shard=None, free_bytes=None, where="the model"):
    """A Transformer of `cfg` built on the meta device (no memory, no init), `shard(model)` applied there
    (parallel.py: FSDP2), then given uninitialised storage on `device`: fill it before use. Its RoPE
    frequencies, the one tensor not read from a checkpoint, are computed. On CUDA (or with `free_bytes`
    given) a model whose weights cannot fit the free memory is refused before anything is allocated."""
    device = torch.device(device)
    with torch.device("meta"):
        model = moe.Transformer(cfg).to(dtype)
    if shard is not None:
        shard(model)
    if device.type == "cuda" or free_bytes is not None:
        local = lambda p: p.to_local() if type(p).__name__ == "DTensor" else p  # FSDP2: this rank's rows
        need = sum(local(p).numel() * p.element_size() for p in model.parameters())
        free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
        if need > free:
            raise CheckpointError(f"{where}: its weights need {need / 2**30:.2f} GiB in {str(dtype).removeprefix('torch.')} "
                                  f"on {device}, which has {free / 2**30:.2f} GiB free; shard it with torchrun over "
                                  "more cards (train.py), or pick a smaller --dtype")
    model.to_empty(device=device)
    model.inv_freq = moe.rope_inv_freq(cfg).to(device)
    return model


def load_model(path, dtype=None, device=None, shard=None, free_bytes=None):
    """Build on the meta device, then fill tensor by tensor from the safetensors straight onto `device`
    (host memory peaks at about one tensor). Strict: every tensor present, none left over, shapes checked.
    dtype None: the dtype of the embedding tensor in the file. `shard(model)` runs on the meta model
    before it is materialised (parallel.py: FSDP2); each rank then copies only the rows it holds. Refused
    early: weights that cannot fit the device (free_bytes: the free memory, for tests; CUDA: measured) and
    tensors with non-finite values (named)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: model directory not found")
    cfg = read_config(path)
    files = checkpoint_files(path)
    device = torch.device(device or "cpu")  # the scripts' --device is checked by pick_device first
    names = checkpoint_names(cfg)
    if dtype is None:
        dtype = _read_dtype(files, "model.embed_tokens.weight")
    model = build_empty(cfg, dtype, device, shard, free_bytes, where=path)
    params = dict(model.named_parameters())
    seen = set()
    for f in files:
        try:
            with safe_open(f, framework="pt", device="cpu") as sf:
                for name in sf.keys():
                    if name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight"):
                        continue  # derived or tied: transformers ignores these too
                    if name not in names:
                        raise CheckpointError(f"{f}: unexpected tensor {name!r} for a {cfg.model_type} model")
                    pname, index = names[name]
                    want = params[pname].shape if index is None else torch.empty(params[pname].shape, device="meta")[index].shape
                    t = sf.get_tensor(name)
                    if t.shape != want:
                        raise CheckpointError(f"{f}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(want)}")
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        raise CheckpointError(f"{f}: tensor {name!r} has non-finite values (inf or NaN)")
                    fill_rows(params[pname], t, index)
                    seen.add(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' own errors: truncated file, bad header
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
    missing = sorted(set(names) - seen)
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return model.eval()


@torch.no_grad()
def fill_rows(param, t, index=None):
    """param[index] = t, where param may be an FSDP2 shard (a DTensor split along dim 0): then only the
    rows this rank holds are written (torch.chunk's split: ceil(n / world) rows per rank)."""
    local, lo = param, 0
    if type(param).__name__ == "DTensor":
        local, world, rank = param.to_local(), param.device_mesh.size(), param.device_mesh.get_local_rank()
        lo = min(rank * -(-param.shape[0] // world), param.shape[0])
    hi = lo + local.shape[0]
    if index is None:
        local.copy_(t[lo:hi])
    elif lo <= index[0] < hi:  # one expert's slice of a stacked tensor
        local[(index[0] - lo, *index[1:])].copy_(t)


def _read_dtype(files, name):
    for f in files:
        try:
            with safe_open(f, framework="pt", device="cpu") as sf:
                if name in sf.keys():
                    return _ST_DTYPES[sf.get_slice(name).get_dtype()]
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
    raise CheckpointError(f"{os.path.dirname(files[0])}: missing tensor {name!r}")


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


# ----------------------------------------------------------------------------- writing

def _base_param(params, name):  # "…q_proj.weight" lives at "…q_proj.base.weight" once wrapped
    if name in params:
        return params[name]
    head, leaf = name.rsplit(".", 1)
    return params[f"{head}.base.{leaf}"]


def _write_dir(out_dir, fill):
    """Build a directory under a temporary name, then swap it in: no half-written output."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OSError(f"{out_dir}: exists and is not a directory")
    tmp = f"{out_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        fill(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_views(model):
    """{hub tensor name: that tensor as it lies in the model}: views of the parameters on their device, no
    copy (one process: FSDP2 shards hold only their rows; see model_tensors). write_checkpoint copies them
    to the host a shard at a time."""
    params = dict(model.named_parameters())
    return {disk: (_base_param(params, name) if index is None else _base_param(params, name)[index]).detach()
            for disk, (name, index) in checkpoint_names(model.config).items()}


def model_tensors(model):
    """{hub tensor name: CPU copy} of the (base) weights, under the names load_model reads: the whole model
    in host memory at once. FSDP2 shards are gathered whole first (every rank must call this). One process
    needs none of it: checkpoint_views + write_checkpoint hold one shard at a time."""
    params = {n: p.full_tensor() if type(p).__name__ == "DTensor" else p for n, p in model.named_parameters()}
    return {disk: (_base_param(params, name) if index is None else _base_param(params, name)[index]).detach().to("cpu", copy=True).contiguous()
            for disk, (name, index) in checkpoint_names(model.config).items()}


def write_checkpoint(tensors, out_dir, config, src_dir, shard_bytes=4 << 30):
    """A hub-style checkpoint directory: sharded safetensors + index, config.json (its dtype set to the
    tensors'), and the tokenizer files of src_dir. Written under a temporary name, then swapped in.
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
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src_dir, name)):
                shutil.copy(os.path.join(src_dir, name), tmp)

    _write_dir(out_dir, fill)


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
    lora.merge(model)
    try:
        write_checkpoint(checkpoint_views(model), out_dir, config, src_dir, shard_bytes)
    finally:
        lora.merge(model, -1)


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def export_peft(model, adapter_config, out_dir):
    """The adapter in PEFT's layout for transformers 5 (peft 0.21), where experts are fused 3D parameters.

    Attention LoRA goes under `target_modules` as usual. The router, shared experts, dense MLPs and routed
    experts go under `target_parameters` (PEFT's ParamWrapper): for a 3D expert tensor (E, out, in) PEFT
    keeps one LoRA per expert packed as lora_A (E*R, in), row e*R + j, and lora_B (out, R*E), column j*E + e.
    gate and up share the fused gate_up_proj, so they export as one rank-2r LoRA per expert (A stacked, B
    block-diagonal, alpha doubled to keep alpha/r). Experts without an adapter get zeros: exactly no change.
    Per-expert hub names (experts.3.gate_proj.lora_A) are not used: peft 0.21 loads those only when every
    expert of every layer has an adapter, and then mis-scales rsLoRA (see README)."""
    if adapter_config["method"] not in lora.LORA_METHODS:
        raise lora.AdapterError(f"--export-peft: method {adapter_config['method']!r} has input-dependent adapters "
                                "(routers of its own) that PEFT's LoRA cannot express")
    cfg, r, alpha, rs = model.config, adapter_config["r"], adapter_config["alpha"], adapter_config["rslora"]
    E, P, sd = cfg.num_experts, "base_model.model.model.layers.", {}
    targets = set()
    for i, block in enumerate(model.model.layers):
        for name in lora.ATTN:
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
                  bias="none", fan_in_fan_out=False, inference_mode=True, target_modules=list(lora.ATTN),
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

    _write_dir(out_dir, fill)
