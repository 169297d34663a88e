"""Tiny random MoE models built with our own code (no transformers): for tests of LoRA, training and tools.
Parity with transformers is tested separately (test_parity.py) on models transformers builds."""
import torch

from files import hub
import moe


def _config_dict(model_type="olmoe", **overrides):
    c = dict(model_type=model_type, vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=16, num_experts=8, num_experts_per_tok=2,
             max_position_embeddings=128, rope_theta=10000.0, pad_token_id=1, eos_token_id=2, torch_dtype="float32")
    if model_type.startswith("qwen"):
        c.update(moe_intermediate_size=16, intermediate_size=32)
    if model_type == "qwen2_moe":
        c.update(shared_expert_intermediate_size=32, mlp_only_layers=[1])
    if model_type == "mixtral":
        c["num_local_experts"] = c.pop("num_experts")
    c.update(overrides)
    return c


def tiny_config(model_type="olmoe", **overrides):
    return moe.Config.from_json(_config_dict(model_type, **overrides))


def randomize(model, seed=0, std=0.2):
    """Non-trivial random weights (norms near 1) so routing is not degenerate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_((1.0 + noise) if n.endswith("norm.weight") else noise)
    return model


def tiny_model(model_type="olmoe", seed=0, **overrides):
    return randomize(moe.Transformer(tiny_config(model_type, **overrides)), seed).eval()


def kept_for_backward(fn, *weights):
    """fn()'s result and the shapes of the floating-point tensors autograd keeps for its backward, one per
    storage (a tensor kept by several ops counts once), leaving out the storages of `weights`. Shapes are
    (rows, width): a (N, K, D) tensor is (N * K, D)."""
    skip = {t.untyped_storage().data_ptr() for t in weights}
    kept = {}

    def pack(t):
        if t.is_floating_point() and t.untyped_storage().data_ptr() not in skip:
            kept[t.untyped_storage().data_ptr()] = (t.numel() // max(t.shape[-1], 1), t.shape[-1]) if t.dim() else ()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, list(kept.values())


def expert_layer_inputs(N, K, E, D, seed=0):
    """x (N, D) and routing weights w (N, K) that need gradients, and K distinct experts per token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).requires_grad_()
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    return x, idx, torch.rand(N, K, generator=g).requires_grad_()


SENTENCES = [  # a tiny corpus for tokenizers and training tests (public-domain style prose, written here)
    "The quick brown fox jumps over the lazy dog.", "A journey of a thousand miles begins with one step.",
    "Question: What colour is the sky on a clear day?\nAnswer: blue", "It was the best of times, it was the worst of times.",
    "Numbers like 12, 345 and 6789 are split into digits.", "She sells sea shells by the sea shore.",
    "def add(a, b):\n    return a + b", "All happy families are alike; each unhappy family is unhappy in its own way.",
    "Question: How many legs does a spider have?\nAnswer: eight", "The rain in Spain stays mainly in the plain.",
]


def train_sentencepiece(directory, vocab_size=384):
    """A small Llama-style sentencepiece tokenizer (BOS 1, EOS 2, byte fallback) written as tokenizer.model."""
    import io
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    (directory / "tokenizer.model").write_bytes(buf.getvalue())


def save_checkpoint(model, config_dict, directory):
    """Write `model` as a hub-style checkpoint (config.json + model.safetensors under the hub's names)."""
    import json
    from safetensors.torch import save_file
    directory.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    tensors = {disk: (params[name] if index is None else params[name][index]).detach().clone().contiguous()
               for disk, (name, index) in hub.checkpoint_names(model.config).items()}
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config_dict))


def tiny_checkpoint(directory, model_type="olmoe", seed=0, **overrides):
    """A tiny random checkpoint directory with a sentencepiece tokenizer; returns its path as a string."""
    c = dict(vocab_size=384, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    c.update(overrides)
    cfg = tiny_config(model_type, **c)
    model = randomize(moe.Transformer(cfg), seed)
    d = dict(_config_dict(model_type, **c))
    save_checkpoint(model, d, directory)
    train_sentencepiece(directory)
    return str(directory)
