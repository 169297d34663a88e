"""train.py: the single training script. LoRA, MoE-Sieve and its ablations on an OLMoE / Mixtral / Qwen-MoE
checkpoint, on one device. Flat on purpose: args -> model -> method -> data -> optimizer -> loop -> save.

    python train.py --model DIR --data train.jsonl --method sieve --out runs/sieve
    python train.py --model DIR --method lora --rank 32 --dry-run        # parameter count, no weights read

Methods (DESIGN.md §1): attn (q/k/v/o only); lora (+ router, shared experts, dense MLPs, every routed
expert); sieve (the same, routed experts = the top-k most-routed per layer on a calibration profile);
random (same budget, random experts); coverage (fewest experts reaching a share p of each layer's
routing); budget (k*L experts in all, handed out greedily by marginal coverage).
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
from safetensors.torch import load_file

import data
import hub
import lora
import moe
import parallel
import router_profile
import sieve


# what defines a run: a checkpoint records them and --resume refuses other values (the rest may change: paths,
# devices, logging, checkpointing, --compile, --grad-checkpoint)
RUN_ARGS = ("method", "rank", "alpha", "rslora", "dropout", "sieve_frac", "sieve_k", "coverage_p",
            "budget_kmin", "adapter_act", "perft_experts", "perft_topk", "perft_shared", "perft_renorm", "perft_aux_coef",
            "dmep_experts", "dmep_topk", "dmep_targets", "dmep_warmup", "dmep_tau", "dmep_aux_coef", "dmep_ema",
            "lr", "weight_decay", "warmup", "grad_clip", "epochs", "steps", "batch_size", "grad_accum",
            "seq_len", "pack", "aux_coef", "aux_per_layer", "z_coef", "seed", "dtype")


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Fine-tune an MoE checkpoint with LoRA / MoE-Sieve.")
    # inputs and outputs
    ap.add_argument("--model", help="checkpoint directory (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--data", help="training .jsonl: {text} | {prompt, completion} | {query, choices, gold}")
    ap.add_argument("--out", default="runs/train", help="output directory (adapter, logs, summary, checkpoints)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly where it stopped")
    # method
    ap.add_argument("--method", default="sieve", choices=lora.METHODS + ("full",),
                    help="where the adapters go (DESIGN.md §1); full: train every weight (pretraining, --init-config)")
    ap.add_argument("--init-config", default=None, help="full: start from random weights of this config.json "
                    "(its directory holds the tokenizer) instead of --model's weights")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank r")
    ap.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 * rank); scale = alpha / r")
    ap.add_argument("--rslora", action="store_true", help="scale = alpha / sqrt(r) (rank-stabilised LoRA)")
    ap.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA input")
    ap.add_argument("--sieve-frac", type=float, default=0.25, help="sieve/random/budget: experts per layer, fraction of E")
    ap.add_argument("--sieve-k", type=int, default=None, help="sieve/random/budget: experts per layer as a count")
    ap.add_argument("--coverage-p", type=float, default=0.6, help="coverage: share of each layer's routing to reach")
    ap.add_argument("--budget-kmin", type=int, default=1, help="budget: experts every layer gets before the greedy rest")
    # PERFT (routed adapters beside / inside the MoE block) and DMEP (LoRA-MoE with expert pruning)
    ap.add_argument("--adapter-act", default="identity", choices=["identity", "silu", "relu"],
                    help="PERFT expert B(act(A h)): identity = LoRA-style, silu/relu = bottleneck adapter")
    ap.add_argument("--perft-experts", type=int, default=4, help="perft-r: adapter experts N")
    ap.add_argument("--perft-topk", type=int, default=2, help="perft-r: adapter experts per token K")
    ap.add_argument("--perft-shared", type=int, default=2, help="perft-d: always-on adapters M")
    ap.add_argument("--perft-renorm", action="store_true", help="perft-r: renormalise the top-K weights")
    ap.add_argument("--perft-aux-coef", type=float, default=0.01, help="perft-r: load-balancing loss on its router")
    ap.add_argument("--dmep-experts", type=int, default=8, help="dmep: LoRA experts N per module")
    ap.add_argument("--dmep-topk", type=int, default=2, help="dmep: LoRA experts per token K")
    ap.add_argument("--dmep-targets", default="q_proj,k_proj,v_proj,o_proj,dense",
                    help="dmep: linears to wrap (attention names; 'dense' = shared experts and dense MLPs)")
    ap.add_argument("--dmep-warmup", type=float, default=0.2, help="dmep: fraction of steps before pruning")
    ap.add_argument("--dmep-tau", type=float, default=0.5, help="dmep: prune experts with utilization < tau / N")
    ap.add_argument("--dmep-aux-coef", type=float, default=0.01, help="dmep: load-balancing coefficient in warm-up")
    ap.add_argument("--dmep-ema", type=float, default=0.9, help="dmep: EMA decay of the utilization")
    ap.add_argument("--calib", default=None, help="calibration .jsonl for the routing profile (default: --data)")
    ap.add_argument("--calib-samples", type=int, default=512, help="records of --calib to profile")
    ap.add_argument("--profile", default=None, help="use this profile JSON (router_profile.py) instead of profiling")
    # optimisation
    ap.add_argument("--lr", type=float, default=4e-4, help="peak learning rate (AdamW)")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--warmup", type=float, default=0.03, help="linear warm-up, fraction of the steps; then cosine to 0")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    ap.add_argument("--epochs", type=float, default=1.0, help="passes over the data (ignored with --steps)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--seq-len", type=int, default=512, help="maximum tokens per sequence")
    ap.add_argument("--pack", action="store_true", help="pack examples into full rows (attention crosses examples)")
    ap.add_argument("--aux-coef", type=float, default=0.0, help="load-balancing loss coefficient (0: off)")
    ap.add_argument("--aux-per-layer", action="store_true", help="balance each layer on its own instead of pooled")
    ap.add_argument("--z-coef", type=float, default=0.0, help="router z-loss coefficient (0: off)")
    ap.add_argument("--seed", type=int, default=0, help="seed for data order, adapter init, dropout, random plan")
    # system
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="frozen base dtype (auto: bfloat16 on CUDA, float32 on CPU); adapters stay fp32")
    ap.add_argument("--grad-checkpoint", action="store_true", help="recompute each block in backward (less memory)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    ap.add_argument("--save-every", type=int, default=0, help="write OUT/checkpoint.pt every N steps (0: only at the end)")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this step (checkpointed); go on with --resume")
    ap.add_argument("--log-every", type=int, default=1, help="print a log line every N steps")
    # no training
    ap.add_argument("--dry-run", action="store_true", help="build on the meta device, print trainable params, exit")
    ap.add_argument("--adapter", default=None, help="with --export-*: export this saved adapter, no training")
    ap.add_argument("--export-peft", action="store_true", help="also write OUT/peft in PEFT's layout")
    ap.add_argument("--export-merged", action="store_true", help="also write OUT/merged, a full merged checkpoint")
    args = ap.parse_args(argv)
    args.alpha = 2.0 * args.rank if args.alpha is None else args.alpha
    for flag, ok in (("rank", args.rank >= 1), ("lr", args.lr > 0), ("batch-size", args.batch_size >= 1),
                     ("grad-accum", args.grad_accum >= 1), ("seq-len", args.seq_len >= 2),
                     ("epochs", args.epochs > 0), ("steps", args.steps is None or args.steps >= 1),
                     ("dropout", 0 <= args.dropout < 1), ("calib-samples", args.calib_samples >= 1),
                     ("warmup", 0 <= args.warmup < 1), ("dmep-warmup", 0 <= args.dmep_warmup < 1),
                     ("log-every", args.log_every >= 1), ("save-every", args.save_every >= 0),
                     ("stop-after", args.stop_after is None or args.stop_after >= 1)):
        if not ok:
            ap.error(f"--{flag} has an invalid value: {getattr(args, flag.replace('-', '_'))}")
    if (args.export_peft or args.export_merged) and args.method not in lora.LORA_METHODS and not args.adapter:
        ap.error(f"--export-peft / --export-merged: {args.method} adapters depend on the input (their own routers "
                 "or per-expert outputs), so they cannot become PEFT LoRA or merged weights; use the adapter format")
    unknown = set(args.dmep_targets.split(",")) - set(lora.ATTN + ("dense",))
    if unknown:
        ap.error(f"--dmep-targets: unknown {sorted(unknown)}; choose from {','.join(lora.ATTN + ('dense',))}")
    if args.init_config and args.method != "full":
        ap.error("--init-config goes with --method full")
    if args.init_config:
        args.model = args.model or os.path.dirname(os.path.abspath(args.init_config))
    if args.model is None:
        ap.error("--model is required")
    if args.data is None and not (args.dry_run or args.adapter):
        ap.error("--data is required (except with --dry-run or --adapter)")
    return args


def plan_for(args, model, tok):
    """The per-layer expert plan of sieve / random / coverage / budget (None for lora / attn)."""
    if args.method not in ("sieve", "random", "coverage", "budget"):
        return None, None
    k = args.sieve_k if args.sieve_k is not None else args.sieve_frac
    if args.profile:
        prof = router_profile.load_profile(args.profile)
    elif args.dry_run:  # no weights: the parameter count of a same-size plan does not depend on which experts
        if args.method in ("coverage", "budget"):
            raise ValueError(f"--dry-run --method {args.method} needs --profile (its sizes depend on the routing)")
        cfg = model.config
        layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        prof = dict(layers=layers, num_experts=cfg.num_experts, counts=[[1] * cfg.num_experts for _ in layers])
    else:
        path = args.calib or args.data
        recs = data.read_jsonl(path)[: args.calib_samples]
        data.check_records(recs, path)
        seqs = sorted((data.encode_example(tok, r, args.seq_len)[0] for r in recs), key=len)
        n = len(seqs) // parallel.world()  # torchrun: equal contiguous shares (FSDP needs the same number of
        seqs = seqs[parallel.rank() * n:(parallel.rank() + 1) * n]  # forwards on every rank), then summed
        B = args.batch_size
        batches = (data.pad_batch(seqs[i:i + B], [[1] * len(s) for s in seqs[i:i + B]], tok.pad_id)
                   for i in range(0, len(seqs), B))
        prof = router_profile.profile(model, batches)
        if parallel.world() > 1:  # the same plan on every rank: counts over all ranks' calibration data
            for key in ("counts", "mass"):
                prof[key] = parallel.all_sum(torch.tensor(prof[key], dtype=torch.float64)).tolist()
            prof["tokens"], prof["samples"] = int(parallel.all_sum(prof["tokens"])), int(parallel.all_sum(prof["samples"]))
            prof["stats"] = router_profile.stats(prof)
        print(router_profile.format_stats(prof["stats"]))
    make = {"sieve": lambda: sieve.topk_plan(prof, k), "random": lambda: sieve.random_plan(prof, k, args.seed),
            "coverage": lambda: sieve.coverage_plan(prof, args.coverage_p),
            "budget": lambda: sieve.budget_plan(prof, k, args.budget_kmin)}
    plan = make[args.method]()
    if not args.dry_run:
        print(sieve.describe(prof, plan))
    return plan, prof


def step_schedule(n_examples, args, world=1):
    """Micro-batches of every step, as lists of example indices: epochs reshuffled with seed + epoch. Under
    torchrun an epoch's last micro-batch is dropped if it has fewer sequences than processes (a process
    without a share would fail while the others wait for it in the gradient's all-reduce)."""
    if n_examples < world:
        raise ValueError(f"--data: {n_examples} sequences, fewer than the {world} processes")
    per_step = args.batch_size * args.grad_accum
    steps = args.steps or max(1, math.ceil(args.epochs * n_examples / per_step))
    micro, epoch = [], 0
    while len(micro) < steps * args.grad_accum:
        micro += [mb for mb in data.batches(list(range(n_examples)), args.batch_size, args.seed + epoch) if len(mb) >= world]
        epoch += 1
    return [micro[s * args.grad_accum:(s + 1) * args.grad_accum] for s in range(steps)]


def lr_at(step, total, args):
    warm = int(args.warmup * total)
    if step < warm:
        return args.lr * (step + 1) / warm
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def dmep_prune(model, opt, args, n_before, log):
    """Prune, report counts / parameters / throughput before and after, return the optimizer's new params."""
    for m in model.modules():  # torchrun: the utilization over all ranks' tokens, so all prune alike
        if isinstance(m, lora.LoRAMoELinear):
            m.util.copy_(parallel.all_sum(m.util) / parallel.world())
    report = sieve.dmep_prune(model, opt, args.dmep_tau)
    n_after = lora.count_trainable(model)
    params = [p for group in opt.param_groups for p in group["params"]]
    if parallel.rank() != 0:  # the report and its files come from rank 0 alone
        return params
    before, after = sum(r["before"] for r in report.values()), sum(r["after"] for r in report.values())
    print(f"dmep: pruned {before - after} of {before} LoRA experts; trainable {n_before:,} -> {n_after:,} "
          f"(-{100 * (1 - n_after / n_before):.1f}%); load balancing off from here")
    for name, r in report.items():
        print(f"  {name}: {r['before']} -> {r['after']}  util {r['util']}")
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "dmep.json"), dict(step=len(log), trainable_before=n_before,
                                                         trainable_after=n_after, modules=report))
    sieve.plot_dmep(report, os.path.join(args.out, "dmep_utilization.png"))
    return params


def init_weights(model, std=0.02):
    """transformers' initialisation of these models: normal(0, 0.02) weights, zero biases, norms at one."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.zero_() if name.endswith("bias") else p.normal_(0.0, std)


def write_json(path, obj):
    lora.atomic_write(path, lambda t: open(t, "w").write(json.dumps(obj, indent=1)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv in ([], ["--quick"]):  # the embedded default: profile -> sieve -> fine-tune -> evaluate -> compare
        import study  # (study.py drives this script, so it is imported only here)
        return study.main(["--default", *argv])
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError, RuntimeError) as e:  # DataError, ConfigError, CheckpointError, AdapterError
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1


def run(args):
    # ------------------------------------------------------------------ processes, device, dtype, model
    rank, world, device = parallel.setup(args.device)
    try:
        if rank == 0:
            return train(args, rank, world, device)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # one report, from rank 0
            return train(args, rank, world, device)
    finally:
        parallel.cleanup()


def train(args, rank, world, device):
    main = rank == 0  # only rank 0 prints step lines and writes files
    if world > 1 and (args.export_peft or args.export_merged or args.adapter):
        raise ValueError("--export-* / --adapter: run them in one process (python train.py --adapter OUT ...)")
    if world > 1 and args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {world} processes (the global batch)")
    device = device or hub.pick_device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32}.get(args.dtype) or getattr(torch, args.dtype)
    if args.compile and dtype != torch.bfloat16:
        raise ValueError(f"--compile needs --dtype bfloat16 (torch compiles grouped_mm for bf16 only), not {dtype}")
    torch.manual_seed(args.seed)
    if not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model}: model directory not found")
    full = args.method == "full"
    if args.dry_run:
        with torch.device("meta"):
            model = moe.Transformer(hub.read_config(args.init_config or args.model))
        tok = None
    elif args.init_config:  # pretraining from scratch (every rank draws the same weights, then shards them)
        model = moe.Transformer(hub.read_config(args.init_config)).to(dtype=dtype)
        init_weights(model)
        if world > 1:
            parallel.shard(model)
        model.to(device)
        tok = data.load_tokenizer(args.model)
    else:
        model = hub.load_model(args.model, dtype=dtype, device=device, shard=parallel.shard if world > 1 else None)
        tok = data.load_tokenizer(args.model)
    cfg = model.config
    print(f"train.py: {cfg.model_type} {cfg.num_hidden_layers} layers x {cfg.num_experts} experts top-{cfg.num_experts_per_tok}"
          f" | base {dtype} on {device} | method {args.method} r={args.rank} alpha={args.alpha:g}")

    # ------------------------------------------------------------------ export a saved adapter (no training)
    if args.adapter:
        adapter_config = lora.load_adapter(model, args.adapter)
        write_exports(args, model, adapter_config)
        return 0

    # ------------------------------------------------------------------ method
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    ckpt = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise ValueError(f"--resume: {ckpt_path} not found")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        adapter_config, plan, prof = ckpt["adapter_config"], None, None
        changed = [k for k, v in ckpt.get("args", {}).items() if getattr(args, k) != v]
        if changed:  # they define the adapter, the data order, the lr curve, when DMEP prunes
            raise ValueError("--resume: the checkpoint was made with other values of " + ", ".join(
                f"--{k.replace('_', '-')} ({ckpt['args'][k]!r}, now {getattr(args, k)!r})" for k in changed))
        if args.stop_after is not None and args.stop_after <= ckpt["step"]:
            raise ValueError(f"--stop-after {args.stop_after}: the checkpoint is already at step {ckpt['step']}")
    if full:
        adapter_config, plan, prof = dict(method="full"), None, None
    elif ckpt is not None:
        lora.attach(model, adapter_config["method"], adapter_config["r"], adapter_config["alpha"],
                    adapter_config["dropout"], adapter_config["rslora"], adapter_config["plan"], **adapter_config["options"])
    else:
        plan, prof = plan_for(args, model, tok)
        options = dict(act=args.adapter_act, perft_experts=args.perft_experts, perft_topk=args.perft_topk,
                       perft_shared=args.perft_shared, perft_renorm=args.perft_renorm, dmep_experts=args.dmep_experts,
                       dmep_topk=args.dmep_topk, dmep_targets=args.dmep_targets)
        adapter_config = lora.attach(model, args.method, args.rank, args.alpha, args.dropout, args.rslora, plan, **options)
    state = dict(model.named_parameters()) if full else lora.adapter_state(model)  # what trains and checkpoints
    n_train = sum(p.numel() for p in state.values())
    n_unpruned = ckpt.get("trainable_before_prune", n_train) if ckpt else n_train  # DMEP's count before its pruning
    print(f"trainable parameters: {n_train:,} ({n_train / 1e6:.1f}M), adapter file ~{4 * n_train / 2**20:.1f} MiB (fp32)")
    if args.dry_run:
        return 0

    # ------------------------------------------------------------------ data
    records = data.read_jsonl(args.data)
    data.check_records(records, args.data)
    examples = [data.encode_example(tok, r, args.seq_len) for r in records]
    if args.pack:
        examples = data.pack_examples(examples, args.seq_len)
    top = max(max(ids) for ids, _ in examples)
    if top >= cfg.vocab_size:
        raise ValueError(f"{args.model}: the tokenizer gives id {top} >= vocab_size {cfg.vocab_size}")
    schedule = step_schedule(len(examples), args, world)
    total = len(schedule)
    print(f"data: {len(records)} records -> {len(examples)} sequences; {total} steps of "
          f"{args.grad_accum} x {args.batch_size} sequences")

    # ------------------------------------------------------------------ optimizer
    params = list(state.values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    model.grad_checkpoint = args.grad_checkpoint
    if args.compile:
        for block in model.model.layers:
            block.compile()
    start, log = 0, []
    weights_path = os.path.join(args.out, ckpt.get("weights", "checkpoint.safetensors")) if ckpt is not None else None
    if ckpt is not None and full and world > 1:  # whole tensors from the file, each rank keeps its shards
        parallel.load_full_state(model, opt, load_file(weights_path), ckpt["optimizer"])
    elif ckpt is not None:
        lora.load_adapter_tensors(model, weights_path, state)
        opt.load_state_dict(ckpt["optimizer"])
    if ckpt is not None:
        torch.set_rng_state(ckpt["rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"])
        for n, m in model.named_modules():
            if isinstance(m, lora.LoRAMoELinear):
                m.util.copy_(ckpt["dmep_util"][n])
        start, log = ckpt["step"], ckpt["log"]
        print(f"resumed at step {start}/{total}")
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "log.jsonl")  # one JSON line per step, appended as it goes
    if main:
        lora.atomic_write(log_path, lambda t: open(t, "w").writelines(json.dumps(e) + "\n" for e in log))
    if plan is not None and main:
        write_json(os.path.join(args.out, "plan.json"), {str(k): v for k, v in plan.items()})
        if "tokens" in prof:
            router_profile.save_profile(prof, os.path.join(args.out, "profile.json"))

    def save_checkpoint(step):
        if full and world > 1:  # FSDP2 shards: every rank helps gather the whole weights and optimizer state
            weights, opt_state = parallel.full_state(model, opt)
        else:  # weights None: the adapter as it is now (DMEP prunes it)
            weights, opt_state = (state if full else None), opt.state_dict()
        if not main:
            return
        # the tensors go to a file named for the step, and checkpoint.pt, written last, names it: a run killed
        # between the two writes resumes from the previous pair (both files are written atomically)
        name = f"checkpoint-{step}.safetensors"
        lora.save_adapter_tensors(model, os.path.join(args.out, name), weights)
        state_ = dict(step=step, weights=name, args={k: getattr(args, k) for k in RUN_ARGS},
                     optimizer=opt_state, rng=torch.get_rng_state(), log=log,
                     cuda_rng=torch.cuda.get_rng_state() if device.type == "cuda" else None,
                     adapter_config=lora.current_config(model, adapter_config), trainable_before_prune=n_unpruned,
                     dmep_util={n: m.util for n, m in model.named_modules() if isinstance(m, lora.LoRAMoELinear)})
        lora.atomic_write(ckpt_path, lambda t: torch.save(state_, t))
        for f in os.listdir(args.out):  # the previous pair's tensors
            if f.startswith("checkpoint-") and f.endswith(".safetensors") and f != name:
                os.remove(os.path.join(args.out, f))

    # ------------------------------------------------------------------ loop
    model.train()
    t_start, tokens_seen = time.time(), 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    end = min(total, args.stop_after) if args.stop_after else total
    all_sum = parallel.all_sum if world > 1 else None  # torchrun: balancing losses over the global batch
    dmep = adapter_config["method"] == "dmep"
    prune_at = max(1, int(args.dmep_warmup * total)) if dmep else None
    for step in range(start, end):
        if step == prune_at:  # DMEP: prune under-used LoRA experts per module, then go on without balancing
            params = dmep_prune(model, opt, args, n_unpruned, log)
        aux_coef = args.perft_aux_coef if adapter_config["method"] == "perft-r" else (
            args.dmep_aux_coef if dmep and step < prune_at else 0.0)
        t0 = time.time()
        lr = lr_at(step, total, args)
        for group in opt.param_groups:
            group["lr"] = lr
        micro = [[examples[i] for i in mb] for mb in schedule[step]]
        n_targets = sum(sum(m[1:]) for mb in micro for _, m in mb)  # the step's loss is a mean over these
        micro = [mb[rank::world] for mb in micro]  # torchrun: this rank's share of each global micro-batch
        batches = [data.pad_batch([e[0] for e in mb], [e[1] for e in mb], tok.pad_id) for mb in micro]
        step_loss, step_aux, n_tokens = torch.zeros((), device=device), torch.zeros((), device=device), 0
        for ids, mask, labels in batches:  # no host sync inside the step: the numbers to log stay on the device
            n_tokens += int(mask.sum())  # still on the host
            ids, mask, labels = (to_device(t, device) for t in (ids, mask, labels))
            # right padding: causal attention alone keeps real tokens off the pads
            loss, routing = model(ids, labels=labels, return_routing=True)
            loss = loss / max(1, n_targets)
            step_loss += loss.detach()
            logits = [r.logits for r in routing]
            if args.aux_coef > 0 and logits:
                lb = moe.load_balancing_loss_per_layer if args.aux_per_layer else moe.load_balancing_loss
                aux = lb(logits, cfg.num_experts, cfg.num_experts_per_tok, mask, all_sum) / len(batches)
                loss = loss + args.aux_coef * aux
                step_aux += aux.detach()
            if aux_coef > 0:  # the adapters' own routers (PERFT-R; DMEP in warm-up), each balanced on its own
                loss = loss + aux_coef * lora.router_balance_loss(model, mask, all_sum) / len(batches)
            if dmep and step < prune_at:
                sieve.dmep_track(model, mask, args.dmep_ema)
            if args.z_coef > 0 and logits:
                loss = loss + args.z_coef * moe.router_z_loss(logits, mask, all_sum) / len(batches)
            if full and world > 1:
                loss = loss * world  # FSDP2 averages gradients over ranks; every term above is this rank's share
            loss.backward()
        parallel.sum_grads(params)  # replicated adapters: the gradient of the global batch on every rank
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # the step's one host sync: it waits for all the work queued above, so dt below is the work done
        step_loss, step_aux = float(parallel.all_sum(step_loss)), float(parallel.all_sum(step_aux))
        n_tokens = int(parallel.all_sum(n_tokens))
        dt = time.time() - t0
        tokens_seen += n_tokens
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        eta = (time.time() - t_start) / (step + 1 - start) * (end - step - 1)
        entry = dict(step=step + 1, loss=round(step_loss, 6), lr=lr, tok_s=round(n_tokens / dt, 1), mem_gib=round(mem, 2))
        if args.aux_coef > 0:
            entry["aux"] = round(step_aux, 6)
        log.append(entry)
        if main:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        if main and ((step + 1) % args.log_every == 0 or step + 1 == total):
            print(f"step {step + 1}/{total} | loss {step_loss:.4f} | lr {lr:.2e} | {n_tokens / dt:,.0f} tok/s | "
                  f"mem {mem:.1f} GiB | eta {eta:.0f}s", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            save_checkpoint(step + 1)

    # ------------------------------------------------------------------ save
    wall = time.time() - t_start
    save_checkpoint(end)
    if end < total:
        print(f"stopped after step {end}/{total}; continue with --resume")
        return 0
    if full:  # a hub-style checkpoint: OUT/model (every rank helps gather the shards, rank 0 writes)
        tensors = hub.model_tensors(model)
        with open(args.init_config or os.path.join(args.model, "config.json")) as f:
            if main:
                hub.write_checkpoint(tensors, os.path.join(args.out, "model"), json.load(f), args.model)
    elif main:
        lora.save_adapter(model, args.out, adapter_config)
    if not main:
        return 0
    size = os.path.getsize(os.path.join(args.out, "model", "model-00001-of-00001.safetensors") if full
                           else os.path.join(args.out, "adapter.safetensors"))
    if dmep and prune_at is not None:  # throughput before and after pruning (DMEP reports ~10% more)
        speed = lambda rows: round(sum(e["tok_s"] for e in rows) / len(rows), 1) if rows else None
        before, after = speed(log[1:prune_at]), speed(log[prune_at + 1:])  # None: no step left to measure
        show = lambda v: "(no step to measure)" if v is None else f"{v:,.0f}"
        print(f"dmep: {show(before)} tok/s before pruning, {show(after)} after (first step of each phase left out); "
              f"trainable now {lora.count_trainable(model):,}")
        extra = dict(tok_s_before_prune=before, tok_s_after_prune=after, trainable_before_prune=n_unpruned)
    else:
        extra = {}
    summary = dict(**extra, method=adapter_config["method"], trainable_params=n_train if full else lora.count_trainable(model), adapter_bytes=size, steps=total,
                   wall_s=round(wall, 2), tok_s=round(tokens_seen / max(wall, 1e-9), 1),
                   final_loss=log[-1]["loss"] if log else None, device=str(device), dtype=str(dtype))
    write_json(os.path.join(args.out, "summary.json"), summary)
    print(f"done: {summary['trainable_params']:,} trainable params | adapter {size / 2**20:.2f} MiB | {wall:.1f}s | "
          f"{summary['tok_s']:,.0f} tok/s | final loss {summary['final_loss']}")
    write_exports(args, model, adapter_config)
    return 0


def to_device(t, device):
    """A batch tensor onto the device; on CUDA through pinned memory, so the copy does not block the host."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def write_exports(args, model, adapter_config):
    for flag, name in ((args.export_peft, "peft"), (args.export_merged, "merged")):  # both checked before either is written
        if flag and os.path.exists(os.path.join(args.out, name)) and not os.path.isdir(os.path.join(args.out, name)):
            raise OSError(f"{os.path.join(args.out, name)}: exists and is not a directory")
    if args.export_peft:
        hub.export_peft(model, adapter_config, os.path.join(args.out, "peft"))
        print(f"wrote {os.path.join(args.out, 'peft')}")
    if args.export_merged:
        hub.export_merged(model, args.model, os.path.join(args.out, "merged"))
        print(f"wrote {os.path.join(args.out, 'merged')}")


if __name__ == "__main__":
    sys.exit(main())
