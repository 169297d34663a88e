"""Tokenizers: Mixtral/Llama ship `tokenizer.model` (SentencePiece, BOS `<s>` prepended), read here with
`sentencepiece`; OLMoE ships only `tokenizer.json` (GPT-NeoX byte-level BPE, no BOS, EOS 50279, pad 1), read with
the `tokenizers` library. Ids match transformers' AutoTokenizer, except for two known cases, both with
tokenizer.model, where we follow sentencepiece (the models' own tokenizer): transformers 5's LlamaTokenizer
encodes " hello" like "hello" (its Metaspace pre-tokenizer skips the dummy "▁" prefix when the text already
starts with a space; huggingface/transformers#47487), and it turns "<s>" / "</s>" written in the text into special
tokens, where sentencepiece keeps them as text. (The tokenizer.json that tokenizer_files.py converts from a
tokenizer.model has only the second difference.)
"""
import json
import os


class TokenizerError(ValueError):
    """A tokenizer that cannot be read; the message names the file."""


class Tokenizer:
    """One of two backends: a sentencepiece model (`sp`) or a `tokenizers.Tokenizer` (`tk`).

    bos_id is None when the model has no BOS (OLMoE). pad_id falls back to eos_id when the model defines
    no pad token (Mixtral): padded positions are masked out anyway. vocab_size is the tokenizer's, which
    may be smaller than the model's embedding (OLMoE: 50,280 tokens, 50,304 embedding rows).
    """

    def __init__(self, sp, tk, bos_id, eos_id, pad_id, add_bos, files):
        self.sp, self.tk = sp, tk
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos = add_bos  # sentencepiece only: prepend BOS when encode(bos=None)
        self.vocab_size = sp.vocab_size() if sp is not None else tk.get_vocab_size(with_added_tokens=True)
        self.files = files  # tokenizer file names to copy next to an exported checkpoint

    def encode(self, text, bos=None):
        """Token ids of `text`. bos=None: the tokenizer's default (sentencepiece prepends BOS; a
        tokenizer.json does what its post-processor does, which for OLMoE is nothing)."""
        if self.sp is not None:
            # special-token strings written in the text ("</s>") stay plain text, as in sentencepiece
            ids = self.sp.encode(text)
            add = self.add_bos if bos is None else bos
        else:
            # added tokens written in the text ("<|endoftext|>") are matched, as in transformers
            ids = self.tk.encode(text, add_special_tokens=bos is None).ids
            add = bool(bos)
        if add:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids):
        """Text of `ids`; special tokens (BOS, EOS, padding) are dropped."""
        ids = [int(i) for i in ids]
        if self.sp is not None:
            return self.sp.decode(ids)  # sentencepiece drops control tokens itself
        return self.tk.decode(ids, skip_special_tokens=True)


def _read_json(path):
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _first(x):
    return x[0] if isinstance(x, list) else x  # config.json may list several eos ids (Llama 3)


def load(model_dir):
    """The tokenizer of a model directory: `tokenizer.model` if present, else `tokenizer.json`."""
    config = _read_json(os.path.join(model_dir, "config.json"))
    tok_config = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
    special_map = _read_json(os.path.join(model_dir, "special_tokens_map.json"))
    names = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    files = [f for f in names if os.path.exists(os.path.join(model_dir, f))]

    if "tokenizer.model" in files:
        import sentencepiece

        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(model_dir, "tokenizer.model"))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{os.path.join(model_dir, 'tokenizer.model')}: cannot load ({e})") from None
        bos_id = sp.bos_id() if sp.bos_id() >= 0 else None  # sentencepiece says -1 for "none"
        eos_id = sp.eos_id()
        pad_id = _first(config.get("pad_token_id"))
        if pad_id is None and sp.pad_id() >= 0:
            pad_id = sp.pad_id()
        add_bos = tok_config.get("add_bos_token", True) and bos_id is not None
        tok = Tokenizer(sp, None, bos_id, eos_id, eos_id if pad_id is None else pad_id, add_bos, files)
        tok.where, tok.tok_config, tok.special_map = model_dir, tok_config, special_map  # for chat.py
        return tok

    if "tokenizer.json" in files:
        import tokenizers

        try:
            tk = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        except Exception as e:  # tokenizers raises its own exception type
            raise TokenizerError(f"{os.path.join(model_dir, 'tokenizer.json')}: cannot load ({e})") from None

        def token_id(key):
            # config.json's id when it has the key (null: the model has none), else the token string
            # named by tokenizer_config.json or special_tokens_map.json
            if f"{key}_id" in config:
                return _first(config[f"{key}_id"])
            for source in (tok_config, special_map):
                tok = source.get(key)
                if isinstance(tok, dict):  # {"content": "<|endoftext|>", ...}
                    tok = tok.get("content")
                if tok is not None and tk.token_to_id(tok) is not None:
                    return tk.token_to_id(tok)
            return None

        bos_id, eos_id, pad_id = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
        if eos_id is None:
            raise ValueError(f"{model_dir}: no eos_token_id in config.json and no eos_token in tokenizer_config.json")
        tok = Tokenizer(None, tk, bos_id, eos_id, eos_id if pad_id is None else pad_id, False, files)
        tok.where, tok.tok_config, tok.special_map = model_dir, tok_config, special_map  # for chat.py
        return tok

    raise FileNotFoundError(f"{model_dir}: no tokenizer.model or tokenizer.json in this directory")
