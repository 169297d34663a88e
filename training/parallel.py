"""parallel.py: several processes with PyTorch's own engine (torchrun + FSDP2), as train.py uses them.

    torchrun --nproc_per_node 4 train.py --model DIR --data train.jsonl --method sieve --batch-size 16 ...

- The frozen base is sharded with FSDP2 (`fully_shard` per transformer block, then the root); hub.load_model
  reads each tensor once and copies only the rows a rank holds, so no rank ever holds the whole model.
- The adapters are small: every rank keeps them whole (same seed, same init) and their gradients are
  summed over ranks before each step, so every rank takes the same optimizer step. In full training
  (--method full) FSDP2 shards the trained weights and reduces their gradients itself.
- Each global micro-batch is split over the ranks; losses are normalised by the global number of
  target tokens, so the curve is that of one process with the same global batch (up to float sums).
- Only rank 0 writes files. With one process (no torchrun) everything here is a no-op.
- cleanup really deletes the process group, so that none of its threads outlives Python (see cleanup).
"""
import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a rank waits in a collective for the others: generous, because on a loaded machine one rank may still
# be loading or writing a checkpoint while the other waits (NCCL's own default would be 10 minutes).
TIMEOUT = timedelta(minutes=30)
_mesh = None  # FSDP2's device mesh over all ranks, made by setup (cleanup takes the process group back from it)


def setup(device=None):
    """(rank, world size, device). Under torchrun: the process group (NCCL on CUDA, gloo on the CPU) and the
    one-dimensional device mesh over it that shard gives FSDP2 (the group itself, not a new one)."""
    global _mesh
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    # Imported before the group exists: torch.distributed.fsdp imports torch.distributed.nn.functional, whose
    # collectives take `group=group.WORLD` as a default argument, evaluated at import; imported after
    # init_process_group (by shard, or by torch._dynamo when the model is built on the meta device) those
    # defaults would hold the group for the life of the process (see cleanup).
    import torch.distributed.fsdp  # noqa: F401
    from torch.distributed.device_mesh import init_device_mesh
    cuda = torch.cuda.is_available() and device != "cpu"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    _mesh = init_device_mesh(dev.type, (world,))
    return dist.get_rank(), world, dev


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def shard(model):
    """FSDP2: every transformer block is its own unit (gathered for its forward and backward), then the root."""
    from torch.distributed.fsdp import fully_shard
    for block in model.model.layers:
        fully_shard(block, mesh=_mesh)
    fully_shard(model, mesh=_mesh)


def all_sum(x):
    """Sum a tensor or a number over the ranks: a new tensor on x's device, or a float. The sum runs on the
    backend's device (NCCL reduces CUDA tensors only, so a CPU count travels through the GPU and back)."""
    if world() == 1:
        return x
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = (x.detach() if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64)).to(dev, copy=True)
    dist.all_reduce(t)
    return t.to(x.device) if torch.is_tensor(x) else t.item()


def sum_grads(params):
    """Sum the gradients of whole (replicated) tensors over the ranks."""
    if world() > 1:
        for p in params:
            if p.grad is not None and type(p).__name__ != "DTensor":  # FSDP2 reduces its own shards
                dist.all_reduce(p.grad)


def _names(model):
    return [n for n, _ in model.named_parameters()]


def full_state(model, opt):
    """FSDP2 full training: the whole weights {name: tensor} and the optimizer state in opt.state_dict()'s own
    format (state keyed by parameter index), gathered onto rank 0's CPU; the other ranks get empty dicts.
    A collective: every rank calls it. The checkpoint is then the one a single process writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = _names(model)
    index = {n: i for i, n in enumerate(names)}
    weights = {n: msd[n] for n in names if n in msd}
    osd = dict(state={index[n]: s for n, s in osd.get("state", {}).items()},
               param_groups=[dict(g, params=[index[n] for n in g["params"]]) for g in osd.get("param_groups", [])])
    return weights, osd


def load_full_state(model, opt, weights, opt_state):
    """The inverse of full_state on every rank: whole tensors in, each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    names = _names(model)
    if sorted(weights) != sorted(names):
        raise ValueError(f"checkpoint: weights {sorted(set(names) ^ set(weights))[:3]} missing or unexpected")
    osd = dict(state={names[i]: s for i, s in opt_state["state"].items()},
               param_groups=[dict(g, params=[names[i] for i in g["params"]]) for g in opt_state["param_groups"]])
    set_state_dict(model, opt, model_state_dict=weights, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True, strict=False))  # strict=False: buffers not saved


def cleanup(ok=True):
    """Close the process group. After a run that ended well on this rank, first a barrier: no rank closes its
    connections while another still has a collective in flight. After an error, no barrier: the other ranks may
    be inside another collective, which a barrier would be paired with (a hang until TIMEOUT); closing this rank's
    connections instead makes their collective fail at once ("Connection closed by peer"), so torchrun exits.

    The group must really be deleted here, while Python is alive: its destructor lets gloo's worker threads
    finish and joins them. destroy_process_group only drops c10d's own references; FSDP2's device mesh holds
    the group too (mesh._pg_registry), and DTensor's caches (sharding propagation, redistribution plans) keep
    the mesh for the life of the process. A worker left alive releases each collective's tensors just after
    it has marked the collective done. If the main thread has meanwhile dropped such a tensor (its Python
    object is then owned by C++) and Python has begun to finalize, the worker takes the GIL to free that
    object, Python ends the thread with pthread_exit, and the unwinding through a noexcept destructor
    (~AsyncWork) aborts the process: "terminate called without an active exception", SIGABRT after a run
    that wrote everything, torchrun exit 1 (pytorch/pytorch#190489; notes/history.md has the backtrace).
    So: the mesh lets go of the group, the garbage collector frees the model's FSDP2 state (reference
    cycles, which hold the group as well), and destroy_process_group frees the last reference. After an
    error the traceback still holds the model and with it the group: the exit status is not 0 then anyway."""
    global _mesh
    if dist.is_initialized():
        if ok:
            dist.barrier()
        if _mesh is not None:
            # private: where the mesh keeps its groups in torch 2.11 .. 2.13; should a later torch keep them
            # elsewhere, test_distributed's test of this cleanup fails
            getattr(_mesh, "_pg_registry", {}).clear()
            _mesh = None
        gc.collect()
        dist.destroy_process_group()
