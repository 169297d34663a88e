"""parallel.py: several processes with PyTorch's own engine (torchrun + FSDP2), as train.py uses them.

    torchrun --nproc_per_node 4 train.py --model DIR --data train.jsonl --method sieve --batch-size 16 ...

- The frozen base is sharded with FSDP2 (`fully_shard` per transformer block, then the root); moe.load_model
  reads each tensor once and copies only the rows a rank holds, so no rank ever holds the whole model.
- The adapters are small: every rank keeps them whole (same seed, same init) and their gradients are
  summed over ranks before each step, so every rank takes the same optimizer step. In full training
  (--method full) FSDP2 shards the trained weights and reduces their gradients itself.
- Each global micro-batch is split over the ranks; losses are normalised by the global number of
  target tokens, so the curve is that of one process with the same global batch (up to float sums).
- Only rank 0 writes files. With one process (no torchrun) everything here is a no-op.
"""
import os

import torch
import torch.distributed as dist


def setup(device=None):
    """(rank, world size, device). Under torchrun: the process group (NCCL on CUDA, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    cuda = torch.cuda.is_available() and device != "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    return dist.get_rank(), world, dev


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def shard(model):
    """FSDP2: every transformer block is its own unit (gathered for its forward and backward), then the root."""
    from torch.distributed.fsdp import fully_shard
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)


def all_sum(x):
    """Sum a tensor (in place) or a number over the ranks."""
    if world() == 1:
        return x
    t = x if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64)
    dist.all_reduce(t)
    return t if torch.is_tensor(x) else t.item()


def sum_grads(params):
    """Sum the gradients of whole (replicated) tensors over the ranks."""
    if world() > 1:
        for p in params:
            if p.grad is not None and type(p).__name__ != "DTensor":  # FSDP2 reduces its own shards
                dist.all_reduce(p.grad)


def cleanup():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
