"""tools/memory.py: training/memory.py's GPU-memory predictions for bench.py's rows, ours next to transformers +
peft's, for the phases besides training (profile, evaluation, export), and the README's tables.

    python -m tools.memory --table                 # the README's table: bench.py's shapes and rows, ours and peft's
    python -m tools.memory --phases                # the README's second table: every phase at OLMoE-1B-7B's shape
    python -m tools.memory --config tests/data/configs/mixtral-8x7b-v0.1/config.json --batch 1 --grad-checkpoint \\
        --methods lora,sieve,peft-lora             # any shape and rows, with the split of each peak

A row is bench.py's: its adapters (methods.attach as bench.build_ours: rank 16, alpha 2r, no dropout; the sieve on
a quarter of each layer's experts, with a quarter of the routing, as bench's random weights route), its step
(bench.ours_step or bench.peft_step, backward, AdamW, zero_grad) after a first AdamW step, on fake tensors with
CUDA's paths (training/memcount.py). transformers + peft's model is bench.build_peft's, on the same fake tensors
(its attention calls the same sdpa: the same stand-in). `dmep-pruned` is not predicted: what it prunes depends
on measured values. `profile` is router_profile.profile over --profile-records records of --seq tokens in
batches of --batch (gpu_check.py's profile row).
"""
import argparse
import json
import sys

import torch

import eval as evaluation
from files import hub
import moe
import sieve
from tools import bench
from tools import targets
from training import memory
from training.memcount import BLOCK, LiveBytes, building, running
import methods
from files import export

DTYPE = torch.bfloat16  # the base dtype bench.py uses on CUDA
# The README's table: (shape, config, batch, seq, grad checkpoint) x COLUMNS, as bench.py / gpu_check.py run them
TABLE = [("OLMoE-1B-7B", targets.OLMOE, 4, 2048, False), ("OLMoE-1B-7B", targets.OLMOE, 4, 2048, True),
         ("OLMoE-1B-7B", targets.OLMOE, 8, 2048, False), ("OLMoE-1B-7B", targets.OLMOE, 8, 2048, True),
         ("Mixtral-8x7B", targets.MIXTRAL, 1, 2048, True)]
COLUMNS = ("attn", "peft-attn", "lora", "peft-lora", "sieve")
PROFILE_RECORDS = 64


def uniform_plan(cfg, frac):
    """The sieve's plan on a profile with uniform counts (what bench's random weights give, near enough)."""
    layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    return sieve.topk_plan(dict(layers=layers, num_experts=cfg.num_experts, counts=[[1] * cfg.num_experts] * len(layers)), frac)


def bench_row(method, args, cdict, cuda=True, fake=True):
    """The predicted peak of bench.py's row `method` with its parsed arguments `args` on the shape cdict:
    dict(peak, split) in bytes, or None for a row that cannot be predicted (dmep-pruned)."""
    cfg = moe.Config.from_json(cdict)
    if method == "profile":
        return memory.profile_peak(cfg, DTYPE, args.batch, args.seq, -(-PROFILE_RECORDS // args.batch), cuda, fake)
    if method == "dmep-pruned":
        return None
    dtype = DTYPE if cuda else torch.float32
    with running(cuda, fake) as mode:
        ids, _, labels = memory.token_batch(cfg, args.batch, args.seq)
        n_labels = labels.numel()
        if method.startswith("peft"):
            with building(mode):
                model, _ = bench.build_peft(cdict, method, args, torch.device("cpu"), dtype)
            step = lambda: bench.peft_step(model, ids, labels, n_labels, args.hf_loss == "native")
        else:
            model = memory.new_model(cfg, dtype, mode)
            plan = uniform_plan(cfg, args.sieve_frac) if method == "sieve" else None
            with building(mode):
                methods.attach(model, method, args.rank, args.alpha, plan=plan)
            model.grad_checkpoint = args.grad_checkpoint
            model.set_plain(args.plain)
            model.train()
            aux = 0.01 if method in ("perft-r", "dmep") else 0.0  # as bench.measure
            step = lambda: bench.ours_step(model, ids, labels, n_labels, aux, method == "dmep")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)
        memory.first_step(opt, params, cuda)
        live = LiveBytes(BLOCK if cuda else 1, memory.routed_shares(model) if isinstance(model, moe.Transformer) else None)
        live.hold_model(model, params, opt)
        with live:
            step().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return live.result()


# ----------------------------------------------------------------------------- the other phases

def adapted_model(cfg, method, rank, mode):
    """The base in bf16 with `method`'s adapters (alpha 2r; the sieve on a quarter of the experts), for eval."""
    model = memory.new_model(cfg, DTYPE, mode)
    with building(mode):
        methods.attach(model, method, rank, 2.0 * rank, plan=uniform_plan(cfg, 0.25) if method == "sieve" else None)
    return model.eval()


def eval_peak(cfg, method, rank, batch, seq, cuda=True, fake=True):
    """eval.py's scoring of one batch (what ppl and mc run per batch: the final hidden states of the labelled
    positions, through the head 1,024 rows at a time), with the adapter unmerged on the base."""
    with running(cuda, fake) as mode:
        model = adapted_model(cfg, method, rank, mode)
        ids, mask, labels = memory.token_batch(cfg, batch, seq)
        live = LiveBytes(BLOCK if cuda else 1, memory.routed_shares(model))
        live.hold_model(model, methods.adapter_state(model).values())
        with live, evaluation._inference(model):
            evaluation._label_logprobs(model, ids, mask, labels)
    return live.result()


def export_peak(cfg, method, rank, shard_bytes=4 << 30, cuda=True, fake=True):
    """train.py --export-merged (export.export_merged): the adapter merged into the base weights on the device and
    unmerged after; the shards are copied to the host one at a time, so the host holds the largest shard."""
    with running(cuda, fake) as mode:
        model = adapted_model(cfg, method, rank, mode)
        live = LiveBytes(BLOCK if cuda else 1)
        live.hold_model(model, methods.adapter_state(model).values())
        with live:
            methods.merge(model)
            methods.merge(model, -1)
        views = export.checkpoint_views(model)
        host = max(sum(views[n].numel() * views[n].element_size() for n in names)
                   for names in export.shard_names(views, shard_bytes))
    return dict(live.result(), host=host)


def phases(cdict, rank=16, batch=8, seq=2048):
    """{phase: result} at one shape: the routing profile over 2 and 8 batches, evaluation, the merged export."""
    cfg = moe.Config.from_json(cdict)
    out = {f"profile, {n} batches of {batch} x {seq}": memory.profile_peak(cfg, DTYPE, batch, seq, n) for n in (2, 8)}
    out[f"evaluation (lora r {rank} unmerged), {batch} x {seq}"] = eval_peak(cfg, "lora", rank, batch, seq)
    out[f"merged export (lora r {rank})"] = export_peak(cfg, "lora", rank)
    return out


# ----------------------------------------------------------------------------- tables

def gib(result):
    return "-" if result is None else f"{memory.gib(result['peak']):.1f}"


def table(rows=None):
    """The README's table: one line per TABLE row (or the first `rows`), predicted GiB per column."""
    head = "| shape | batch x seq | grad checkpoint | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
    for shape, path, batch, seq, ckpt in TABLE[:rows]:
        with open(path) as f:
            cdict = json.load(f)
        args = bench.parse_args(["--batch", str(batch), "--seq", str(seq)] + (["--grad-checkpoint"] if ckpt else []))
        cells = [gib(bench_row(m, args, cdict)) for m in COLUMNS]
        lines.append(f"| {shape} | {batch} x {seq} | {'yes' if ckpt else 'no'} | " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr, flush=True)  # progress: a row takes a minute or two on 2 cores
    return lines


def phase_lines(cdict):
    lines = ["| phase | predicted peak GiB | host GiB | split at the peak (GiB) |", "|---|---|---|---|"]
    for name, r in phases(cdict).items():
        host = f"{memory.gib(r['host']):.1f}" if "host" in r else "-"
        lines.append(f"| {name} | {gib(r)} | {host} | {memory.split_line(r['split'])} |")
    return lines


def parse_args(argv):
    ap = argparse.ArgumentParser(description="GPU memory predicted on the CPU (training/memory.py) for bench.py's rows.")
    ap.add_argument("--table", action="store_true", help="print the README's table of bench.py's shapes and rows")
    ap.add_argument("--rows", type=int, default=None, help="--table: only its first N rows")
    ap.add_argument("--phases", action="store_true", help="print the README's table of the phases at --config's shape")
    ap.add_argument("--config", default=targets.OLMOE, help="config.json of the shape (default OLMoE-1B-7B)")
    ap.add_argument("--methods", default="attn,lora,sieve,peft-attn,peft-lora", help="comma list of bench.py rows")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    ap.add_argument("--grad-checkpoint", action="store_true", help="recompute each block in backward")
    args = ap.parse_args(argv)
    bad = [m for m in args.methods.split(",") if m not in bench.ROWS + ("profile",)]
    if bad:
        ap.error(f"--methods: unknown {bad}; choose from {','.join(bench.ROWS + ('profile',))}")
    for flag in ("rows", "batch", "seq", "rank", "layers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        with open(args.config) as f:
            cdict = json.load(f)
        moe.Config.from_json(cdict, args.config)
    except (OSError, ValueError) as e:
        print(f"tools.memory: error: --config {args.config}: {e}", file=sys.stderr)
        return 2
    if args.layers:
        cdict["num_hidden_layers"] = args.layers
    if args.table or args.phases:
        print("\n".join((table(args.rows) if args.table else []) + ([""] if args.table and args.phases else [])
                        + (phase_lines(cdict) if args.phases else [])))
        print("tools.memory: wrote nothing (predictions printed; the README quotes them)")
        return 0
    bench_args = bench.parse_args(["--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank)]
                                  + (["--grad-checkpoint"] if args.grad_checkpoint else []))
    print(f"predicted peak GiB on CUDA (bf16 base): {cdict['model_type']} {cdict['num_hidden_layers']} layers, "
          f"{args.batch} x {args.seq} tokens, r {args.rank}{', grad checkpoint' if args.grad_checkpoint else ''}")
    for m in args.methods.split(","):
        r = bench_row(m, bench_args, cdict)
        print(f"{m:<12} {gib(r):>7}  " + ("value-dependent: not predicted" if r is None else memory.split_line(r["split"])),
              flush=True)
    print("tools.memory: wrote nothing (predictions printed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
