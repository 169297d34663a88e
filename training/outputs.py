"""outputs.py: what train.py prints and writes besides checkpoints: the step line's memory figure, and at the end
the adapter (or model), summary.json, loss.png, the exports, and what to run next. (DMEP's pruning report is
dmep.prune_step's.)"""
import json
import os
import sys

import torch

import methods
from files import atomic, export, plots
from training import checkpoint



def memory_gib(device):
    """CUDA: the peak of allocated memory. CPU: the process's resident set now (/proc/self/statm; elsewhere the
    peak resident set from getrusage)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak / (2**30 if sys.platform == "darwin" else 2**20)


def memory_label(device):
    return "mem" if device.type == "cuda" else "rss"


def finish(args, model, adapter_config, log, run):
    """Write the trained adapter (or model under OUT/model), summary.json, loss.png and the exports; say what was
    written and how to use it. `run`: wall, tokens, n_train, n_unpruned, total, prune_at, device, dtype, main."""
    full, dmep = adapter_config["method"] == "full", adapter_config["method"] == "dmep"
    if full:  # a hub-style checkpoint: OUT/model (every rank helps gather the shards, rank 0 writes)
        sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())  # FSDP2: gathered whole first
        tensors = export.model_tensors(model) if sharded else export.checkpoint_views(model)  # views: a shard at a time
        bad = checkpoint.first_non_finite(tensors.items()) if run["main"] else None
        if bad:
            raise checkpoint.NonFiniteError(f"{bad} is not finite; OUT/model not written")
        with open(args.init_config or os.path.join(args.model, "config.json")) as f:
            if run["main"]:
                export.write_checkpoint(tensors, os.path.join(args.out, "model"), json.load(f), args.model)
    elif run["main"]:
        bad = checkpoint.first_non_finite(methods.adapter_state(model).items())
        if bad:
            raise checkpoint.NonFiniteError(f"adapter tensor {bad} is not finite; no adapter written")
        methods.save_adapter(model, args.out, adapter_config)
    if not run["main"]:
        return 0
    written = ["model/ (the trained checkpoint)" if full else "adapter.safetensors + adapter_config.json (the adapter)"]
    files = ([os.path.join(args.out, "model", f) for f in os.listdir(os.path.join(args.out, "model"))
              if f.endswith(".safetensors")] if full else [os.path.join(args.out, "adapter.safetensors")])
    size = sum(os.path.getsize(f) for f in files)
    extra = dmep_speeds(model, log, run) if dmep and run["prune_at"] is not None else {}
    wall = run["wall"]
    summary = dict(**extra, method=adapter_config["method"], adapter_bytes=size, steps=run["total"],
                   trainable_params=run["n_train"] if full else methods.count_trainable(model), wall_s=round(wall, 2),
                   tok_s=round(run["tokens"] / max(wall, 1e-9), 1), final_loss=log[-1]["loss"] if log else None,
                   device=str(run["device"]), dtype=str(run["dtype"]))
    atomic.write_json(os.path.join(args.out, "summary.json"), summary)
    print(f"done: {summary['trainable_params']:,} trainable params | adapter {size / 2**20:.2f} MiB | {wall:.1f}s | "
          f"{summary['tok_s']:,.0f} tok/s | final loss {summary['final_loss']}")
    for name, what in (("plan.json", "adapted experts per layer"), ("profile.json", "the routing profile"),
                       ("dmep.json", "DMEP's pruning report"), ("dmep_utilization.png", "DMEP's utilization")):
        if os.path.exists(os.path.join(args.out, name)):  # the methods that make them
            written.append(f"{name} ({what})")
    written += ["log.jsonl (one line per step)", "summary.json", "checkpoint.pt + its tensors (for --resume)"]
    if plots.loss(log, os.path.join(args.out, "loss.png")):
        written.append("loss.png (loss and lr against step)")
    written += write_exports(args, model, adapter_config)
    print(f"wrote to {args.out}:\n" + "".join(f"  {w}\n" for w in written), end="")
    model_dir = os.path.join(args.out, "model") if full else args.model
    adapter = "" if full else f" --adapter {args.out}"
    print(f"next: python eval.py --model {model_dir}{adapter} --task mc --data VAL.jsonl   "
          "(--task ppl for {text} records, gen for {question, answer})")
    return 0


def dmep_speeds(model, log, run):
    """DMEP's throughput before and after pruning (the paper reports ~10% more); the first step of each phase
    is left out (it pays for warm-up and the pruning itself). None: no step left to measure."""
    prune_at = run["prune_at"]
    speed = lambda rows: round(sum(e["tok_s"] for e in rows) / len(rows), 1) if rows else None
    before, after = speed(log[1:prune_at]), speed(log[prune_at + 1:])
    show = lambda v: "(no step to measure)" if v is None else f"{v:,.0f}"
    print(f"dmep: {show(before)} tok/s before pruning, {show(after)} after (first step of each phase left out); "
          f"trainable now {methods.count_trainable(model):,}")
    return dict(tok_s_before_prune=before, tok_s_after_prune=after, trainable_before_prune=run["n_unpruned"])


def write_exports(args, model, adapter_config):
    """OUT/peft and OUT/merged as asked (both destinations checked before either is written); what was written."""
    for flag, name in ((args.export_peft, "peft"), (args.export_merged, "merged")):
        if flag and os.path.exists(os.path.join(args.out, name)) and not os.path.isdir(os.path.join(args.out, name)):
            raise OSError(f"{os.path.join(args.out, name)}: exists and is not a directory")
    bad = checkpoint.first_non_finite(methods.adapter_state(model).items())
    if bad and (args.export_peft or args.export_merged):
        raise checkpoint.NonFiniteError(f"adapter tensor {bad} is not finite; nothing exported")
    written = []
    if args.export_peft:
        export.export_peft(model, adapter_config, os.path.join(args.out, "peft"))
        written.append("peft/ (PEFT's adapter layout)")
    if args.export_merged:
        export.export_merged(model, args.model, os.path.join(args.out, "merged"))
        written.append("merged/ (a checkpoint with the adapter merged in)")
    return written
