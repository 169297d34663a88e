"""targets.py: issue 6's speed targets, judged on bench.py's rows, and the runs they were set for.

The targets (set for the OLMoE-1B-7B shape, r 16, batch 4 x 2048 and the fit at 8 x 2048; Mixtral-8x7B at
1 x 2048 with gradient checkpointing on an H200; all on an H100/H200-class GPU):
- our `lora` at least 2.5x transformers + peft's tok/s (`peft-lora`), at most 0.6x its peak memory;
- `lora` at 8 x 2048 within 80 GB;
- the time the sieve's expert LoRA adds over `attn` at most 0.6x the time full LoRA's adds;
- `attn` at least 35% of the practical 800 TFLOP/s ceiling of an H100/H200 (model FLOPs, see bench.py);
- Mixtral-8x7B `lora` at least 2x the 1,897 tok/s transformers + peft reached on one H200.
Anywhere else (another shape, the CPU, another GPU) the same ratios are computed with no verdict: a ratio on a
tiny CPU model says nothing about the target.
"""
import json
import os
import platform

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
OLMOE = os.path.join(ROOT, "tests", "data", "configs", "olmoe-1b-7b-0924", "config.json")
MIXTRAL = os.path.join(ROOT, "tests", "data", "configs", "mixtral-8x7b-v0.1", "config.json")
MIXTRAL_PEFT_TOK_S = 1897.0  # transformers + peft, Mixtral-8x7B, 1 x 2048, grad checkpoint, one H200 (issue 6)


def judge_targets(rows, flop, tokens, cuda, shape="olmoe", verdict=True):
    """Issue 6's targets on this run's rows, each one the rows allow: what, value, limit, met (None: no verdict,
    the run is not the shape or device the target was set for). shape: "olmoe" or "mixtral", the target set."""
    ok = {r["method"]: r for r in rows if r["status"] == "ok"}
    if shape == "mixtral":
        out = [("lora tok/s (transformers + peft: 1,897)", ok["lora"]["tok_s"], "at least", 2 * MIXTRAL_PEFT_TOK_S)
               ] if "lora" in ok else []
    else:
        out = olmoe_targets(rows, ok, flop, tokens, cuda)
    met = lambda v, bound, lim: v is not None and (v >= lim if bound == "at least" else v <= lim)
    return [dict(target=what, value=v, limit=f"{bound} {lim:.4g}", met=met(v, bound, lim) if verdict else None)
            for what, v, bound, lim in out]


def olmoe_targets(rows, ok, flop, tokens, cuda):
    """(what, value, "at least" or "at most", limit) for each OLMoE target the rows allow. Memory and the FLOP
    ceiling (the practical 800 TFLOP/s of an H100/H200) only on CUDA."""
    out = []
    if "lora" in ok and "peft-lora" in ok:
        out.append(("lora tok/s / peft-lora tok/s", ok["lora"]["tok_s"] / ok["peft-lora"]["tok_s"], "at least", 2.5))
        if cuda:
            out.append(("lora peak / peft-lora peak", ok["lora"]["peak_gib"] / ok["peft-lora"]["peak_gib"], "at most", 0.6))
    oom = any(r["method"] == "lora" and r["status"] == "OOM" for r in rows)
    if cuda and tokens >= 8 * 2048 and ("lora" in ok or oom):  # out of memory: value None, not met
        out.append((f"lora peak GiB at {tokens} tokens (80 GB)", None if oom else ok["lora"]["peak_gib"],
                    "at most", 80e9 / 2**30))
    extra = lambda m: ok[m]["step_s"] - ok["attn"]["step_s"]  # the time expert LoRA adds over attention-only
    if {"attn", "lora", "sieve"} <= set(ok) and extra("lora") > 0:
        out.append(("sieve's expert-LoRA time / lora's", extra("sieve") / extra("lora"), "at most", 0.6))
    if cuda and "attn" in ok:
        out.append(("attn tok/s x FLOP/token / 800 TFLOP/s", ok["attn"]["tok_s"] * flop / 800e12, "at least", 0.35))
    return out


def device_info(device):
    """What the verdicts need to know of the device, as plain data (gpu_check.py's summary reads it from a file)."""
    if device.type != "cuda":
        return dict(type=device.type, name=platform.processor() or device.type, capability=None, gib=None)
    p = torch.cuda.get_device_properties(device)
    return dict(type="cuda", name=p.name, capability=[p.major, p.minor], gib=p.total_memory / 2**30)


def verdict_scope(args, cdict, gpu):
    """(target set, why no verdict): the set is "olmoe", "mixtral" or None by the run's shape; the reason is None
    when this run is the shape and device issue 6's targets were set for."""
    def same(path):
        with open(path) as f:
            return cdict == json.load(f)
    shape = None
    if args.rank == 16 and args.seq == 2048:
        if args.batch in (4, 8) and same(OLMOE):
            shape = "olmoe"
        elif args.batch == 1 and args.grad_checkpoint and same(MIXTRAL):
            shape = "mixtral"
    if shape is None:
        return None, "the targets are set for OLMoE-1B-7B at r 16, 4 or 8 x 2048 (Mixtral-8x7B: 1 x 2048, grad checkpoint)"
    if gpu["type"] != "cuda" or gpu["capability"][0] != 9:
        return shape, "the targets are set for an H100/H200-class GPU (sm90)"
    if shape == "mixtral" and gpu["gib"] < 120:
        return shape, "the Mixtral target was set on an H200 (141 GB)"
    return shape, None


def format_targets(targets, why_not):
    out = ["issue 6's targets on this run" + (f" (no verdict: {why_not})" if why_not else "") + ":"] if targets else []
    for t in targets:
        value = "OOM" if t["value"] is None else f"{t['value']:.3g}"
        verdict = "no verdict" if t["met"] is None else "met" if t["met"] else "NOT met"
        out.append(f"target: {t['target']} = {value} ({t['limit']}): {verdict}")
    return "\n".join(out)
