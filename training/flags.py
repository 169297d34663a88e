"""flags.py: train.py's flags, the papers' recipes, and every flag's range, checked before anything is loaded.

A recipe (--recipe NAME) sets the defaults of the run flags to one paper's setup; flags given on the command
line still win. The recipes live beside each method (sieve.RECIPE, perft.RECIPE, dmep.RECIPE: dicts keyed by
the flags' dest names, each value with its source).
"""
import argparse
import math
import os

import dmep
from files import hub
import perft
import sieve
import methods

# what defines a run: a checkpoint records them and --resume refuses other values (the rest may change: paths,
# devices, logging, checkpointing, --compile, --grad-checkpoint). --recipe is covered by the values it sets.
RUN_ARGS = ("method", "rank", "alpha", "rslora", "dropout", "sieve_frac", "sieve_k", "coverage_p",
            "budget_kmin", "adapter_act", "perft_experts", "perft_topk", "perft_shared", "perft_renorm", "perft_aux_coef",
            "perft_weights",
            "perft_init", "dmep_util", "calib_samples", "calib_seed", "calib_tokens",
            "dmep_experts", "dmep_topk", "dmep_targets", "dmep_warmup", "dmep_tau", "dmep_aux_coef", "dmep_ema",
            "lr", "weight_decay", "warmup", "schedule", "grad_clip", "epochs", "steps", "batch_size", "grad_accum",
            "seq_len", "pack", "loss_on", "eos", "aux_coef", "aux_per_layer", "z_coef", "seed", "dtype")

RECIPES = {"moe-sieve": sieve.RECIPE, "perft": perft.RECIPE, "dmep": dmep.RECIPE}


def build_parser(recipe_names):
    ap = argparse.ArgumentParser(prog="train.py", description="Fine-tune an MoE checkpoint with LoRA / MoE-Sieve / "
                                 "PERFT / DMEP.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = ap.add_argument
    # inputs and outputs
    hub.add_model_flags(ap, model="optional", dtype=False)  # --model, --device (--dtype below, with the system)
    add("--data", help="training .jsonl: {text} | {prompt, completion} | {query, choices, gold}")
    add("--out", default="runs/train", help="output directory (adapter, logs, summary, checkpoints)")
    add("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly where it stopped")
    add("--recipe", default=None, choices=recipe_names, help="defaults of the run flags from a paper's setup "
        "(flags given here still win)")
    # method
    add("--method", default="sieve", choices=methods.METHODS + ("full",),
        help="where the adapters go: attn = q/k/v/o; lora = + router, shared experts, dense MLPs, every routed "
        "expert; sieve = routed experts limited to the most-routed per layer; random / coverage / budget = its "
        "ablations; perft-* and dmep = routed adapters; full = train every weight (pretraining, --init-config)")
    add("--init-config", default=None, help="full: start from random weights of this config.json "
        "(its directory holds the tokenizer) instead of --model's weights")
    add("--rank", type=int, default=32, help="LoRA rank r")
    add("--alpha", type=float, default=None, help="LoRA alpha (None: 2 * rank); scale = alpha / r")
    add("--rslora", action="store_true", help="scale = alpha / sqrt(r) (rank-stabilised LoRA)")
    add("--dropout", type=float, default=0.05, help="dropout on the LoRA input")
    add("--sieve-frac", type=float, default=0.25, help="sieve/random/budget: experts per layer, fraction of E")
    add("--sieve-k", type=int, default=None, help="sieve/random/budget: experts per layer as a count")
    add("--coverage-p", type=float, default=0.6, help="coverage: share of each layer's routing to reach")
    add("--budget-kmin", type=int, default=1, help="budget: experts every layer gets before the greedy rest")
    # PERFT (routed adapters beside / inside the MoE block) and DMEP (LoRA-MoE with expert pruning)
    add("--adapter-act", default=methods.OPTIONS["act"], choices=list(perft.ACTS),
        help="PERFT expert B(act(A h)): identity = LoRA-style, silu/relu = bottleneck adapter")
    add("--perft-experts", type=int, default=methods.OPTIONS["perft_experts"], help="perft-r: adapter experts N")
    add("--perft-topk", type=int, default=methods.OPTIONS["perft_topk"], help="perft-r: adapter experts per token K")
    add("--perft-shared", type=int, default=methods.OPTIONS["perft_shared"], help="perft-d: always-on adapters M")
    add("--perft-renorm", default={v: k for k, v in methods.RENORM.items()}[methods.OPTIONS["perft_renorm"]],
        choices=list(methods.RENORM),
        help="perft-r: renormalise the top-K weights (base: as the base model's norm_topk_prob, PERFT's code)")
    add("--perft-weights", default=methods.OPTIONS["perft_weights"], choices=list(perft.WEIGHTS) + ["file"],
        help="perft-r: weight each chosen adapter by its own router's weight (own: paper, Mixtral file) or by the "
        "base router's top-K weight of its slot (base: PERFT's OLMoE file); file: as the base's public file")
    add("--perft-init", default=methods.OPTIONS["perft_init"], choices=list(perft.INITS),
        help="PERFT adapters: theirs = PERFT's code (A ~ N(0,1)*sqrt(2/r), B ~ N(0,1)*1e-6); kaiming = LoRA's (B = 0)")
    add("--perft-aux-coef", type=float, default=0.01, help="perft-r: load-balancing loss on its router")
    add("--dmep-experts", type=int, default=methods.OPTIONS["dmep_experts"], help="dmep: LoRA experts N per module")
    add("--dmep-topk", type=int, default=methods.OPTIONS["dmep_topk"], help="dmep: LoRA experts per token K")
    add("--dmep-targets", default=methods.OPTIONS["dmep_targets"],
        help="dmep: linears to wrap (attention names; 'dense' = shared experts and dense MLPs)")
    add("--dmep-warmup", type=float, default=0.2, help="dmep: fraction of steps before pruning")
    add("--dmep-tau", type=float, default=0.5, help="dmep: prune experts with utilization < tau / N")
    add("--dmep-aux-coef", type=float, default=0.01, help="dmep: load-balancing coefficient in warm-up")
    add("--dmep-util", default="stage", choices=["stage", "ema"],
        help="dmep: utilization = assignments counted over the whole first stage (the paper), or an EMA (--dmep-ema)")
    add("--dmep-ema", type=float, default=0.9, help="dmep: EMA decay per micro-batch, with --dmep-util ema")
    add("--calib", default=None, help="calibration .jsonl for the routing profile (None: --data)")
    add("--calib-samples", type=int, default=512, help="records of --calib to profile, drawn shuffled (None: all)")
    add("--calib-seed", type=int, default=123, help="seed of the calibration records' shuffle (MoE-Sieve's 123)")
    add("--calib-tokens", type=int, default=2048, help="calibration texts cut to this many tokens (MoE-Sieve's 2048)")
    add("--profile", default=None, help="use this profile JSON (router_profile.py) instead of profiling")
    # optimisation
    add("--lr", type=float, default=4e-4, help="peak learning rate (AdamW)")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    add("--warmup", type=float, default=0.03, help="linear warm-up, fraction of the steps")
    add("--schedule", default="cosine", choices=["cosine", "linear"],
        help="after the warm-up: cosine or linear decay to 0 (linear = HF's get_linear_schedule_with_warmup)")
    add("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    add("--epochs", type=float, default=1.0, help="passes over the data (ignored with --steps)")
    add("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    add("--batch-size", type=int, default=8, help="sequences per micro-batch")
    add("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    add("--seq-len", type=int, default=None, help="maximum tokens per sequence, longer examples cut and counted "
        "(None: 512, or the model's max_position_embeddings if that is less)")
    add("--allow-long-seq", action="store_true", help="allow --seq-len above the model's max_position_embeddings")
    add("--pack", action="store_true", help="pack examples into full rows (attention crosses examples)")
    add("--loss-on", default="answer", choices=["answer", "all"], help="prompt/completion and multiple-choice "
        "records: loss on the answer only, or on the whole formatted text (MoE-Sieve's trainer)")
    add("--eos", default="on", choices=["on", "off"], help="append EOS to each text / answer and train on it "
        "(on: PERFT's finetune.py; off: MoE-Sieve's trainer, which tokenises the formatted text alone)")
    add("--aux-coef", type=float, default=0.0, help="load-balancing loss coefficient (0: off)")
    add("--aux-per-layer", action="store_true", help="balance each layer on its own instead of pooled")
    add("--z-coef", type=float, default=0.0, help="router z-loss coefficient (0: off)")
    add("--seed", type=int, default=0, help="seed for data order, adapter init, dropout, random plan")
    # system
    add("--dtype", default="auto", choices=hub.DTYPES,
        help="frozen base dtype (auto: bfloat16 on CUDA, float32 on the CPU); adapters stay fp32")
    hub.add_quant_flags(ap)
    add("--plain", "--reference", action="store_true", help="run moe.py's plain code, not the fast twins (slow; for checking)")
    add("--grad-checkpoint", action="store_true", help="recompute each block in backward (less memory)")
    add("--compile", action="store_true", help="torch.compile each transformer block")
    add("--save-every", type=int, default=0, help="write OUT/checkpoint.pt every N steps (0: only at the end)")
    add("--stop-after", type=int, default=None, help="stop after this step (checkpointed); go on with --resume")
    add("--log-every", type=int, default=1, help="print a log line every N steps")
    # no training
    add("--dry-run", action="store_true", help="build on the meta device, print trainable params and the predicted "
        "GPU memory of a step (training/memory.py), exit")
    add("--gpu-memory", type=float, default=None, help="--dry-run: say whether the run fits a card of this many GiB "
        "(80 for an H100, 141 for an H200, 48, 24; default: the CUDA device, else those four)")
    add("--adapter", default=None, help="with --export-*: export this saved adapter, no training")
    add("--export-peft", action="store_true", help="also write OUT/peft in PEFT's layout")
    add("--export-merged", action="store_true", help="also write OUT/merged, a full merged checkpoint")
    return ap


def parse_args(argv):
    table = RECIPES
    ap = build_parser(sorted(table))
    first, _ = ap.parse_known_args(argv)
    if first.recipe:
        ap.set_defaults(**table[first.recipe])  # a default, so an explicit flag still wins
    args = ap.parse_args(argv)
    args.alpha = 2.0 * args.rank if args.alpha is None else args.alpha
    check_ranges(ap, args)
    check_paths(ap, args)
    return args


def inf_or(x):
    return "inf" if x == math.inf else f"{x:g}"


RANGES = {  # dest: (low, high, low included, high included); None: any value allowed (e.g. an unset option)
    "rank": (1, math.inf, True, False), "alpha": (0, math.inf, False, False), "dropout": (0, 1, True, False),
    "sieve_frac": (0, 1, False, True), "sieve_k": (1, math.inf, True, False), "coverage_p": (0, 1, False, True),
    "budget_kmin": (0, math.inf, True, False), "perft_experts": (1, math.inf, True, False),
    "perft_topk": (1, math.inf, True, False), "perft_shared": (1, math.inf, True, False),
    "perft_aux_coef": (0, math.inf, True, False), "dmep_experts": (1, math.inf, True, False),
    "dmep_topk": (1, math.inf, True, False), "dmep_warmup": (0, 1, True, False), "dmep_tau": (0, math.inf, True, False),
    "dmep_aux_coef": (0, math.inf, True, False), "dmep_ema": (0, 1, True, False),
    "calib_samples": (1, math.inf, True, False), "calib_tokens": (1, math.inf, True, False),
    "calib_seed": (0, math.inf, True, False), "lr": (0, math.inf, False, False),
    "weight_decay": (0, math.inf, True, False), "warmup": (0, 1, True, False), "grad_clip": (0, math.inf, True, False),
    "epochs": (0, math.inf, False, False), "steps": (1, math.inf, True, False), "batch_size": (1, math.inf, True, False),
    "grad_accum": (1, math.inf, True, False), "seq_len": (2, math.inf, True, False), "aux_coef": (0, math.inf, True, False),
    "z_coef": (0, math.inf, True, False), "seed": (0, math.inf, True, False), "save_every": (0, math.inf, True, False),
    "stop_after": (1, math.inf, True, False), "log_every": (1, math.inf, True, False),
    "gpu_memory": (0, math.inf, False, False)}


def check_ranges(ap, args):
    """Every numeric flag inside its range; the error names the flag, its value and the range (exit 2)."""
    for dest, (lo, hi, lo_in, hi_in) in RANGES.items():
        v = getattr(args, dest)
        if v is None:
            continue
        ok = math.isfinite(v) and (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)
        if not ok:
            rng = f"{'[' if lo_in else '('}{inf_or(lo)}, {inf_or(hi)}{']' if hi_in else ')'}"
            ap.error(f"--{dest.replace('_', '-')} {v}: must be in {rng}")
    for k, n in (("perft_topk", "perft_experts"), ("dmep_topk", "dmep_experts")):
        if getattr(args, k) > getattr(args, n):
            ap.error(f"--{k.replace('_', '-')} {getattr(args, k)}: must be at most --{n.replace('_', '-')} "
                     f"({getattr(args, n)})")
    unknown = set(args.dmep_targets.split(",")) - set(methods.ATTN + ("dense",))
    if unknown:
        ap.error(f"--dmep-targets: unknown {sorted(unknown)}; choose from {','.join(methods.ATTN + ('dense',))}")


def check_paths(ap, args):
    """The flags that name files: present, of the right kind, and the model's config against --seq-len."""
    if (args.export_peft or args.export_merged) and args.method not in methods.LORA_METHODS and not args.adapter:
        ap.error(f"--export-peft / --export-merged: {args.method} adapters depend on the input (their own routers "
                 "or per-expert outputs), so they cannot become PEFT LoRA or merged weights; use the adapter format")
    if args.init_config and args.method != "full":
        ap.error("--init-config goes with --method full")
    if args.init_config:
        args.model = args.model or os.path.dirname(os.path.abspath(args.init_config))
    if args.model is None:
        ap.error("--model is required (the embedded default job on the shipped model: python -m tools.study --default)")
    if args.data is None and not (args.dry_run or args.adapter):
        ap.error("--data is required (except with --dry-run or --adapter)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out {args.out}: exists and is not a directory")
    for flag in ("data", "calib", "profile"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            ap.error(f"--{flag} {path}: file not found")
    if not os.path.isdir(args.model):
        ap.error(f"--model {args.model}: model directory not found")
    try:
        cfg = hub.read_config(args.init_config or args.model)
    except (ValueError, OSError) as e:
        ap.error(f"--{'init-config' if args.init_config else 'model'}: {e}")
    if args.seq_len is None:
        args.seq_len = min(512, cfg.max_position_embeddings)
    if args.seq_len > cfg.max_position_embeddings and not args.allow_long_seq:
        ap.error(f"--seq-len {args.seq_len}: longer than the model's max_position_embeddings "
                 f"({cfg.max_position_embeddings}); use a shorter --seq-len, or --allow-long-seq to train beyond it")
    if args.sieve_k is not None and args.sieve_k > cfg.num_experts:
        ap.error(f"--sieve-k {args.sieve_k}: must be in [1, {cfg.num_experts}] (the model's experts per layer)")
