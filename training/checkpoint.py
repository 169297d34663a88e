"""checkpoint.py: what train.py writes so that a run can stop and go on exactly, and the guards that keep a bad
state from ever being written.

A checkpoint is a pair in the run's output directory:
    checkpoint-<step>.safetensors   the trained tensors (the adapter, or every weight with --method full)
    checkpoint.pt                   everything else: step, run arguments, optimizer state, RNG states, log, the
                                    adapter config; written last and naming its tensor file, so a run killed
                                    between the two writes resumes from the previous pair.
checkpoint.pt holds only tensors, numbers, strings, lists and dicts, and is read with torch.load(weights_only=True):
a file that tries to build any other Python object is refused, so reading a checkpoint cannot run code.
"""
import json
import os
import shlex
import signal
import sys
import threading

import torch
from safetensors.torch import load_file

import dmep
import methods
from files import atomic
from training import parallel

KEYS = ("step", "weights", "args", "optimizer", "rng", "log", "adapter_config")  # what resume needs


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed from: unreadable, not ours, or made with other run arguments."""


class NonFiniteError(RuntimeError):
    """A NaN or inf where training needs finite numbers (loaded weights, a loss, a gradient)."""


def write_log(path, log):
    """log.jsonl (one JSON line per step) as the checkpoint's log has it; the loop appends from there."""
    atomic.write_text(path, "".join(json.dumps(e) + "\n" for e in log))


def save(out, step, model, opt_state, weights, meta):
    """Write the pair for `step`, then remove the previous pair's tensors. weights None: the model's adapter."""
    bad = first_non_finite((weights or methods.adapter_state(model)).items())
    if bad:  # the loop stops before a non-finite step, so this is a last guard: the previous pair stays
        raise NonFiniteError(f"step {step}: {bad} is not finite; checkpoint not written")
    name = f"checkpoint-{step}.safetensors"
    methods.save_adapter_tensors(model, os.path.join(out, name), weights)
    state = dict(meta, step=step, weights=name, optimizer=opt_state)
    atomic.write(os.path.join(out, "checkpoint.pt"), lambda t: torch.save(state, t))
    for f in os.listdir(out):
        if f.startswith("checkpoint-") and f.endswith(".safetensors") and f != name:
            os.remove(os.path.join(out, f))


def load(path):
    """checkpoint.pt as a dict; ResumeError naming the file if it is missing, cut short, or not only data."""
    if not os.path.isfile(path):
        raise ResumeError(f"--resume: {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (an object other than data), RuntimeError (a cut zip), ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ResumeError(f"--resume: {path} is not a readable train.py checkpoint "
                          f"({type(e).__name__}: {first[:200]})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in KEYS):
        missing = [k for k in KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        raise ResumeError(f"--resume: {path} is not a train.py checkpoint (missing {', '.join(missing)})")
    return ckpt


def check_run_args(ckpt, args, path):
    """The arguments that define a run (adapter, data order, lr curve, when DMEP prunes) must not change."""
    changed = [k for k, v in ckpt["args"].items() if getattr(args, k, v) != v]
    if changed:
        raise ResumeError(f"--resume: {path} was made with other values of " + ", ".join(
            f"--{k.replace('_', '-')} ({ckpt['args'][k]!r}, now {getattr(args, k)!r})" for k in changed))
    if args.stop_after is not None and args.stop_after <= ckpt["step"]:
        raise ResumeError(f"--stop-after {args.stop_after}: the checkpoint is already at step {ckpt['step']}")


def restore(args, ckpt, model, opt, state, master, device, world):
    """Load a checkpoint's tensors, optimizer state, RNG states and log; (start step, log)."""
    weights_path = os.path.join(args.out, ckpt["weights"])
    if args.method == "full" and world > 1:  # whole tensors from the file, each rank keeps its shards
        parallel.load_full_state(model, opt, load_file(weights_path), ckpt["optimizer"])
    else:
        methods.load_adapter_tensors(model, weights_path, master or state)
        if master:
            with torch.no_grad():
                for n, p in state.items():
                    p.copy_(master[n])
        opt.load_state_dict(ckpt["optimizer"])
    check_finite((master or state).items(), weights_path)
    torch.set_rng_state(ckpt["rng"])
    if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ckpt["cuda_rng"])
    for n, m in dmep.modules(model):
        m.util.copy_(ckpt["dmep_util"][n])
    print(f"resumed at step {ckpt['step']}")
    return ckpt["step"], ckpt["log"]


def first_non_finite(named):
    """The name of the first tensor with a NaN or inf in it, or None. Sharded (DTensor) tensors: this rank's part."""
    for name, t in named:
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_finite(named, what):
    """Refuse non-finite values in loaded tensors, naming the tensor (a collective under torchrun: all ranks
    raise together, none waits for the others)."""
    bad = first_non_finite(named)
    if parallel.all_sum(int(bad is not None)):
        where = f"tensor {bad!r}" if bad else "a tensor on another process"
        raise NonFiniteError(f"{what}: {where} holds NaN or inf values; refusing to train on it")


def resume_command(argv, world):
    """The command line that continues this run: the same flags and --resume, without --stop-after."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--stop-after":
            skip = True
        elif not a.startswith("--stop-after="):
            out.append(a)
    if "--resume" not in out:
        out.append("--resume")
    launcher = f"torchrun --nproc_per_node {world}" if world > 1 else shlex.quote(sys.executable)
    return f"{launcher} {shlex.quote(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'train.py'))} " \
           + " ".join(shlex.quote(a) for a in out)


class Interrupts:
    """While active, SIGINT and SIGTERM only raise a flag: the loop finishes its step, checkpoints and returns
    128 + the signal's number (130, 143). A second signal stops at once (KeyboardInterrupt)."""

    def __enter__(self):
        self.signum, self.old = None, {}
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            self.old = {s: signal.signal(s, self._catch) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _catch(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def pending(self):
        """Whether to stop now; under torchrun all ranks agree (one gets the signal, all stop at the same step)."""
        if parallel.world() > 1:
            stop = parallel.all_sum(int(self.signum is not None)) > 0
            if stop and self.signum is None:
                self.signum = signal.SIGTERM
            return stop
        return self.signum is not None

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False
