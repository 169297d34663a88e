"""Record another implementation's tensors under verify.py's names, from inside its own process, and write the
file `python -m tools.verify compare golden.safetensors theirs.safetensors` reads.

It needs only torch and safetensors (it imports nothing else of this repository: copy it next to your code
if you like). The names, shapes and layouts are `python -m tools.verify names --model DIR`'s.

    from safetensors.torch import load_file
    from tools import capture
    ids = load_file("golden.safetensors")["input_ids"]                  # (B, T): run on exactly these
    cap = capture.Capture(ids, dtype=torch.bfloat16)                    # the dtype your run computes in
    with cap:
        cap.hook(model.embed, "model.embed_tokens")                     # a module's output under a name
        cap.hook(block.attn.wqkv, split={"model.layers.0.self_attn.q_proj": 256, ...})  # a fused output, cut
        cap.hook(block.attn.wo, "model.layers.0.self_attn.o_proj.input", input=True)    # a module's input
        with cap.topk(["model.layers.0.mlp.", ...], num_experts=64):    # routing: each torch.topk call in turn
            logits = model(ids)
            # inside your code, where there is no module: capture.record("model.layers.0.self_attn.q", q)
        cap.record("lm_head", logits[..., :vocab_size])
    cap.save("theirs.safetensors")

`record` is a no-op outside a `with Capture(...)`, so record calls may stay in your code. Expert outputs
computed per (token, slot), as most fused or gathered implementations hold them, become verify's per-expert
rows with `expert_slots`.
"""
import json
from contextlib import contextmanager

import torch
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

FORMAT = "moe-lora verify theirs 1"  # tools/verify.py reads this header
_active = []  # the Capture inside whose `with` we are (record() writes there)


def record(name, tensor):
    """Record `tensor` under `name` in the active Capture (nothing when none is active)."""
    if _active:
        _active[-1].record(name, tensor)


class Capture:
    def __init__(self, input_ids, dtype, params_dtype=None, about=""):
        """input_ids (B, T): the golden file's; dtype: what your run computes in (torch.float32 or torch.bfloat16);
        params_dtype: what its weights are held in (default: dtype); about: a line naming your implementation."""
        self.B, self.T = input_ids.shape
        self.tensors = {"input_ids": input_ids.detach().to("cpu", copy=True)}
        self.run = {"compute": str(dtype).removeprefix("torch."),
                    "params": str(params_dtype or dtype).removeprefix("torch.")}
        self.about, self.handles = about, []

    def __enter__(self):
        _active.append(self)
        return self

    def __exit__(self, *exc):
        _active.remove(self)
        for h in self.handles:
            h.remove()
        self.handles = []

    def record(self, name, tensor):
        """A copy of `tensor` under `name`; (B*T, ...) rows are reshaped to (B, T, ...)."""
        if name in self.tensors:
            raise ValueError(f"capture: {name} recorded twice (one forward pass per Capture)")
        t = tensor.detach().to("cpu", copy=True)
        if t.dim() >= 1 and t.shape[0] == self.B * self.T and not name.split(".")[-1].isdigit():
            t = t.reshape(self.B, self.T, *t.shape[1:])
        self.tensors[name] = t

    def hook(self, module, name=None, input=False, split=None, fn=None):
        """Record `module`'s output (its first input with input=True; the first element of a tuple) under `name`,
        cut along the last dim into {name: width} with `split`, or as fn(tensor) -> {name: tensor}."""
        def on_forward(mod, args, out):
            t = args[0] if input else out[0] if isinstance(out, (tuple, list)) else out
            if fn is not None:
                parts = fn(t)
            elif split is not None:
                parts = dict(zip(split, t.split(list(split.values()), dim=-1)))
            else:
                parts = {name: t}
            for n, x in parts.items():
                self.record(n, x)
        self.handles.append(module.register_forward_hook(on_forward))

    @contextmanager
    def wrap(self, owner, attr, fn):
        """Within the block, owner.attr (a function: apply_rope, ...) is called as before and fn(out, *args,
        **kwargs) sees each result: record what you need from it there."""
        plain = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            out = plain(*args, **kwargs)
            fn(out, *args, **kwargs)
            return out
        setattr(owner, attr, wrapped)
        try:
            yield
        finally:
            setattr(owner, attr, plain)

    @contextmanager
    def topk(self, prefixes, num_experts, weights=False):
        """Within the block, the n-th torch.topk over a last dim of num_experts (the router's choice, wherever it
        is called: routing often has no module) records its indices as prefixes[n] + "topk_ids", and with
        weights=True its values as prefixes[n] + "topk_weights" (when they are the final weights)."""
        cap, calls = self, []

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func in (torch.topk, torch.Tensor.topk) and args[0].shape[-1] == num_experts:
                    if len(calls) >= len(prefixes):
                        raise ValueError(f"capture: more than {len(prefixes)} top-k calls over {num_experts} experts")
                    p = prefixes[len(calls)]
                    calls.append(p)
                    cap.record(p + "topk_ids", out[1])  # the mode is off inside __torch_function__: no recursion
                    if weights:
                        cap.record(p + "topk_weights", out[0])
                return out

        with Mode():
            yield
        if len(calls) != len(prefixes):
            raise ValueError(f"capture: {len(calls)} top-k calls over {num_experts} experts, expected {len(prefixes)}")

    def expert_slots(self, prefix, out, ids=None):
        """out (B*T, K, D) or (B, T, K, D): each (token, slot)'s unweighted expert output; ids (B*T, K) the experts
        (default: the recorded prefix + "topk_ids"). Records prefix + "experts.e" (n_e, D): expert e's rows in
        ascending token order, as verify wants them."""
        ids = (self.tensors[prefix + "topk_ids"] if ids is None else ids.detach().cpu()).reshape(self.B * self.T, -1)
        out = out.detach().cpu().reshape(ids.shape[0], ids.shape[1], -1)  # (N, K, D)
        for e in ids.unique().tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)  # ascending tokens (one slot per token holds e)
            self.record(f"{prefix}experts.{e}", out[tok, slot])

    def save(self, path):
        """Write every recorded tensor and the header compare reads (format, the run's dtypes, the names)."""
        tensors = {n: t.contiguous() for n, t in self.tensors.items()}
        bad = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        header = dict(format=FORMAT, run=self.run, about=self.about, names=list(tensors))
        save_file(tensors, path, metadata={"verify": json.dumps(header)})
        print(f"capture: wrote {len(tensors)} tensors ({self.run['compute']} run) to {path}"
              + (f"; {len(bad)} hold non-finite values (compare names the first): {bad[:3]}" if bad else ""))
