"""The tokenizer files written next to a checkpoint, so that transformers (and lm-evaluation-harness, vLLM, ...)
read the tokenizer this repository trains with.

A checkpoint that ships only a sentencepiece `tokenizer.model` (the shipped model/, a `--method full` run from
`--init-config`) is a trap for transformers: `AutoTokenizer` picks the class its model type names (OLMoE:
GPT-NeoX's byte-level BPE, converted from tokenizer.model into other ids), and even `LlamaTokenizer` rebuilds its
pre-tokenizer and drops sentencepiece's dummy "▁" before a text that starts with a space (" a" encodes as "a").
So `write` adds a `tokenizer.json` converted exactly from the sentencepiece model with the `tokenizers` library
(`from_sentencepiece`) and a `tokenizer_config.json` naming the class that uses that file as it is
(`PreTrainedTokenizerFast`; transformers 5 reads it as its TokenizersBackend). Files the source already has are
copied unchanged, never rewritten.

The conversion (as transformers' LlamaConverter in legacy mode, checked here instead of trusted):
- normalizer: prepend "▁" and turn every " " into "▁", as sentencepiece's identity normalisation with its dummy
  prefix and whitespace kept; no pre-tokenizer, so a text is one word, as for sentencepiece;
- model: BPE over sentencepiece's pieces with byte fallback; the merges of each piece in the order of its
  score (sentencepiece merges the adjacent pair whose result scores highest), control / byte pieces never merged;
- BOS "<s>" prepended by the post-processor when sentencepiece prepends it; the control tokens are special.
`from_sentencepiece` encodes every piece and a set of probe strings both ways and refuses a model whose ids differ
(a Unigram model, another normalisation). One difference is known and kept: "<s>", "</s>" or "<unk>" written in the
text are special tokens for transformers and plain text for sentencepiece (data.py follows sentencepiece).
"""
import json
import os
import shutil

# copied from the source checkpoint as they are, when present
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
PROBES = ("Hello world", " leading space", "  two spaces", "tabs\tand\nnew lines\n", "digits 1234567890 3.50",
          "naïve café, Œuvre", "日本語のテキスト", "emoji 😀🚀", "x" * 40, " ", "a  b   c    d", "end.  ")


def from_sentencepiece(path):
    """A `tokenizers.Tokenizer` giving sentencepiece's ids for the model at `path` (BOS included as sentencepiece
    adds it); ValueError naming the file if this conversion cannot reproduce it."""
    import sentencepiece
    import tokenizers
    from tokenizers import decoders, models, normalizers, processors

    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    if sp.normalize("a  b") != "▁a▁▁b":  # identity normalisation, dummy prefix, whitespace kept
        raise ValueError(f"{path}: sentencepiece normalises 'a  b' to {sp.normalize('a  b')!r}; only the identity "
                         "normalisation with a dummy prefix converts exactly (write a tokenizer.json yourself)")
    n = sp.vocab_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    mergeable = [i for i in range(n) if not (i in special or sp.is_byte(i) or sp.is_unused(i))]
    merges = []
    for i in sorted(mergeable, key=lambda i: (-sp.get_score(i), i)):  # the best-scoring result first
        piece = sp.id_to_piece(i)
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    unk = sp.id_to_piece(sp.unk_id())
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([tokenizers.AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special])
    if sp.bos_id() >= 0:
        bos = sp.id_to_piece(sp.bos_id())
        tk.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                          special_tokens=[(bos, sp.bos_id())])
    texts = [sp.id_to_piece(i).replace("▁", " ") for i in mergeable] + list(PROBES)
    for text in texts:
        ours, theirs = sp.encode(text), tk.encode(text, add_special_tokens=False).ids
        if ours != theirs:
            raise ValueError(f"{path}: the tokenizer.json conversion gives other ids than sentencepiece for {text!r} "
                             f"({theirs[:8]} vs {ours[:8]}); write a tokenizer.json yourself")
    return tk


def config_for(sp_path, config):
    """tokenizer_config.json for the converted tokenizer.json: the class that reads it as it is, the special tokens
    (pad: config.json's pad_token_id, as tokenizer.load reads it), BOS added as sentencepiece adds it."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_path)
    piece = lambda i: sp.id_to_piece(i) if i is not None and 0 <= i < sp.vocab_size() else None
    pad = config.get("pad_token_id")
    pad = pad[0] if isinstance(pad, list) else pad
    out = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=piece(sp.bos_id()), eos_token=piece(sp.eos_id()),
               unk_token=piece(sp.unk_id()), pad_token=piece(pad if pad is not None else sp.pad_id()),
               add_bos_token=sp.bos_id() >= 0, add_eos_token=False, clean_up_tokenization_spaces=False)
    if config.get("max_position_embeddings"):
        out["model_max_length"] = config["max_position_embeddings"]
    return {k: v for k, v in out.items() if v is not None}


def write(src_dir, dst_dir):
    """Copy src_dir's tokenizer files into dst_dir; where it has a tokenizer.model but no tokenizer.json (or no
    tokenizer_config.json), add the converted file. The names written, in order."""
    written = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy(os.path.join(src_dir, name), dst_dir)
            written.append(name)
    sp_path = os.path.join(src_dir, "tokenizer.model")
    if not os.path.isfile(sp_path):
        return written
    if "tokenizer.json" not in written:
        from_sentencepiece(sp_path).save(os.path.join(dst_dir, "tokenizer.json"))
        written.append("tokenizer.json")
    if "tokenizer_config.json" not in written:
        config_path = os.path.join(src_dir, "config.json")
        config = json.load(open(config_path)) if os.path.isfile(config_path) else {}
        with open(os.path.join(dst_dir, "tokenizer_config.json"), "w") as f:
            json.dump(config_for(sp_path, config), f, indent=1)
            f.write("\n")
        written.append("tokenizer_config.json")
    return written


if __name__ == "__main__":  # python -m files.tokenizer_files DIR: add the converted files to a checkpoint directory
    import sys
    import tempfile

    for d in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as tmp:
            added = [n for n in write(d, tmp) if not os.path.exists(os.path.join(d, n))]
            for n in added:
                shutil.copy(os.path.join(tmp, n), d)
        print(f"{d}: wrote {', '.join(added) or 'nothing (its tokenizer files are all there)'}")
