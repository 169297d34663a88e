"""memcount.py: how training/memory.py counts GPU memory on the CPU: LiveBytes, a dispatch mode that counts
live storages on fake tensors, and CUDA's kernels modelled by the memory they hold where the CPU would run others.

LiveBytes counts each storage an op makes, rounded up to the CUDA caching allocator's 512-byte blocks, from
that op until the storage is freed (a weakref callback), by kind (KINDS), and keeps the split at the peak.
torch's tracker of the same kind (torch.distributed._tools.mem_tracker.MemTracker, torch 2.11 and 2.13) does
not fit: it hooks the gradient of every parameter of each module it sees, which raises on a frozen one
("cannot register a hook on a tensor that doesn't require gradient"), and it refuses a second call of the
root module, which the profile and evaluation make once per batch.

On fake tensors (FakeTensorMode: shapes, dtypes, strides and storages, no data) the few ops that read values
get a fixed answer (LiveBytes.fake_value): a host read (a token count, the finite check) reads 1 or True;
`nonzero` and boolean indexing keep every row (every token real, every position labelled), except the rows
routed to an expert LoRA's experts (lora_fast.expert_lora_prepare: `adapted[expert]`), which keep that layer's
share (`shares`); bincount returns minlength zeros.

Fake tensors are CPU tensors (torch without CUDA cannot run autograd on fake CUDA ones), so where CUDA runs
another path than the CPU, cuda_like stands in:
- attention (cuda_sdpa): torch's CUDA choice, flash, else memory-efficient, else math, as its sdp_utils
  orders them (cuDNN after math). Flash and memory-efficient attention are AttentionModel: they keep q, k, v,
  the output and the fp32 log-sum-exp of each row, never T x T scores; their backward makes dq, dk, dv and
  their fp32 scratch (the dq accumulator, the row sums; with grouped kv heads dk and dv at the query heads'
  width first). Math attention (a mask with grouped kv heads: memory-efficient attention has no GQA) runs
  torch's own math decomposition, its T x T fp32 scores included.
- moe_fast.RMSNormFn takes its CUDA branch (fake tensors answer is_cuda True): the fused backward, which makes
  the input's gradient and nothing else (the CPU's formula makes fp32 copies of the rows).
(AdamW's foreach implementation, CUDA's default, is memory.first_step's.)
"""
import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten
KINDS = ("weights", "adapters", "gradients", "optimizer", "activations", "temporaries")
BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of 512 bytes


# ----------------------------------------------------------------------------- counting live storages

class LiveBytes(TorchDispatchMode):
    """The bytes of every live storage by kind (KINDS) and the split at the peak. Storages that exist before
    (the model, the optimizer's state) are registered with hold_model. On fake tensors it also answers the ops
    that need values (module docstring); `shares` {an ExpertLoRA's adapted mask: its share of the rows}."""

    def __init__(self, block=BLOCK, shares=None):
        super().__init__()
        self.block, self.shares = block, shares if shares is not None else WeakIdKeyDictionary()
        self.records = WeakIdKeyDictionary()  # storage -> [kind, bytes, weakref with the callback that frees it]
        self.mask_share = WeakIdKeyDictionary()  # a routed mask (a tensor) -> its share of True
        self.now, self.total, self.peak = dict.fromkeys(KINDS, 0), 0, 0
        self.at_peak = dict(self.now)
        self.depth, self.in_optimizer, self.handles = 0, False, []

    def hold(self, t, kind):
        st = t.untyped_storage()
        size = -(-st.nbytes() // self.block) * self.block
        rec = self.records.get(st)
        if rec is None:
            rec = [kind, 0, None]
            rec[2] = weakref.ref(st, lambda _, rec=rec: self._free(rec))
            self.records[st] = rec
        self.now[rec[0]] += size - rec[1]  # a new storage, or one resized in place
        self.total += size - rec[1]
        rec[1] = size

    def _free(self, rec):
        self.now[rec[0]] -= rec[1]
        self.total -= rec[1]

    def retag(self, t, kind):
        rec = self.records.get(t.untyped_storage())
        if rec is None:
            return self.hold(t, kind)
        self.now[rec[0]] -= rec[1]
        self.now[kind] += rec[1]
        rec[0] = kind

    def hold_model(self, model, trainable=(), optimizer=None, master=None, trainable_kind="adapters"):
        """Register what exists before the phase: parameters (trainable ones as `trainable_kind`), buffers,
        the optimizer's state and master copies; and tag each trainable tensor's gradient once it is made."""
        ids = {id(p) for p in trainable}
        for p in model.parameters():
            self.hold(p, trainable_kind if id(p) in ids else "weights")
        for b in model.buffers():
            self.hold(b, "weights")
        for t in tree_leaves([list(optimizer.state.values()) if optimizer else [], list((master or {}).values())]):
            if isinstance(t, torch.Tensor):
                self.hold(t, "optimizer")
        for p in trainable:
            self.handles.append(p.register_post_accumulate_grad_hook(lambda p: self.retag(p.grad, "gradients")))

    def reset_peak(self):
        self.peak, self.at_peak = self.total, dict(self.now)

    def result(self):
        return dict(peak=self.peak, split=dict(self.at_peak))

    # -- what is being made now: activations inside a module's forward (also its recomputation in backward)
    def kind(self):
        return "activations" if self.depth and not self.in_optimizer else "temporaries"

    def __enter__(self):
        mm = torch.nn.modules.module
        self.handles += [mm.register_module_forward_pre_hook(lambda *a: self._forward(1)),
                         mm.register_module_forward_hook(lambda *a: self._forward(-1)),
                         register_optimizer_step_pre_hook(lambda o, *a: self._optimizer(o, True)),
                         register_optimizer_step_post_hook(lambda o, *a: self._optimizer(o, False))]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return super().__exit__(*exc)

    def _forward(self, step):
        self.depth += step

    def _optimizer(self, opt, starting):
        self.in_optimizer = starting
        for p in (p for g in opt.param_groups for p in g["params"]):
            if starting and p.grad is not None:  # bf16 full training's fp32 master gradients among them
                self.retag(p.grad, "gradients")
            if not starting:
                for t in opt.state.get(p, {}).values():
                    if isinstance(t, torch.Tensor):
                        self.retag(t, "optimizer")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fake = any(isinstance(t, FakeTensor) for t in tree_leaves(args))
        out = self.fake_value(func, args, kwargs) if fake and func in VALUE_OPS else func(*args, **kwargs)
        kind = self.kind()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.hold(t, kind)
        if func is aten.index.Tensor and args[0] in self.shares:
            self.mask_share[out] = self.shares[args[0]]  # adapted[expert of each row]: the rows of adapted experts
        if self.total > self.peak:
            self.reset_peak()
        return out

    def fake_value(self, func, args, kwargs):
        """The ops whose result depends on values, answered without them (module docstring)."""
        t = args[0]
        if func is aten._local_scalar_dense.default:
            return True if t.dtype == torch.bool else 1.0 if t.is_floating_point() else 1
        if func is aten.nonzero.default:
            rows = round(t.numel() * self.mask_share.get(t, 1.0))
            return t.new_empty((rows, t.dim()), dtype=torch.long)
        if func is aten.bincount.default:
            weights = args[1] if len(args) > 1 else kwargs.get("weights")
            minlength = args[2] if len(args) > 2 else kwargs.get("minlength", 0)
            return t.new_zeros(max(minlength, 1), dtype=torch.long if weights is None else weights.dtype)
        indices = []  # aten.index.Tensor: a boolean mask becomes the long indices of its true entries
        for i in args[1]:
            if i is not None and i.dtype == torch.bool:
                indices += self.fake_value(aten.nonzero.default, (i,), {}).unbind(1)
            else:
                indices.append(i)
        return func(t, indices)


VALUE_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.bincount.default, aten.index.Tensor}


# ----------------------------------------------------------------------------- CUDA's attention, as it holds memory

def _round(n, m):
    return -(-n // m) * m


class AttentionModel(torch.autograd.Function):
    """Flash (FlashAttention-2) or memory-efficient attention as CUDA runs them, by the memory they hold: the
    output in the query's layout, the fp32 log-sum-exp per row (flash: T; memory-efficient: T rounded up to
    32, only when a gradient is needed), q, k, v and those two kept for backward; no T x T scores. Backward:
    dq, dk, dv, with the fp32 dq accumulator (B, T rounded to 128, H, S rounded to 32) and row sums (B, H, T
    rounded) as scratch, and, with fewer kv heads than query heads, dk and dv at the query heads' width first.
    `bias`: the additive mask the memory-efficient kernel reads (held by the caller). No values are computed."""

    @staticmethod
    def forward(ctx, q, k, v, flash):
        B, H, T, _ = q.shape
        out = torch.empty_like(q)  # (B, H, T, S) in q's memory layout, as the kernels allocate it
        rows = T if flash else (_round(T, 32) if ctx.needs_input_grad[0] else 0)
        lse = q.new_empty((B, H, rows), dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        B, H, T, S = q.shape
        scratch = [q.new_empty((B, _round(T, 128), H, _round(S, 32)), dtype=torch.float32),
                   q.new_empty((B, H, _round(T, 128)), dtype=torch.float32)]
        if k.shape[1] != H:  # GQA: gradients at the query heads' width, then summed into the kv heads
            scratch += [q.new_empty((B, H, k.shape[2], S)), q.new_empty((B, H, k.shape[2], S))]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del scratch
        return dq, dk, dv, None


def cuda_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as torch picks its CUDA kernel (flash, memory-efficient, math), by memory."""
    half, S, gqa = q.dtype in (torch.float16, torch.bfloat16), q.shape[-1], k.shape[-3] != q.shape[-3]
    if attn_mask is None and half and S % 8 == 0 and S <= 256:
        return AttentionModel.apply(q, k, v, True)
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # sdpa turns a boolean mask into an additive one
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
    if not gqa and S % 8 == 0:  # memory-efficient attention has no grouped kv heads
        return AttentionModel.apply(q, k, v, False)
    return aten._scaled_dot_product_attention_math(q, k, v, attn_mask, dropout_p, is_causal, None, scale=scale,
                                                   enable_gqa=enable_gqa)[0]


@contextlib.contextmanager
def cuda_like():
    """The CUDA paths where the CPU would take others (module docstring), for the duration."""
    sdpa, had = F.scaled_dot_product_attention, "is_cuda" in FakeTensor.__dict__
    F.scaled_dot_product_attention = cuda_sdpa
    FakeTensor.is_cuda = property(lambda self: True)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa
        if not had:
            del FakeTensor.is_cuda


@contextlib.contextmanager
def running(cuda=True, fake=True):
    """Fake tensors (or real ones, to measure the same code on the CPU) and, for a CUDA prediction, cuda_like.
    Yields the FakeTensorMode (None for real tensors)."""
    with contextlib.ExitStack() as stack:
        mode = stack.enter_context(FakeTensorMode()) if fake else None
        if cuda:
            stack.enter_context(cuda_like())
        yield mode


class SkipInit(TorchDispatchMode):
    """Random fills of fake tensors skipped: they have no values to fill, and building stays quick."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in RANDOM_FILLS and isinstance(args[0], FakeTensor):
            return args[0]
        return func(*args, **(kwargs or {}))


RANDOM_FILLS = {aten.uniform_.default, aten.normal_.default}


@contextlib.contextmanager
def building(mode):
    """Modules made on fake tensors (mode: the FakeTensorMode; None: real tensors): SkipInit, and nn.Module.to
    working. It swaps a fake parameter for its moved copy (torch.utils.swap_tensors), which refuses a tensor
    that a weakref points to, and FakeTensorMode points some (its dispatch cache's keys, its converter's memo):
    the cache is off and the memo emptied before each swap while building (peft moves its adapters)."""
    if mode is None:
        with SkipInit():
            yield
        return
    cache, swap = mode.cache_enabled, torch.utils.swap_tensors

    def swap_unmemoized(t1, t2):
        mode.fake_tensor_converter.tensor_memo.clear()
        return swap(t1, t2)

    mode.cache_enabled, torch.utils.swap_tensors = False, swap_unmemoized
    try:
        with SkipInit():
            yield
    finally:
        mode.cache_enabled, torch.utils.swap_tensors = cache, swap

