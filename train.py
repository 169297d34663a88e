"""train.py: the single training script. LoRA, MoE-Sieve and its ablations, PERFT and DMEP on an OLMoE / Mixtral /
Qwen-MoE checkpoint, on one device or several (torchrun). It reads top-down: arguments -> model -> adapters ->
data -> optimizer -> loop -> save; flags in training/flags.py, checkpoints and guards in training/checkpoint.py.

    python train.py --model DIR --data train.jsonl --method sieve --out runs/sieve
    python train.py --model DIR --method lora --rank 32 --dry-run        # parameter count, no weights read

Methods (--method; methods.py says what each adapts): attn, lora, sieve and its ablations random / coverage /
budget, perft-s/d/r/e, dmep, and full (every weight). The embedded default job is a tool on top of this script
(python -m tools.study --default: profile, plan, fine-tune and evaluate four methods on the shipped model).
"""
import contextlib
import json
import math
import os
import sys
import time

import torch

import dmep
import methods
import moe
import quant
import router_profile
import sieve
from files import atomic, data, hub, tokenizer
from training import checkpoint, flags, memory, outputs, parallel


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = flags.parse_args(argv)
    args.argv = list(argv)  # for the --resume command printed on an interrupt
    try:
        return run(args)
    except (ValueError, OSError, RuntimeError) as e:  # DataError, ConfigError, ResumeError, NonFiniteError, ...
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1


def run(args):
    rank, world, device = parallel.setup(args.device)
    code = None  # stays None if train raises
    try:
        if rank == 0:
            code = train(args, rank, world, device)
        else:
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # one report, from rank 0
                code = train(args, rank, world, device)
        return code
    finally:
        parallel.cleanup(ok=code is not None)  # after an exception on one rank the others must not wait for it


def train(args, rank, world, device):
    is_main = rank == 0  # only rank 0 prints step lines and writes files
    device, dtype = device_and_dtype(args, device, world)
    full = args.method == "full"
    torch.manual_seed(args.seed)

    # ------------------------------------------------------------------ model
    model, tok = build_model(args, dtype, device, world)
    cfg = model.config
    print(f"train.py: {cfg.model_type} {cfg.num_hidden_layers} layers x {cfg.num_experts} experts top-{cfg.num_experts_per_tok}"
          f" | base {dtype} on {device} | " + (f"adapter {args.adapter}" if args.adapter else
                                                  f"method {args.method} r={args.rank} alpha={args.alpha:g}"))
    if args.adapter:  # export a saved adapter, no training
        adapter_config = methods.load_adapter(model, args.adapter)
        for w in outputs.write_exports(args, model, adapter_config):
            print(f"wrote {os.path.join(args.out, w)}")
        return 0

    # ------------------------------------------------------------------ adapters (or the checkpoint's)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    ckpt = None
    if args.resume:
        ckpt = checkpoint.load(ckpt_path)
        checkpoint.check_run_args(ckpt, args, ckpt_path)
    adapter_config, plan, prof = attach_adapters(args, model, tok, ckpt)
    trainable = dict(model.named_parameters()) if full else methods.adapter_state(model)  # {name: parameter}
    n_train = sum(p.numel() for p in trainable.values())
    n_unpruned = ckpt.get("trainable_before_prune", n_train) if ckpt else n_train  # DMEP's count before its pruning
    print(f"trainable parameters: {n_train:,} ({n_train / 1e6:.1f}M), adapter file ~{4 * n_train / 2**20:.1f} MiB (fp32)")
    if args.dry_run:  # the same step on fake tensors: its peak GPU memory, before any weight is read
        attach = lambda fake_model: attach_adapters(args, fake_model, tok, None)
        print("\n".join(memory.dry_run_report(args, cfg, device, attach, make_optimizer, train_step)))
        return 0

    # ------------------------------------------------------------------ data
    examples = load_examples(args, tok, cfg)
    schedule = data.step_schedule(len(examples), args.batch_size, args.grad_accum, args.steps, args.epochs,
                                  args.seed, world)
    total = len(schedule)
    print(f"data: {len(examples)} sequences; {total} steps of {args.grad_accum} x {args.batch_size} sequences")

    # ------------------------------------------------------------------ optimizer (and the checkpoint's state)
    opt, master = make_optimizer(args, trainable, dtype)
    model.grad_checkpoint = args.grad_checkpoint
    if args.compile:
        for block in model.model.layers:
            block.compile()
    start, log = (checkpoint.restore(args, ckpt, model, opt, trainable, master, device, world) if ckpt is not None else (0, []))
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "log.jsonl")  # one JSON line per step, appended as it goes
    if is_main:
        checkpoint.write_log(log_path, log)
    if plan is not None and is_main:
        atomic.write_json(os.path.join(args.out, "plan.json"), {str(k): v for k, v in plan.items()})
        if "tokens" in prof:
            router_profile.save_profile(prof, os.path.join(args.out, "profile.json"))

    def save_checkpoint(step):
        if full and world > 1:  # FSDP2 shards: every rank helps gather the whole weights and optimizer state
            weights, opt_state = parallel.full_state(model, opt)
        else:  # weights None: the adapter as it is now (DMEP prunes it)
            weights, opt_state = (master or trainable if full else None), opt.state_dict()
        if is_main:
            checkpoint.save(args.out, step, model, opt_state, weights, dict(
                args={k: getattr(args, k) for k in flags.RUN_ARGS}, rng=torch.get_rng_state(), log=log,
                cuda_rng=torch.cuda.get_rng_state() if device.type == "cuda" else None,
                adapter_config=methods.current_config(model, adapter_config), trainable_before_prune=n_unpruned,
                dmep_util={n: m.util for n, m in model.named_modules() if isinstance(m, dmep.LoRAMoELinear)}))

    # ------------------------------------------------------------------ loop
    model.train()
    t_start, tokens_seen = time.time(), 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    end = min(total, args.stop_after) if args.stop_after else total
    is_dmep = adapter_config["method"] == "dmep"
    prune_at = max(1, int(args.dmep_warmup * total)) if is_dmep else None
    params = list((master or trainable).values())  # what the optimizer steps
    with checkpoint.Interrupts() as interrupts:
        for step in range(start, end):
            if step == prune_at:  # DMEP: prune under-used LoRA experts per module, then go on without balancing
                dmep.prune_step(model, opt, args.dmep_tau, step, args.out if is_main else None, parallel.all_sum, world)
                trainable, params = methods.adapter_state(model), [p for g in opt.param_groups for p in g["params"]]
            t0 = time.time()
            lr = lr_at(step, total, args)
            for group in opt.param_groups:
                group["lr"] = lr
            batches, n_targets = data.step_batches(examples, schedule[step], tok.pad_id, rank, world)
            step_loss, step_aux, n_tokens = train_step(args, model, opt, trainable, master, params, batches, n_targets, step,
                                                       is_dmep and step < prune_at, device, world)
            dt = time.time() - t0
            tokens_seen += n_tokens
            entry = dict(step=step + 1, loss=round(step_loss, 6), lr=lr, tok_s=round(n_tokens / dt, 1),
                         step_s=round(dt, 4), mem_gib=round(outputs.memory_gib(device), 2))
            if args.aux_coef > 0:
                entry["aux"] = round(step_aux, 6)
            log.append(entry)
            if is_main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            if is_main and ((step + 1) % args.log_every == 0 or step + 1 == total):
                eta = (time.time() - t_start) / (step + 1 - start) * (end - step - 1)
                print(f"step {step + 1}/{total} | loss {step_loss:.4f} | lr {lr:.2e} | {n_tokens / dt:,.0f} tok/s | "
                      f"{outputs.memory_label(device)} {entry['mem_gib']:.1f} GiB | eta {eta:.0f}s", flush=True)
            if interrupts.pending():  # SIGINT / SIGTERM: this step is done; checkpoint it and stop
                save_checkpoint(step + 1)
                name = "SIGINT" if interrupts.signum == 2 else "SIGTERM"
                print(f"{name}: stopped after step {step + 1}/{total}; checkpoint {ckpt_path}\n"
                      f"continue with: {checkpoint.resume_command(args.argv, world)}", flush=True)
                return 128 + interrupts.signum
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
                save_checkpoint(step + 1)
        save_checkpoint(end)

    # ------------------------------------------------------------------ save
    if end < total:
        print(f"stopped after step {end}/{total}; checkpoint {ckpt_path}\n"
              f"continue with: {checkpoint.resume_command(args.argv, world)}")
        return 0
    return outputs.finish(args, model, adapter_config, log, dict(
        wall=time.time() - t_start, tokens=tokens_seen, n_train=n_train, n_unpruned=n_unpruned, total=total,
        prune_at=prune_at, device=device, dtype=dtype, main=is_main))


def device_and_dtype(args, device, world):
    """The device and base dtype, after the checks that need the number of processes or the device."""
    if world > 1 and (args.export_peft or args.export_merged or args.adapter):
        raise ValueError("--export-* / --adapter: run them in one process (python train.py --adapter OUT ...)")
    if world > 1 and args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {world} processes (the global batch)")
    device = device or hub.pick_device(args.device)
    dtype = hub.pick_dtype(args.dtype, device)
    if args.compile and dtype != torch.bfloat16:
        raise ValueError(f"--compile needs --dtype bfloat16 (torch compiles grouped_mm for bf16 only), not {dtype}")
    if args.method == "full" and hub.quantize_args(args):  # codes have no gradient
        raise ValueError(f"--quantize {args.quantize} with --method full: a quantized base is frozen; use an adapter method")
    if args.method == "full" and dtype != torch.float32 and world > 1:
        raise ValueError(f"--method full --dtype {args.dtype} under torchrun: the fp32 master weights that keep small "
                         "updates are single-process only; use --dtype float32")
    return device, dtype


# ---------------------------------------------------------------------------------------------------- model

def build_model(args, dtype, device, world):
    """(model, tokenizer): the meta model for --dry-run, random weights for --init-config, else the checkpoint's
    weights (hub.load_model refuses a NaN or inf in them: a base with one would train to a NaN adapter)."""
    if args.dry_run:
        with torch.device("meta"):
            return moe.Transformer(hub.read_config(args.init_config or args.model)), None
    if args.init_config:  # pretraining from scratch (every rank draws the same weights, then shards them)
        model = moe.Transformer(hub.read_config(args.init_config)).to(dtype=dtype)
        model.inv_freq = moe.rope_inv_freq(model.config)  # RoPE's frequencies stay fp32 (bf16 would shift angles)
        init_weights(model)
        if world > 1:
            parallel.shard(model)
        model.to(device)
    else:
        model = hub.load_model(args.model, dtype=dtype, device=device, shard=parallel.shard if world > 1 else None,
                               quantize=hub.quantize_args(args))
    if args.plain:  # the whole step on the plain code of moe.py (no moe_fast.py)
        model.set_plain(True)
    return model, tokenizer.load(args.model)


def init_weights(model, std=0.02):
    """transformers' initialisation of these models: normal(0, 0.02) weights, zero biases, norms at one."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.zero_() if name.endswith("bias") else p.normal_(0.0, std)


# ---------------------------------------------------------------------------------------------------- adapters

def attach_adapters(args, model, tok, ckpt):
    """(adapter_config, plan, profile): the method's adapters on the model; a checkpoint's config on resume."""
    if args.method == "full":
        return dict(method="full"), None, None
    if ckpt is not None:
        return methods.attach_from_config(model, ckpt["adapter_config"]), None, None
    plan, prof = plan_for(args, model, tok)
    record = dict(quantization=quant.describe(model)) if model.quantization else {}  # the adapter config says so
    options = dict(act=args.adapter_act, perft_experts=args.perft_experts, perft_topk=args.perft_topk,
                   perft_shared=args.perft_shared, perft_renorm=methods.RENORM[args.perft_renorm],
                   perft_init=args.perft_init, perft_weights=args.perft_weights, dmep_experts=args.dmep_experts,
                   dmep_topk=args.dmep_topk, dmep_targets=args.dmep_targets)
    return {**methods.attach(model, args.method, args.rank, args.alpha, args.dropout, args.rslora, plan, **options), **record}, plan, prof


def plan_for(args, model, tok):
    """The per-layer expert plan of the planned methods (sieve and its ablations; None for the others), from
    --profile, or from a profile of the calibration data made now."""
    if args.method not in methods.PLANNED:
        return None, None
    if args.profile:
        prof = router_profile.load_profile(args.profile)
    elif args.dry_run:  # no weights: the parameter count of a same-size plan does not depend on which experts
        if args.method in ("coverage", "budget"):
            raise ValueError(f"--dry-run --method {args.method} needs --profile (its sizes depend on the routing)")
        cfg = model.config
        layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        prof = dict(layers=layers, num_experts=cfg.num_experts, counts=[[1] * cfg.num_experts for _ in layers])
    else:
        prof = calibration_profile(args, model, tok)
    k = args.sieve_k if args.sieve_k is not None else args.sieve_frac
    plan = methods.plan(args.method, prof, k, args.seed, args.coverage_p, args.budget_kmin)
    if not args.dry_run:
        print(sieve.describe(prof, plan))
    return plan, prof


def calibration_profile(args, model, tok):
    """The routing profile on --calib (default --data), sampled as MoE-Sieve's profiler does (router_profile.
    calibration); under torchrun summed over every rank's share."""
    path = args.calib or args.data
    recs = data.read_jsonl(path)
    data.check_records(recs, path)
    seqs = sorted(router_profile.calibration(tok, recs, args.calib_samples, args.calib_tokens, args.calib_seed), key=len)
    n = len(seqs) // parallel.world()  # torchrun: equal contiguous shares (FSDP needs the same number of
    seqs = seqs[parallel.rank() * n:(parallel.rank() + 1) * n]  # forwards on every rank), then summed
    prof = router_profile.profile(model, router_profile.padded_batches(seqs, tok.pad_id, args.batch_size))
    if parallel.world() > 1:  # the same plan on every rank: counts over all ranks' calibration data
        for key in ("counts", "mass"):
            prof[key] = parallel.all_sum(torch.tensor(prof[key], dtype=torch.float64)).tolist()
        prof["tokens"], prof["samples"] = int(parallel.all_sum(prof["tokens"])), int(parallel.all_sum(prof["samples"]))
        prof["stats"] = router_profile.stats(prof)
    print(router_profile.format_stats(prof["stats"]))
    return prof


# ---------------------------------------------------------------------------------------------------- data

def load_examples(args, tok, cfg):
    """--data encoded (cut to --seq-len, the cuts reported once), packed with --pack."""
    records = data.read_jsonl(args.data)
    data.check_records(records, args.data)
    examples, (n_cut, tokens_cut) = data.encode_examples(tok, records, args.seq_len, args.loss_on, args.data,
                                                            eos=args.eos == "on")
    if n_cut:
        print(f"data: --seq-len {args.seq_len} cut {n_cut} of {len(records)} records ({tokens_cut:,} tokens)")
    if args.pack:
        examples = data.pack_examples(examples, args.seq_len)
    top = max(max(ids) for ids, _ in examples)
    if top >= cfg.vocab_size:
        raise ValueError(f"{args.model}: the tokenizer gives id {top} >= vocab_size {cfg.vocab_size}")
    return examples


# ---------------------------------------------------------------------------------------------------- optimizer

def make_optimizer(args, trainable, dtype):
    """(AdamW, master). Adapters are fp32. Full training of a bf16/fp16 model steps fp32 master copies and copies
    them back after each step: bf16 keeps 8 bits of mantissa, so an update below ~1/256 of a weight (most
    updates at lr 1e-4) would round away if AdamW stepped the bf16 weights themselves."""
    for p in trainable.values():
        p.requires_grad_(True)
    master = None
    if any(p.dtype != torch.float32 for p in trainable.values()):
        master = {n: p.detach().float().clone() for n, p in trainable.items()}
    params = list((master or trainable).values())
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999)), master


def lr_at(step, total, args):
    """The learning rate of optimizer step `step` (0-based) of `total`. cosine: linear warm-up reaching the peak
    at its last step, then half a cosine to 0. linear: HF's get_linear_schedule_with_warmup exactly (its warm-up
    starts at 0; the decay reaches 0 after the last step)."""
    warm = int(args.warmup * total)
    if args.schedule == "linear":
        if step < warm:
            return args.lr * step / max(1, warm)
        return args.lr * max(0.0, (total - step) / max(1, total - warm))
    if step < warm:
        return args.lr * (step + 1) / warm
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))




# ---------------------------------------------------------------------------------------------------- loop

def train_step(args, model, opt, trainable, master, params, batches, n_targets, step, dmep_warm, device, world):
    """One optimizer step over this rank's micro-batches: (loss, aux, tokens), summed over the ranks. A NaN or
    inf loss or gradient norm stops training before the optimizer step (NonFiniteError): nothing bad is applied
    or saved, the last checkpoint stays as it was."""
    cfg, full = model.config, args.method == "full"
    all_sum = parallel.all_sum if world > 1 else None  # torchrun: balancing losses over the global batch
    aux_coef = args.perft_aux_coef if args.method == "perft-r" else (args.dmep_aux_coef if dmep_warm else 0.0)
    step_loss, step_aux, n_tokens = torch.zeros((), device=device), torch.zeros((), device=device), 0
    for ids, mask, labels in batches:  # no host sync inside the step: the numbers to log stay on the device
        n_tokens += int(mask.sum())  # still on the host
        ids, mask, labels = (data.to_device(t, device) for t in (ids, mask, labels))
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
            loss = loss + aux_coef * methods.router_balance_loss(model, mask, all_sum) / len(batches)
        if dmep_warm:
            dmep.track(model, mask, args.dmep_ema if args.dmep_util == "ema" else None)
        if args.z_coef > 0 and logits:
            loss = loss + args.z_coef * moe.router_z_loss(logits, mask, all_sum) / len(batches)
        if full and world > 1:
            loss = loss * world  # FSDP2 averages gradients over ranks; every term above is this rank's share
        loss.backward()
        methods.forget_router_logits(model)  # read above; kept, they would hold this graph
    if master:  # bf16 full training: the gradients move to the fp32 master copies
        for n, p in trainable.items():
            master[n].grad, p.grad = (None if p.grad is None else p.grad.float()), None
    parallel.sum_grads(params)  # replicated adapters: the gradient of the global batch on every rank
    grads = [p.grad for p in params if p.grad is not None]
    norm = (torch.nn.utils.clip_grad_norm_(params, args.grad_clip) if args.grad_clip > 0
            else torch.nn.utils.get_total_norm(grads))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    step_loss, step_aux = parallel.all_sum(step_loss), parallel.all_sum(step_aux)
    # the step's one host sync, before the optimizer step so that a bad step is never applied
    if not bool(torch.isfinite(step_loss) & torch.isfinite(norm)):
        names = {id(p): n for n, p in list(model.named_parameters()) + list((master or {}).items())}
        bad = checkpoint.first_non_finite((names.get(id(p), "?"), p.grad) for p in params if p.grad is not None)
        raise checkpoint.NonFiniteError(
            f"step {step + 1}: loss {float(step_loss)}, gradient norm {float(norm)} not finite"
            + (f" (first non-finite gradient: {bad})" if bad else "") + "; stopped before the optimizer step, "
            f"nothing written, the last checkpoint in {args.out} (if any) is unchanged")
    opt.step()
    opt.zero_grad(set_to_none=True)
    if master:
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(master[n])
    return float(step_loss), float(step_aux), int(parallel.all_sum(n_tokens))


if __name__ == "__main__":
    sys.exit(main())
