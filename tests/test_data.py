"""Tests for files/tokenizer.py and files/data.py: tokenizer parity with transformers, the jsonl readers, masks, padding, packing.

Two tokenizers: a tiny SentencePiece BPE model trained here (Mixtral/Llama style: tokenizer.model, BOS
prepended, byte fallback, identity normalisation), and the real OLMo-family tokenizer.json in
tests/data/olmo_tokenizer (OLMoE style: no BOS, EOS 50279, pad 1). transformers is the oracle.
"""

import gzip
import io
import json
import os
import re

import pytest
import torch

from files import data
from conftest import assert_within
from files import tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OLMO_DIR = os.path.join(HERE, "data", "olmo_tokenizer")

# no string here starts with a space: see test_sp_follows_sentencepiece_where_transformers_differs
STRINGS = [
    "Hello world",
    "Emma Woodhouse, handsome, clever, and rich",
    "two  spaces,\nnewlines\n\nand\ttabs\t",
    "trailing spaces   ",
    "café naïve — 日本語 🤗 Ｆｕｌｌｗｉｄｔｈ ﬁ",
    "12345 + 678 = 99, 3.14159",
    "Question: What is 2 + 2?\nAnswer: 4",
    "",
    "\n",
]
LEADING_SPACE = [" Hello world", "  two leading", " ", "\tTab first"]


# ----------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A Mixtral-like tokenizer dir: a 500-piece SentencePiece BPE model trained on repo-local text."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp_tokenizer")
    lines = []
    for path in (os.path.join(OLMO_DIR, "LICENSE"), os.path.join(OLMO_DIR, "README.md")):
        with open(path, encoding="utf-8") as f:
            lines += [line.strip() for line in f if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=500, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )  # the Llama/Mixtral settings: identity normalisation, byte fallback, digits split
    (d / "tokenizer.model").write_bytes(model.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps({  # as in mistralai/Mixtral-8x7B-v0.1
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "legacy": True, "clean_up_tokenization_spaces": False,
    }))
    return str(d)


@pytest.fixture(scope="module")
def both(sp_dir):
    """Our two tokenizers, loaded once: [Mixtral-like sentencepiece, OLMo tokenizer.json]."""
    return [tokenizer.load(sp_dir), tokenizer.load(OLMO_DIR)]


def hf_tokenizer(model_dir):
    transformers = pytest.importorskip("transformers")
    # transformers converts tokenizer.model to its own format with protobuf: a test-only dependency
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read tokenizer.model")
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


# ----------------------------------------------------------------------------------------------------
# tokenizers


def test_sp_ids_match_transformers(sp_dir):
    """SentencePiece tokenizer.model: our ids equal AutoTokenizer's (BOS first) on every test string."""
    ours, hf = tokenizer.load(sp_dir), hf_tokenizer(sp_dir)
    for s in STRINGS:
        assert ours.encode(s) == hf(s)["input_ids"], repr(s)
    assert ours.encode("Hello")[0] == ours.bos_id == hf.bos_token_id == 1
    assert ours.eos_id == hf.eos_token_id == 2
    assert ours.vocab_size == len(hf) == 500


def test_sp_follows_sentencepiece_where_transformers_differs(sp_dir):
    """Leading spaces and "</s>" written in the text are encoded exactly as sentencepiece does.

    transformers 5's LlamaTokenizer skips the dummy "▁" when the text already starts with a space
    (huggingface/transformers#47487), so there " hello" and "hello" get the same ids; Mixtral's
    reference tokenizer (sentencepiece) and transformers 4 with Mixtral's tokenizer.json keep them apart.
    transformers also turns "</s>" in the text into the EOS id; sentencepiece keeps it as text.
    """
    import sentencepiece as spm

    ours = tokenizer.load(sp_dir)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(sp_dir, "tokenizer.model"))
    for s in LEADING_SPACE + ["a</s>b <s>"]:
        assert ours.encode(s) == [1] + sp.encode(s), repr(s)
    assert ours.encode(" Hello") != ours.encode("Hello")
    assert ours.eos_id not in ours.encode("a</s>b")


def test_olmo_ids_match_transformers():
    """OLMo tokenizer.json: our ids equal AutoTokenizer's on every string, leading spaces and EOS text included."""
    ours, hf = tokenizer.load(OLMO_DIR), hf_tokenizer(OLMO_DIR)
    for s in STRINGS + LEADING_SPACE + ["a<|endoftext|>b", "x |||IP_ADDRESS||| y"]:
        assert ours.encode(s) == hf(s)["input_ids"], repr(s)
    assert ours.encode("a<|endoftext|>b") == [66, 50279, 67]  # added tokens in the text are matched
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (None, 50279, 1, 50280)


def test_special_ids_and_files(both):
    """Mixtral-like: pad falls back to EOS; files lists exactly the tokenizer files present."""
    sp, olmo = both
    assert (sp.bos_id, sp.eos_id, sp.pad_id) == (1, 2, 2)
    assert sp.files == ["tokenizer.model", "tokenizer_config.json"]
    assert olmo.files == ["tokenizer.json", "tokenizer_config.json"]


def test_special_ids_fallback_without_config(tmp_path):
    """Without config.json, EOS and pad come from tokenizer_config.json, else special_tokens_map.json."""
    import shutil

    shutil.copy(os.path.join(OLMO_DIR, "tokenizer.json"), tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: no eos_token_id")):
        tokenizer.load(str(tmp_path))
    write(tmp_path / "special_tokens_map.json", json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    tok = tokenizer.load(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 50279, 50279)  # no pad token: pad = EOS
    write(tmp_path / "tokenizer_config.json", json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}))
    tok = tokenizer.load(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 50279, 1)
    assert tok.files == ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def test_round_trip(both):
    """decode(encode(s)) == s for both tokenizers (BOS/EOS dropped by decode)."""
    for tok in both:
        for s in STRINGS + LEADING_SPACE:
            assert tok.decode(tok.encode(s)) == s, (tok.files, s)
            assert tok.decode(tok.encode(s) + [tok.eos_id]) == s, (tok.files, s)


def test_bos_flag(both):
    """bos=False never adds BOS, bos=True adds it, and a tokenizer without BOS refuses bos=True."""
    sp, olmo = both
    assert sp.encode("Hello", bos=False) == sp.encode("Hello")[1:]
    assert sp.encode("Hello", bos=True) == sp.encode("Hello")
    assert olmo.encode("Hello", bos=False) == olmo.encode("Hello") == [12092]
    with pytest.raises(ValueError, match="no BOS"):
        olmo.encode("Hello", bos=True)


def test_missing_tokenizer_names_dir(tmp_path):
    """A directory with neither tokenizer.model nor tokenizer.json is refused, naming the directory."""
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        tokenizer.load(str(tmp_path))


# ----------------------------------------------------------------------------------------------------
# jsonl


def test_read_jsonl_plain_and_gz(tmp_path):
    """.jsonl and .jsonl.gz give the same records; blank lines are skipped."""
    text = '{"text": "a"}\n\n{"prompt": "p", "completion": "c"}\n'
    plain = write(tmp_path / "x.jsonl", text)
    with gzip.open(tmp_path / "x.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    expected = [{"text": "a"}, {"prompt": "p", "completion": "c"}]
    assert data.read_jsonl(plain) == data.read_jsonl(str(tmp_path / "x.jsonl.gz")) == expected


def test_read_jsonl_malformed_line_named(tmp_path):
    """A malformed line raises DataError naming the file and its 1-based line number (blank lines counted)."""
    path = write(tmp_path / "bad.jsonl", '{"text": "a"}\n\n{"text": oops}\n{"text": "b"}\n')
    with pytest.raises(data.DataError, match=re.escape(f"{path}:3: malformed JSON")):
        data.read_jsonl(path)
    path = write(tmp_path / "list.jsonl", '{"text": "a"}\n[1, 2]\n')
    with pytest.raises(data.DataError, match=re.escape(f"{path}:2: expected a JSON object")):
        data.read_jsonl(path)


def test_read_jsonl_empty_and_missing(tmp_path):
    """An empty (or blank-only) file and a missing file each raise DataError naming the file."""
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n")):
        path = write(tmp_path / name, text)
        with pytest.raises(data.DataError, match=re.escape(f"{path}: no records")):
            data.read_jsonl(path)
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(data.DataError, match=re.escape(f"{missing}: no such file")):
        data.read_jsonl(missing)


def test_record_kinds():
    """Each kind is recognised by its keys (extra keys ignored); a bad mc gold index is refused."""
    assert data.record_kind({"text": "t", "id": 3}) == "text"
    assert data.record_kind({"prompt": "p", "completion": "c"}) == "prompt"
    assert data.record_kind({"query": "q", "choices": ["a", "b"], "gold": 1, "id": "x"}) == "mc"
    assert data.record_kind({"question": "q", "answer": "4", "solution": "s"}) == "qa"
    with pytest.raises(ValueError, match="gold=2"):
        data.record_kind({"query": "q", "choices": ["a", "b"], "gold": 2})
    with pytest.raises(ValueError, match="'choices' must be a list of strings"):
        data.record_kind({"query": "q", "choices": 5, "gold": 0})
    with pytest.raises(ValueError, match="'text' must be a string"):
        data.record_kind({"text": 5})


def test_unreadable_files_are_named(tmp_path):
    """A .jsonl that is not UTF-8, a .jsonl.gz that is not gzip, a malformed tokenizer_config.json and a
    corrupt tokenizer.model each raise DataError (TokenizerError for the tokenizer's files) naming the file."""
    bad_utf8 = tmp_path / "x.jsonl"
    bad_utf8.write_bytes(b'{"text": "\xff"}\n')
    not_gz = write(tmp_path / "y.jsonl.gz", '{"text": "a"}\n')
    for path in (str(bad_utf8), not_gz):
        with pytest.raises(data.DataError, match=re.escape(f"{path}: cannot read")):
            data.read_jsonl(path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(tokenizer.TokenizerError, match="tokenizer_config.json: not valid JSON"):
        tokenizer.load(str(tmp_path))
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(tokenizer.TokenizerError, match="tokenizer.model: cannot load"):
        tokenizer.load(str(tmp_path))


def test_check_records_names_file_line_and_keys(tmp_path):
    """A record of unknown kind raises DataError with the file, its line number and the keys it has."""
    path = write(tmp_path / "mixed.jsonl", '{"text": "a"}\n\n{"txt": "b", "id": 1}\n')
    records = data.read_jsonl(path)
    with pytest.raises(data.DataError, match=re.escape(f"{path}:3: record with keys ['id', 'txt']")):
        data.check_records(records, path)
    data.check_records(records[:1], path)  # the good record alone passes


# ----------------------------------------------------------------------------------------------------
# encode_example


def masked(ids, mask):
    return [i for i, m in zip(ids, mask) if m]


def test_encode_text(both):
    """text: loss on every token but the first, EOS appended; too long -> cut from the right."""
    for tok in both:
        s = "It is a truth universally acknowledged"
        ids, mask = data.encode_example(tok, {"text": s}, max_len=1000)
        assert ids == tok.encode(s) + [tok.eos_id]
        assert mask == [0] + [1] * (len(ids) - 1)
        short, short_mask = data.encode_example(tok, {"text": s}, max_len=4)
        assert short == ids[:4] and short_mask == [0, 1, 1, 1]


def test_encode_prompt_and_mc(both):
    """prompt/mc/qa: the masked tokens are exactly the answer + EOS, and ids equal the encoded full text."""
    cases = [
        ({"prompt": "Translate: chat ->", "completion": " cat"}, "Translate: chat ->", " cat"),
        ({"query": "Question: Capital of France?\nAnswer:", "choices": ["Rome", "Paris"], "gold": 1},
         "Question: Capital of France?\nAnswer:", " Paris"),
        ({"question": "What is 6 * 7?", "answer": "42", "solution": "..."}, "What is 6 * 7?", " 42"),
    ]
    for tok in both:
        for rec, prompt, answer in cases:
            ids, mask = data.encode_example(tok, rec, max_len=1000)
            assert ids == tok.encode(prompt + answer) + [tok.eos_id]  # one BOS at most, exact boundary
            target = masked(ids, mask)
            assert target[-1] == tok.eos_id
            assert tok.decode(target).strip() == answer.strip()
            assert mask == sorted(mask)  # prompt zeros, then answer ones
            assert tok.decode(ids[: mask.index(1)]).strip() == prompt.strip()


def test_encode_mc_truncates_prompt_from_left(both):
    """Too long: the prompt loses tokens from the left (BOS kept), the answer + EOS survive whole."""
    rec = {"query": "Question: " + "very " * 50 + "long?\nAnswer:", "choices": ["no", "yes please"], "gold": 1}
    for tok in both:
        full, full_mask = data.encode_example(tok, rec, max_len=10_000)
        ids, mask = data.encode_example(tok, rec, max_len=12)
        assert len(ids) == len(mask) == 12
        assert masked(ids, mask) == masked(full, full_mask)
        assert ids[-sum(mask):] == full[-sum(mask):]
        assert ids[: -sum(mask)][-3:] == full[: -sum(full_mask)][-3:]  # the end of the prompt is kept
        if tok.bos_id is not None:
            assert ids[0] == tok.bos_id


def test_encode_loss_on_all_trains_the_whole_formatted_text(both):
    """loss_on="all": prompt + answer + EOS, loss on every token but the first (as a text record); cut from the right."""
    rec = {"query": "Question: Capital of France?\nAnswer:", "choices": ["Rome", "Paris"], "gold": 1}
    for tok in both:
        ids, mask = data.encode_example(tok, rec, max_len=1000, loss_on="all")
        assert ids == data.encode_example(tok, rec, max_len=1000)[0]  # the same tokens as loss_on="answer"
        assert mask == [0] + [1] * (len(ids) - 1)
        short, short_mask = data.encode_example(tok, rec, max_len=5, loss_on="all")
        assert short == ids[:5] and short_mask == [0, 1, 1, 1, 1]


def test_encode_examples_counts_what_max_len_cuts(both):
    """encode_examples reports how many records and tokens max_len cut, for both text and prompt records."""
    recs = [{"text": "a short one"}, {"text": "word " * 40},
            {"query": "Question: " + "very " * 30 + "long?\nAnswer:", "choices": ["no", "yes"], "gold": 1}]
    for tok in both:
        for loss_on in ("answer", "all"):
            full = [data.encode_example(tok, r, 10_000, loss_on)[0] for r in recs]
            examples, (n_cut, tokens_cut) = data.encode_examples(tok, recs, 12, loss_on)
            assert [e for e, _ in examples] == [data.encode_example(tok, r, 12, loss_on)[0] for r in recs]
            assert n_cut == sum(len(f) > 12 for f in full) == 2
            assert tokens_cut == sum(max(0, len(f) - 12) for f in full)


# ----------------------------------------------------------------------------------------------------
# padding, packing, batching


def test_pad_batch_right():
    """labels[b, t] = ids[t+1] where loss_mask[t+1], else -100; padding is pad_id, mask 0, label -100."""
    seqs, masks = [[5, 6, 7, 8], [9, 10]], [[0, 0, 1, 1], [0, 1]]
    input_ids, attn, labels = data.pad_batch(seqs, masks, pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert attn.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert labels.tolist() == [[-100, 7, 8, -100], [10, -100, -100, -100]]
    assert input_ids.dtype == attn.dtype == labels.dtype == torch.long


def test_pad_batch_left():
    """side="left" puts padding first and shifts labels with the tokens."""
    input_ids, attn, labels = data.pad_batch([[5, 6, 7, 8], [9, 10]], [[0, 0, 1, 1], [0, 1]], pad_id=1, side="left")
    assert input_ids.tolist() == [[5, 6, 7, 8], [1, 1, 9, 10]]
    assert attn.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert labels.tolist() == [[-100, 7, 8, -100], [-100, -100, 10, -100]]


def test_pad_batch_loss_counts_masked_tokens_only():
    """cross_entropy over the shifted labels averages over exactly the loss_mask tokens."""
    torch.manual_seed(0)
    seqs, masks = [[3, 1, 4, 1, 5], [9, 2, 6]], [[0, 1, 1, 0, 1], [0, 0, 1]]
    _, _, labels = data.pad_batch(seqs, masks, pad_id=0)
    logits = torch.randn(2, 5, 10)
    loss = torch.nn.functional.cross_entropy(logits.view(-1, 10), labels.view(-1), ignore_index=-100)
    logp = logits.log_softmax(-1)
    picks = [logp[0, 0, 1], logp[0, 1, 4], logp[0, 3, 5], logp[1, 1, 6]]  # position t predicts token t+1
    assert_within(loss, -torch.stack(picks).mean(), 8)  # the same log-softmax values, a mean of 4 in another order


def test_pack_examples():
    """Rows are seq_len long (the last may be shorter), keep every token in order, start with mask 0."""
    examples = [([1, 2, 3], [0, 1, 1]), ([4, 5, 6, 7, 8], [0, 0, 1, 1, 1]), ([9, 10], [0, 1])]
    rows = data.pack_examples(examples, seq_len=3)
    assert [len(ids) for ids, _ in rows] == [3, 3, 3, 1]
    assert sum((ids for ids, _ in rows), []) == list(range(1, 11))
    assert [mask for _, mask in rows] == [[0, 1, 1], [0, 0, 1], [0, 1, 0], [0]]  # rows 3, 4 start mid-example


def test_batches_deterministic():
    """Same seed, same batches; every example appears exactly once; shuffle=False keeps the order."""
    examples = list(range(10))
    a = list(data.batches(examples, 3, seed=1))
    assert a == list(data.batches(examples, 3, seed=1))
    assert a != list(data.batches(examples, 3, seed=2))
    assert [len(b) for b in a] == [3, 3, 3, 1]
    assert sorted(sum(a, [])) == examples
    assert list(data.batches(examples, 4, seed=0, shuffle=False)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_eos_off_trains_the_formatted_text_alone(both):
    """eos=False (--eos off, the moe-sieve recipe): the ids are the formatted text's own tokens (MoE-Sieve's
    tokenizer(fn(ex))), no EOS, for text records and prompt records, loss_on all or answer."""
    for tok in both:
        s = "It is a truth universally acknowledged"
        ids, mask = data.encode_example(tok, {"text": s}, max_len=1000, eos=False)
        assert ids == tok.encode(s) and mask == [0] + [1] * (len(ids) - 1)
        rec = {"prompt": "Question: 2+2?\nAnswer:", "completion": " 4"}
        for loss_on in ("all", "answer"):
            ids, mask = data.encode_example(tok, rec, max_len=1000, loss_on=loss_on, eos=False)
            assert ids == tok.encode(rec["prompt"] + rec["completion"]), loss_on
            with_eos, _ = data.encode_example(tok, rec, max_len=1000, loss_on=loss_on)
            assert with_eos == ids + [tok.eos_id]
            assert masked(ids, mask) and tok.eos_id not in masked(ids, mask)
