"""Golden tensors from the plain reference path, and where another implementation first departs from them.

    python -m tools.verify dump --model DIR [--adapter RUN] (--data FILE | --ids "1 2 3" | --random-ids N) --out golden.safetensors
    python -m tools.verify names [--model DIR] [--json]      # every tensor name: shape, dtype, layout, meaning
    python -m tools.verify compare golden.safetensors theirs.safetensors [--model DIR] [--dtype bfloat16]
    python -m tools.verify hf --model DIR [--dtype bfloat16]  # the same tensors from transformers, compared

`dump` runs moe.py's plain path (the loop over experts) on a few sequences cut to one length (no position is
padding) and writes the forward pass's intermediate tensors to one safetensors file, with a JSON header
("verify") naming the model, the adapter and every tensor in forward order (verify_schema.py: the names).
Record yours under the same names (any subset; tools/capture.py does it from inside your process) and run
`compare`: it loads the model, recomputes each of your tensors from the ones you recorded before it, and names
the first tensor, layer and token that rounding in your run's dtype cannot explain (verify_compare.py: the
bound). Exit status: 0 no divergence (or written), 1 a divergence (named), 2 a file or flag it cannot use.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from files import data
from files import hub
import methods
import moe
from tools import verify_compare
from tools import verify_schema as schema
from tools.verify_forced import expert_rows
from files import atomic
from files import tokenizer

FORMAT = "moe-lora verify 1"  # a golden file's header
THEIRS = "moe-lora verify theirs 1"  # a file written by tools/capture.py (it spells the same string)


# ----------------------------------------------------------------------------- collecting

def collect(model, cfg, ids, grad=False):
    """{name: tensor} of one forward pass in the order it makes them (with grad, then d loss / d each adapter
    tensor). Forward hooks on the modules WHAT names record their outputs: moe.py's Transformer and transformers'
    models use the same names. q and k after RoPE, which no hook sees, are what the model's RoPE function returns,
    wrapped for the pass: moe.apply_rope (for q, then for k) or transformers' apply_rotary_pos_emb (both at once)."""
    B, T = ids.shape
    rec, qk = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, []
    keep = lambda t: t.detach().to("cpu", copy=True)  # a copy: transformers clamps v in place

    def hook(mod, args, out, name):  # o_proj: its input; others: the output (ours (y, routing), HF (y, weights))
        if name.endswith(".experts"):  # first the routing, read from the experts' input, and each expert's rows
            (h, idx, w), mlp = args, name[:-len("experts")]  # (N, D), (N, K), (N, K)
            rec[mlp + "topk_ids"], rec[mlp + "topk_weights"] = keep(idx).reshape(B, T, -1), keep(w).reshape(B, T, -1)
            with torch.no_grad():
                rec.update({f"{name}.{e}": keep(y) for e, y in expert_rows(mod, h, idx).items()})
        t = args[0] if name.endswith("o_proj") else out[0] if isinstance(out, tuple) else out
        rec[name + ".input" * name.endswith("o_proj")] = keep(t).reshape(B, T, -1)

    def rope(*args, **kwargs):  # q and k (B, H|G, T, S) of layer i are the (2i)-th and (2i+1)-th rotated
        out = plain(*args, **kwargs)
        qk.extend(out if isinstance(out, tuple) else [out])
        if len(qk) % 2 == 0:  # layer i's q and k: then v after clip_qkv, as the attention uses them
            p, clip = f"model.layers.{len(qk) // 2 - 1}.self_attn.", cfg.clip_qkv
            rec[p + "q"], rec[p + "k"] = (keep(t).transpose(1, 2) for t in qk[-2:])  # (B, T, H|G, S)
            v = rec[p + "v_proj"].reshape(B, T, -1, cfg.head_dim)
            rec[p + "v"] = v if clip is None else v.clamp(-clip, clip)
        return out

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in model.named_modules()
               if schema.entry(n) or schema.entry(n + ".input")]
    modeling = sys.modules[type(model).__module__]
    rope_fn = "apply_rope" if modeling is moe else "apply_rotary_pos_emb"
    plain = getattr(modeling, rope_fn)
    setattr(modeling, rope_fn, rope)
    try:
        with torch.set_grad_enabled(grad):
            out = model(ids)
            logits = out if isinstance(out, torch.Tensor) else out.logits  # (B, T, V)
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    finally:
        setattr(modeling, rope_fn, plain)
        for h in handles:
            h.remove()
    rec["lm_head"], rec["loss"] = keep(logits), keep(loss)  # lm_head: also when tied to the embeddings (no module)
    if grad:
        loss.backward()
        rec.update({f"grad.{n}": keep(p.grad) for n, p in methods.adapter_state(model).items() if p.grad is not None})
    return {n: t.cpu() for n, t in rec.items()}


# ----------------------------------------------------------------------------- files

def make_header(tensors, cfg, **about):
    """The golden file's description: the model, how the tensors were made, and every tensor in forward order."""
    entries = [dict(name=n, shape=list(t.shape), dtype=str(t.dtype)[6:], **schema.describe(n, cfg.num_hidden_layers))
               for n, t in tensors.items()]
    return dict(format=FORMAT, model_type=cfg.model_type, fingerprint=methods.fingerprint(cfg),
                num_hidden_layers=cfg.num_hidden_layers, **about, tensors=entries)


def write_golden(path, tensors, header):
    """One safetensors file; its metadata's "verify" entry is the header (JSON). Written atomically."""
    tensors = {n: t.contiguous().clone() for n, t in tensors.items()}  # v may be a view of v_proj: one copy each
    atomic.write(path, lambda tmp: save_file(tensors, tmp, metadata={"verify": json.dumps(header)}))


def read_tensors(path, need_header=False):
    """({name: tensor}, header or None); a clear error naming the file when it is not what it should be. The
    header is a golden file's (need_header) or the one tools/capture.py writes (their run's dtypes)."""
    if not os.path.isfile(path):
        raise OSError(f"{path}: file not found")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {n: f.get_tensor(n) for n in f.keys()}
    except Exception as e:  # safetensors' own errors: not a safetensors file, truncated
        raise ValueError(f"{path}: cannot read as safetensors ({e})") from None
    try:
        header = json.loads(meta["verify"]) if "verify" in meta else None
        assert header is None or header["format"] == FORMAT and {"name", "layer", "depth"} <= set(header["tensors"][0]) \
            or header["format"] == THEIRS and all(hasattr(torch, d) for d in header["run"].values())
    except (ValueError, KeyError, TypeError, IndexError, AssertionError, AttributeError):
        raise ValueError(f"{path}: its 'verify' header is not one this verify.py reads ({FORMAT!r}, {THEIRS!r})") from None
    if need_header and (header is None or header["format"] != FORMAT):
        raise ValueError(f"{path}: not a golden file (no golden 'verify' header; make one with `verify.py dump`)")
    if need_header and "input_ids" not in tensors:
        raise ValueError(f"{path}: a golden file without input_ids")
    return tensors, header


def run_dtype(theirs, their_header, flag):
    """(compute dtype, params dtype, how it was found): --dtype, else the capture header's, else the coarsest
    floating dtype among their tensors (the loss and gradients are fp32 also in a bf16 run)."""
    if flag:
        return getattr(torch, flag), getattr(torch, flag), f"{flag} (--dtype)"
    if their_header is not None and their_header.get("format") == THEIRS:
        run = their_header["run"]
        return getattr(torch, run["compute"]), getattr(torch, run.get("params", run["compute"])), \
            f"{run['compute']} (weights {run.get('params', run['compute'])}; declared in its header)"
    floats = [t for n, t in theirs.items() if t.is_floating_point() and n != "loss" and not n.startswith("grad.")]
    dtype = max((t.dtype for t in floats), key=lambda d: torch.finfo(d).eps, default=torch.float32)
    if dtype == torch.float32 and floats and all(torch.equal(t, t.bfloat16().float()) for t in floats):
        dtype = torch.bfloat16  # fp32 tensors holding bf16 values only: a bf16 run, saved upcast
    return dtype, dtype, f"{str(dtype)[6:]} (guessed from its tensors; declare it: capture.Capture(dtype=...) or --dtype)"


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.verify", description=__doc__.split("\n")[0], epilog=
                                 verify_compare.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    dump = sub.add_parser("dump", help="run the reference path and write golden tensors")
    hf = sub.add_parser("hf", help="compare transformers' eager forward with ours, tensor by tensor")
    for p in (dump, hf):
        p.add_argument("--model", required=True, help="model directory (config.json, *.safetensors)")
        src = p.add_mutually_exclusive_group(required=p is dump)  # hf without any: --random-ids 2
        src.add_argument("--data", help=".jsonl records, tokenised with the model's tokenizer")
        src.add_argument("--ids", help='token ids, "1 2 3"; several sequences of one length: "1 2, 3 4"')
        src.add_argument("--random-ids", type=int, metavar="N", help="N sequences of --seq-len fixed random ids")
        p.add_argument("--samples", type=int, default=2, help="--data: the first N records")
        p.add_argument("--seq-len", type=int, default=16, help="at most this many tokens per sequence")
        p.add_argument("--device", default="cpu", help="cpu or cuda")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the run")
    dump.add_argument("--adapter", help="adapter directory written by train.py, applied on top")
    dump.add_argument("--grad", action="store_true", help="also d loss / d each adapter tensor (needs --adapter)")
    dump.add_argument("--out", required=True, help="the golden .safetensors file to write")
    cmp = sub.add_parser("compare", help="compare a file of tensors with a golden file, in forward order")
    cmp.add_argument("golden", help="golden file from `verify.py dump`")
    cmp.add_argument("theirs", help="safetensors file with (some of) the same names, from your implementation")
    cmp.add_argument("--model", help="the model directory (default: the one the golden file names)")
    cmp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                     help="the dtype your run computed in (default: your file's capture header, else its tensors')")
    cmp.add_argument("--device", default="cpu", help="where the reference recomputes each tensor: cpu or cuda")
    names = sub.add_parser("names", help="every tensor name verify knows: shape, dtype, layout, meaning")
    names.add_argument("--model", help="list this model's names (every layer, its sizes)")
    names.add_argument("--json", action="store_true", help="as JSON")
    args = ap.parse_args(argv)
    if args.cmd in ("dump", "hf") and (args.samples < 1 or args.seq_len < 2 or (args.random_ids or 1) < 1):
        ap.error("--samples and --random-ids must be at least 1 and --seq-len at least 2")
    if args.cmd == "dump" and args.grad and args.adapter is None:
        ap.error("--grad needs --adapter (the gradients recorded are the adapter tensors')")
    return args


def input_ids(args, cfg):
    """(B, T) ids from --ids or --data (cut to the shortest sequence: no padding), else fixed random ids."""
    if args.ids is None and args.data is None:  # the same on every run: --random-ids N (hf: 2 by default)
        seed = torch.Generator().manual_seed(0)
        return torch.randint(3, cfg.vocab_size, (args.random_ids or 2, args.seq_len), generator=seed)
    if args.ids is not None:
        where, seqs = f"--ids {args.ids!r}", [part.split() for part in args.ids.split(",")]
        if not all(x.isdigit() for s in seqs for x in s) or len({len(s) for s in seqs}) != 1:
            raise ValueError(f"{where}: need integers, every sequence as long")
    else:
        where, records = args.data, data.read_jsonl(args.data)
        data.check_records(records, args.data)
        tok = tokenizer.load(args.model)
        seqs = [data.encode_example(tok, r, args.seq_len)[0] for r in records[: args.samples]]
    T = min(map(len, seqs), default=0)
    if T < 2:
        raise ValueError(f"{where}: need at least 2 tokens in every sequence")
    ids = torch.tensor([[int(x) for x in s[:T]] for s in seqs])  # (B, T)
    if ids.max() >= cfg.vocab_size:
        raise ValueError(f"{where}: token id {int(ids.max())} >= vocab_size {cfg.vocab_size}")
    return ids


def load_reference(path, dtype, adapter=None, device="cpu"):
    """moe.py's model on its plain code (the loop over experts), with the adapter, frozen, in eval mode."""
    model = hub.load_model(path, dtype=dtype, device=hub.pick_device(device))
    if adapter is not None:
        methods.load_adapter(model, adapter)  # refuses an adapter made for another base
    model.requires_grad_(False)
    model.set_plain(True)
    return model


def run_dump(args):
    if os.path.isdir(args.out) or not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise OSError(f"{args.out}: not a file in an existing directory")
    model = load_reference(args.model, getattr(torch, args.dtype), args.adapter, args.device)
    if args.grad:  # d loss / d the adapter tensors only: the base stays frozen
        for p in methods.adapter_state(model).values():
            p.requires_grad_(True)
    ids = input_ids(args, model.config).to(next(model.parameters()).device)
    tensors = collect(model, model.config, ids, grad=args.grad)
    adapter = args.adapter and os.path.abspath(args.adapter)
    write_golden(args.out, tensors, make_header(tensors, model.config, model=os.path.abspath(args.model), adapter=adapter))
    print(f"verify: wrote {len(tensors)} tensors ({os.path.getsize(args.out) / 2**20:.1f} MiB; {ids.shape[0]} x "
          f"{ids.shape[1]} tokens, {model.config.model_type}, {args.dtype}) to {args.out}")
    return 0


def run_compare(args):
    golden, header = read_tensors(args.golden, need_header=True)
    theirs, their_header = read_tensors(args.theirs)
    compute, params, note = run_dtype(theirs, their_header, args.dtype)
    path = args.model or header.get("model")
    if not path:
        raise ValueError(f"{args.golden}: names no model directory: give --model")
    model = load_reference(path, params, header.get("adapter"), args.device)
    if methods.fingerprint(model.config) != header["fingerprint"]:
        raise ValueError(f"{path}: not the model {args.golden} was made from (config fingerprint differs)")
    result = verify_compare.compare(golden, theirs, header, model, compute)
    return verify_compare.report(result, golden, header, args.golden, args.theirs, note)


def run_hf(args):
    try:
        import transformers
    except ImportError:
        raise ValueError("verify.py hf needs transformers (pip install transformers)") from None
    model = load_reference(args.model, torch.float32, device=args.device)
    ids = input_ids(args, model.config).to(next(model.parameters()).device)
    golden, dtype = collect(model, model.config, ids), getattr(torch, args.dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager",
                                                           experts_implementation="eager", dtype=dtype)
    theirs = collect(hf.to(ids.device).eval(), model.config, ids)
    header = make_header(golden, model.config)
    result = verify_compare.compare(golden, theirs, header, load_reference(args.model, dtype, device=args.device), dtype)
    return verify_compare.report(result, golden, header, "moe.py", f"transformers {transformers.__version__}", args.dtype)


def run_names(args):
    cfg = hub.read_config(args.model) if args.model else None
    print(json.dumps(schema.as_json(cfg), indent=1) if args.json else schema.text(cfg))
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:  # exit 0: no divergence (or written); 1: a divergence; 2: bad input
        sys.exit({"dump": run_dump, "compare": run_compare, "hf": run_hf, "names": run_names}[args.cmd](args))
    except (ValueError, OSError) as e:  # Unusable, ConfigError, CheckpointError, AdapterError, DataError are ValueErrors
        print(f"verify: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
