"""What a verifier writes to check tests/foreign.py (an implementation that is not this repository's) against
the reference: its tensors captured with tools/capture.py under verify.py's names, from its own process.

    python -m tools.verify dump --model model --data tasks/piqa.val.jsonl --out golden.safetensors
    python -m tests.foreign_capture --model model --golden golden.safetensors --out theirs.safetensors [--dtype bfloat16]
    python -m tools.verify compare golden.safetensors theirs.safetensors

--bug NAME plants one of tests/foreign.py's porting bugs, --scale MODULE=F scales one module's output (a bug
inside it), so the README's walk-through can show what compare says about each.
"""
import argparse

import torch
from safetensors.torch import load_file

from tests import foreign
from tools import capture


def capture_foreign(model, ids, path, dtype, plant=None, rename=None):
    """tests/foreign.py's tensors under verify's names, written to `path`: hooks on its modules, q and k from its
    RoPE function, the routing from its torch.topk calls, the weights and per-slot expert outputs from its combine
    function (v and the router logits have no place to catch them: compare computes those itself).
    plant: (module, fn) a hook changing that module's output first (a bug inside it)."""
    cap = capture.Capture(ids, dtype=dtype, about="tests/foreign.py")
    moe_layers = [i for i, b in enumerate(model.layers) if isinstance(b.feed_forward, foreign.MOEFeedForward)]
    E = model.layers[moe_layers[0]].feed_forward.router.shape[0]
    rotated, combined = [], []

    def on_rope(out, x, cos, sin, interleaved=False):  # called for q, then k, in each layer
        n = len(rotated)
        rotated.append(n)
        cap.record(f"model.layers.{n // 2}.self_attn.{'qk'[n % 2]}", out)

    def on_combine(out, expert_outs, weights):  # (N, K, D) per (token, slot), (N, K) in topk's (unsorted) order
        p = f"model.layers.{moe_layers[len(combined)]}.mlp."
        combined.append(p)
        cap.record(p + "topk_weights", weights)
        cap.expert_slots(p, expert_outs)
        cap.record(p + "experts", out)

    planted = plant and plant[0].register_forward_hook(lambda m, a, out: plant[1](out))
    with cap:
        cap.hook(model.tok_embeddings, "model.embed_tokens")
        for i, block in enumerate(model.layers):
            p, a, ff = f"model.layers.{i}.", block.attention, block.feed_forward
            cap.hook(block.attention_norm, p + "input_layernorm")
            cap.hook(a.wqkv, split={p + "self_attn.q_proj": a.H * a.S, p + "self_attn.k_proj": a.G * a.S,
                                    p + "self_attn.v_proj": a.G * a.S})
            cap.hook(a.wo, p + "self_attn.o_proj.input", input=True)
            cap.hook(a.wo, p + "self_attn")
            cap.hook(block.ffn_norm, p + "post_attention_layernorm")
            if getattr(ff, "shared", None) is not None:
                cap.hook(ff.shared, p + "mlp.shared_expert")
            cap.hook(ff, p + "mlp")
            cap.hook(block, p[:-1])
        cap.hook(model.norm, "model.norm")
        cap.hook(model.output, "lm_head")
        with cap.topk([f"model.layers.{i}.mlp." for i in moe_layers], num_experts=E), \
                cap.wrap(foreign, "apply_rotary", on_rope), cap.wrap(foreign, "combine", on_combine):
            logits = model(ids)
        cap.record("loss", foreign.loss_of(logits, ids))
    if planted:
        planted.remove()
    for old, new in (rename or {}).items():
        cap.tensors[new] = cap.tensors.pop(old)
    cap.save(str(path))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tests.foreign_capture", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the hub checkpoint directory the golden file was made from")
    ap.add_argument("--golden", required=True, help="the golden file: its input_ids are the ones to run")
    ap.add_argument("--out", required=True, help="the file to write (theirs.safetensors)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the run's dtype")
    ap.add_argument("--bug", action="append", default=[], choices=sorted(foreign.BUGS), help="plant a porting bug")
    ap.add_argument("--scale", help="MODULE=F: multiply that module's output by F (e.g. layers.2.attention.wo=1.03)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    model = foreign.Transformer(args.model, dtype, args.bug)
    plant = None
    if args.scale:
        name, f = args.scale.split("=")
        plant = dict(model.named_modules())[name], lambda out: out * float(f)
    capture_foreign(model, load_file(args.golden)["input_ids"], args.out, dtype, plant)


if __name__ == "__main__":
    main()
