"""memory.py: the GPU memory a phase of a run holds at its peak, predicted on the CPU before any weight is read
(train.py --dry-run prints it; tools/memory.py covers the other phases, transformers + peft, the README's table).

The project's own code runs on fake tensors (torch's FakeTensorMode: every tensor has its shape, dtype, strides
and a storage of the right size, but no data and no arithmetic): moe.Transformer, methods.attach through
train.py's attach_adapters, train.py's make_optimizer and train_step, router_profile.profile. memcount.py's
LiveBytes counts the live storages; its peak is what torch.cuda.max_memory_allocated() reports for the same
phase, up to what no tensor holds (below). Autograd runs for real on fake tensors, so what it keeps for
backward, what --grad-checkpoint recomputes and when each gradient is freed are torch's own. Where CUDA runs
another path than the CPU (attention, RMSNorm's backward, AdamW's foreach step) memcount.cuda_like and
first_step stand in; everything else is the code a GPU runs: bf16 base weights, fp32 adapters and AdamW
state, moe_fast.py's grouped expert products and custom autograd Functions, the chunked loss.

A base stored otherwise than in `dtype` (--quantize nf4: packed 4-bit codes, 0.5 byte a weight, and their
scales) is counted as its own code stores it: the function that converts a built model (stored_as_loaded,
then step_peak's attach; profile_peak's prepare) runs on the fake model too, and every storage it leaves is a
weight.

Assumed, since fake tensors have no values: every micro-batch is full (batch x seq real, labelled tokens); an
expert LoRA on some experts gets its layer's share of the routing (routed_shares: the plan's share of the
profile's counts, or m / E: uniform, as a dry run's profile is).

The split at the peak: weights (the frozen base, buffers; the model itself in full training), adapters (the
trainable tensors), gradients, optimizer (AdamW's moments, fp32 master copies), activations (made inside a
module's forward, or its recomputation under --grad-checkpoint, alive at the peak) and temporaries (made by
the backward pass or the optimizer step: activation gradients, kernel scratch).

Not counted, because no tensor holds it: the CUDA context (about 0.5 GiB, outside the allocator), cuBLAS and
cuDNN workspaces, the allocator's cached but free blocks (fragmentation: reserved runs ahead of allocated),
NCCL buffers under torchrun, and CUDA kernels' own scratch other than attention's (sort, topk, nonzero).
A card "fits" when the peak is at most FIT of its memory, leaving the rest for those.
"""
import torch
from torch.utils.weak import WeakIdKeyDictionary

from files import hub
import lora
import moe
import quant
import router_profile
from training.memcount import BLOCK, KINDS, LiveBytes, building, running
import methods

FIT = 0.9  # a card fits a run whose predicted peak is at most 90% of its memory (see the docstring)
CARDS = (24, 48, 80, 141)  # GiB of the usual cards: RTX 4090, L40S / A6000, A100 / H100, H200
GiB = 2**30


# ----------------------------------------------------------------------------- the model and its inputs

def new_model(cfg, dtype, mode):
    """A moe.Transformer of cfg with its weights in dtype (RoPE's frequencies fp32), on fake tensors under
    `mode` (memcount.running's), or real ones (mode None) with transformers' random init."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with building(mode):
            model = moe.Transformer(cfg)
    finally:
        torch.set_default_dtype(default)
    if mode is None:
        with torch.no_grad():  # a measurement on real tensors: the experts are torch.empty until loaded
            for name, p in model.named_parameters():
                p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    return model


def token_batch(cfg, batch, seq):
    """(ids, mask, labels) of batch x seq tokens, all real and labelled; varied ids (real tensors route by them)."""
    ids = (torch.arange(batch * seq) * 7919 % cfg.vocab_size).view(batch, seq)  # (B, T)
    return ids, torch.ones_like(ids), ids.roll(-1, dims=1)


def routed_shares(model, profile=None):
    """{each ExpertLoRA's adapted mask (E,): the share of its layer's (token, slot) pairs routed to its experts}:
    their share of the profile's counts for the layer, or, without counts, m / E (uniform routing)."""
    shares = WeakIdKeyDictionary()
    layers = (profile or {}).get("layers", [])
    for i, block in enumerate(model.model.layers):
        adapter = getattr(getattr(block.mlp, "experts", None), "adapter", None)
        if not isinstance(adapter, lora.ExpertLoRA):
            continue
        counts = profile["counts"][layers.index(i)] if i in layers else None
        share = sum(counts[e] for e in adapter.ids) / sum(counts) if counts and sum(counts) else len(adapter.ids) / adapter.E
        shares[adapter.adapted] = share
    return shares


# ----------------------------------------------------------------------------- the phases train.py runs

def stored_as_loaded(args, dtype):
    """prepare(model) that stores the fake base as hub.load_model stores the loaded one under --quantize (codes
    left empty), or None without --quantize: every phase is measured on the base as the run will hold it."""
    q = hub.quantize_args(args)
    return (lambda m: quant.quantize(m, q[0], dtype, q[1], q[2], fill=False)) if q else None


def step_peak(args, cfg, attach, make_optimizer, train_step, cuda=True, fake=True):
    """The peak of one optimizer step of train.py with flags `args` (its parsed Namespace) on a model of cfg:
    attach(model) -> (adapter_config, plan, profile) places the adapters (train.attach_adapters), then
    train.py's make_optimizer and train_step run as train.py calls them, on its --batch-size x --seq-len
    tokens (two micro-batches with --grad-accum: gradients then exist during the second one). AdamW's state
    is made first (a step on zero gradients), so the step measured is any step after the first."""
    dtype = run_dtype(args, cuda)
    with running(cuda, fake) as mode:
        model = new_model(cfg, dtype, mode)
        with building(mode):
            if prepare := stored_as_loaded(args, dtype):
                prepare(model)
            _, _, prof = attach(model)
        full = args.method == "full"
        state = dict(model.named_parameters()) if full else methods.adapter_state(model)  # as train.py
        opt, master = make_optimizer(args, state, dtype)
        params = list(master.values()) if master else list(state.values())
        first_step(opt, params, cuda)
        model.grad_checkpoint = args.grad_checkpoint
        model.train()
        live = LiveBytes(BLOCK if cuda else 1, routed_shares(model, prof))
        live.hold_model(model, list(state.values()), opt, master, "weights" if full else "adapters")
        batches = [token_batch(cfg, args.batch_size, args.seq_len)] * min(args.grad_accum, 2)
        with live:
            train_step(args, model, opt, state, master, params, batches, 1, 0, args.method == "dmep",
                       torch.device("cpu"), 1)
    return dict(live.result(), shares=sorted(set(live.shares.values())))


def first_step(opt, params, cuda=True):
    """AdamW as a step after the first: its state made by a step on zero gradients, which are then dropped;
    on CUDA its foreach implementation, the default there (the CPU's is the loop over tensors)."""
    if cuda:
        for group in opt.param_groups:
            group["foreach"] = True
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def profile_peak(cfg, dtype, batch, seq, batches=2, cuda=True, fake=True, prepare=None):
    """The peak of router_profile.profile over `batches` calibration batches of batch x seq tokens, on the
    base as train.py profiles it (before the adapters: its weights still require gradients). prepare(model):
    what is done to the base once built (as step_peak's attach)."""
    with running(cuda, fake) as mode:
        model = new_model(cfg, dtype, mode)
        if prepare is not None:
            with building(mode):
                prepare(model)
        live = LiveBytes(BLOCK if cuda else 1)
        live.hold_model(model)
        ids, mask, _ = token_batch(cfg, batch, seq)
        with live:
            router_profile.profile(model, [(ids, mask)] * batches)
    return live.result()


def run_dtype(args, cuda=True):
    """The base dtype of the run predicted: --dtype, or what "auto" picks there (bfloat16 on CUDA)."""
    return hub.pick_dtype(args.dtype, "cuda" if cuda else "cpu")


# ----------------------------------------------------------------------------- the dry run's report

def gib(n):
    return n / GiB


def split_line(split):
    return ", ".join(f"{k} {gib(split[k]):.2f}" for k in KINDS) + " GiB"


def fits(peak, card_gib):
    return peak <= FIT * card_gib * GiB


def card_line(peak, cards):
    """Which of `cards` {name: GiB} the peak fits (at most FIT of each card's memory)."""
    yes = [n for n, g in cards.items() if fits(peak, g)]
    no = [n for n, g in cards.items() if not fits(peak, g)]
    said = ([f"fits {', '.join(yes)}"] if yes else []) + ([f"does not fit {', '.join(no)}"] if no else [])
    return "; ".join(said) + f" (fits: the predicted peak is at most {FIT:.0%} of the card's memory)"


def dry_run_report(args, cfg, device, attach, make_optimizer, train_step):
    """The lines train.py --dry-run prints: the predicted peak of a training step and its split, the routing
    profile's before it (methods with a plan, without --profile), and the cards it fits: --gpu-memory's, the
    CUDA device's, or else the usual sizes."""
    try:
        step = step_peak(args, cfg, attach, make_optimizer, train_step)
        prof = None
        if args.method in ("sieve", "random", "coverage", "budget") and not args.profile:
            prof = profile_peak(cfg, run_dtype(args), args.batch_size, args.calib_tokens,
                                prepare=stored_as_loaded(args, run_dtype(args)))
    except Exception as e:  # an op fake tensors cannot run: say so, not a traceback
        raise RuntimeError(f"--dry-run: the memory estimate failed ({type(e).__name__}: {e})") from None
    peak = max(step["peak"], prof["peak"] if prof else 0)
    accum = f"{args.grad_accum} micro-batches of " if args.grad_accum > 1 else ""
    lines = [f"memory (predicted for CUDA, {str(run_dtype(args)).removeprefix('torch.')} base; training/memory.py): "
             f"one step of {accum}{args.batch_size} x {args.seq_len} tokens"
             f"{', grad checkpoint' if args.grad_checkpoint else ''}: {split_line(step['split'])}"]
    shares = step["shares"]
    if shares and min(shares) < 1:
        span = f"{shares[0]:.1%}" if len(shares) == 1 else f"{shares[0]:.1%} to {shares[-1]:.1%}"
        lines.append(f"  rows routed to the adapted experts: {span} of each layer's (token, slot) pairs "
                     f"({'the profile' if args.profile else 'uniform routing; --profile gives the real share'})")
    if prof:
        lines.append(f"  routing profile before training ({args.batch_size} x {args.calib_tokens} tokens a batch): "
                     f"{gib(prof['peak']):.2f} GiB")
    if args.plain or args.compile:
        lines.append("  (predicted for the eager fast path: --reference's plain code and --compile's graphs are not modelled)")
    lines.append(f"predicted peak: {gib(peak):.2f} GiB")
    if args.gpu_memory:
        cards = {f"{args.gpu_memory:g} GiB (--gpu-memory)": args.gpu_memory}
    elif device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        cards = {f"{props.name} ({gib(props.total_memory):.1f} GiB)": gib(props.total_memory)}
    else:
        cards = {f"{g} GiB": g for g in CARDS}
    lines.append(card_line(peak, cards))
    return lines

