"""Hub checkpoints in: everything that reads files of weights, so that moe.py holds none.

`read_config` (config.json), `load_model` (config.json + *.safetensors, strict, through the one explicit name
map `checkpoint_names`; FSDP2 shards filled row by row), `pick_device` / `pick_dtype` (the scripts' --device and
--dtype) and `build_empty` (a model built on the meta device, then given storage). Writing checkpoints and
exports is export.py's.
"""
import json
import os

import torch
from safetensors import safe_open

import moe
import quant


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
    qc = c.get("quantization_config") if isinstance(c, dict) else None
    if qc is not None:  # GPTQ, AWQ, bitsandbytes, fp8, MXFP4: its tensors are not the weights this code reads
        method = qc.get("quant_method", "unnamed") if isinstance(qc, dict) else "unnamed"
        raise moe.ConfigError(f"{where}: the checkpoint is already quantized (quantization_config, quant_method "
                              f"{method!r}); give the original weights (--quantize quantizes them while loading)")
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


DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_flags(ap, model="required", dtype=True):
    """--model, --device and --dtype, defined once for every script (the same choices and defaults; pick_device
    and pick_dtype read them). model: "required", "optional" (the script checks it later), a default directory,
    or None (no --model: bench.py builds its models from configs)."""
    if model is not None:
        ap.add_argument("--model", required=model == "required", default=None if model in ("required", "optional") else model,
                        help="model directory (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    if dtype:
        ap.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="frozen base dtype (auto: bfloat16 on CUDA, float32 on the CPU); adapters stay fp32")
        add_quant_flags(ap)


def add_quant_flags(ap):
    """--quantize, --double-quant, --quantize-set (quantize_args reads them)."""
    ap.add_argument("--quantize", default="none", choices=quant.KINDS,
                    help="store the frozen base in 4-bit NF4 (QLoRA) or int8, dequantized to --dtype per product (quant.py)")
    ap.add_argument("--double-quant", action="store_true", help="with --quantize nf4: the block scales in 8 bits too")
    ap.add_argument("--quantize-set", default=",".join(quant.DEFAULT_SET),
                    help=f"which weights --quantize stores quantized, of {','.join(quant.SETS)} (router, norms, "
                         "embeddings and lm_head never)")


def quantize_args(args):
    """(kind, double_quant, groups) of the scripts' --quantize flags (None where the script has none)."""
    kind = getattr(args, "quantize", "none")
    if kind in (None, "none"):
        if getattr(args, "double_quant", False):
            raise ValueError("--double-quant: only with --quantize nf4")
        return None
    if args.double_quant and kind != "nf4":
        raise ValueError(f"--double-quant: only with --quantize nf4, not {kind}")
    return kind, args.double_quant, quant.parse_set(args.quantize_set)


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
    if name not in DTYPES:
        raise ValueError(f"--dtype {name}: not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def build_empty(cfg, dtype, device, shard=None, free_bytes=None, where="the model", quantize=None):
    """A Transformer of `cfg` built on the meta device (no memory, no init), `shard(model)` applied there
    (parallel.py: FSDP2), then given uninitialised storage on `device`: fill it before use. Its RoPE
    frequencies, the one tensor not read from a checkpoint, are computed. On CUDA (or with `free_bytes`
    given) a model whose weights cannot fit the free memory is refused before anything is allocated."""
    device = torch.device(device)
    with torch.device("meta"):
        model = moe.Transformer(cfg).to(dtype)
    if quantize is not None:  # quantize = (kind, double_quant, groups): the weights' places, stored quantized
        if shard is not None:
            raise CheckpointError(f"{where}: --quantize with torchrun sharding is not supported; use one GPU")
        quant.quantize(model, quantize[0], dtype, quantize[1], quantize[2], fill=False)
    if shard is not None:
        shard(model)
    if device.type == "cuda" or free_bytes is not None:
        local = lambda p: p.to_local() if type(p).__name__ == "DTensor" else p  # FSDP2: this rank's rows
        need = sum(local(p).numel() * p.element_size() for p in [*model.parameters(), *stored_buffers(model)])
        free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
        if need > free:
            raise CheckpointError(f"{where}: its weights need {need / 2**30:.2f} GiB in {str(dtype).removeprefix('torch.')} "
                                  f"on {device}, which has {free / 2**30:.2f} GiB free; shard it with torchrun over "
                                  "more cards (train.py), or pick a smaller --dtype")
    model.to_empty(device=device)
    model.inv_freq = moe.rope_inv_freq(cfg).to(device)
    return model


def stored_buffers(model):  # a quantized base's codes and scales: weights, though buffers
    return [b for m in model.modules() if isinstance(m, quant.QuantWeight) for b in m.buffers()]


def load_model(path, dtype=None, device=None, shard=None, free_bytes=None, quantize=None):
    """Build on the meta device, then fill tensor by tensor from the safetensors straight onto `device`
    (host memory peaks at about one tensor). Strict: every tensor present, none left over, shapes checked.
    dtype None: the dtype of the embedding tensor in the file. `shard(model)` runs on the meta model
    before it is materialised (parallel.py: FSDP2); each rank then copies only the rows it holds. Refused
    early: weights that cannot fit the device (free_bytes: the free memory, for tests; CUDA: measured) and
    tensors with non-finite values (named). quantize (kind, double_quant, groups; hub.quantize_args): the
    weights of those groups are quantized as each tensor is read (one tensor in full precision at a time;
    the bf16 model is never whole, on the host or the device)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: model directory not found")
    cfg = read_config(path)
    files = checkpoint_files(path)
    device = torch.device(device or "cpu")  # the scripts' --device is checked by pick_device first
    names = checkpoint_names(cfg)
    if dtype is None:
        dtype = _read_dtype(files, "model.embed_tokens.weight")
    model = build_empty(cfg, dtype, device, shard, free_bytes, where=path, quantize=quantize)
    held = {n: w for n, w in model.named_modules() if isinstance(w, quant.QuantWeight)}
    params = {**dict(model.named_parameters()), **held}
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
                    if pname in held:
                        held[pname].fill(t, index)
                    else:
                        fill_rows(params[pname], t, index)
                    seen.add(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' own errors: truncated file, bad header
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
    missing = sorted(set(names) - seen)
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for w in held.values():
        w.finish()
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
