"""The tokenizer files written next to a checkpoint (files/tokenizer_files.py): transformers' AutoTokenizer reads
the shipped model, a merged export and a --method full output with our ids, BOS and EOS as ours; a source's own
tokenizer.json / tokenizer_config.json are copied unchanged; a sentencepiece model the converter cannot reproduce
is refused."""
import glob
import io
import json
import os
import random
import shutil
import sysconfig

import pytest

from files import export, hub
from files import tokenizer_files
import train
from tiny import SENTENCES, tiny_checkpoint
from files import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "model")
OLMO_DIR = os.path.join(ROOT, "tests", "data", "olmo_tokenizer")
EDGES = [" leading space", "  two leading", " ", "", "\n", "\tTab first", "trailing  ", "x" * 300, "3,000,000.50 42",
         " 7", "naïve café Œuvre", "日本語のテキスト", "emoji 😀🚀", "Ελληνικά", "a\u00a0b", "\r\n", "∑ ≤ ∞ ⅝"]


def corpus(n_stdlib=40, seed=0):
    """The tasks' texts (queries, choices alone and after a space, questions, answers), text from the kind of
    source the shipped model was pretrained on (the standard library's source, README prose) and the edge cases."""
    out = list(EDGES)
    for path in sorted(glob.glob(os.path.join(ROOT, "tasks", "*.jsonl"))):
        for line in open(path, encoding="utf-8"):
            r = json.loads(line)
            out += [r[k] for k in ("text", "query", "prompt", "completion", "question") if k in r]
            out += [x for c in r.get("choices", []) for x in (c, " " + c)]
            out += [" " + str(r["answer"])] if "answer" in r else []
    rng = random.Random(seed)
    for path in rng.sample(sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))), n_stdlib):
        text = open(path, encoding="utf-8", errors="replace").read()
        out += [text[i:i + 700] for i in range(0, min(len(text), 7000), 700)]
    for path in (os.path.join(ROOT, "README.md"), os.path.join(MODEL, "README.md")):
        out += open(path, encoding="utf-8").read().split("\n\n")
    return [s for s in out if not any(t in s for t in SPECIAL_TEXT)]  # the one known difference, tested apart


SPECIAL_TEXT = ("<s>", "</s>", "<unk>")  # special tokens for transformers, plain text for sentencepiece


def auto_tokenizer(path):
    return pytest.importorskip("transformers").AutoTokenizer.from_pretrained(str(path))


def assert_same_ids(directory, strings):
    ours, theirs = tokenizer.load(str(directory)), auto_tokenizer(directory)
    got = theirs(strings)["input_ids"]
    bad = [s for s, ids in zip(strings, got) if ids != ours.encode(s)]
    assert not bad, f"{len(bad)} of {len(strings)} strings differ, first {bad[0][:60]!r}"
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    return ours, theirs


def test_shipped_tokenizer_files_are_what_the_converter_writes():
    """model/tokenizer.json and tokenizer_config.json are exactly what tokenizer_files makes from tokenizer.model."""
    made = json.loads(tokenizer_files.from_sentencepiece(os.path.join(MODEL, "tokenizer.model")).to_str())
    assert json.load(open(os.path.join(MODEL, "tokenizer.json"))) == made
    config = json.load(open(os.path.join(MODEL, "config.json")))
    assert json.load(open(os.path.join(MODEL, "tokenizer_config.json"))) == tokenizer_files.config_for(
        os.path.join(MODEL, "tokenizer.model"), config)


def test_autotokenizer_on_the_shipped_model_gives_our_ids():
    """transformers reads model/ with sentencepiece's ids on every string of the corpus (BOS first), and decodes
    them to our text. Before model/ had a tokenizer.json, AutoTokenizer gave GPT-NeoX's byte-level BPE ids."""
    strings = corpus()
    assert len(strings) > 3000
    ours, theirs = assert_same_ids(MODEL, strings)
    assert type(theirs).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
    assert theirs(" a")["input_ids"] != theirs("a")["input_ids"]  # the dummy "▁" before a leading space is kept
    for s in strings[:500]:
        ids = ours.encode(s)
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids), repr(s)
    # the one known difference: special-token text is a special token for transformers, text for sentencepiece
    assert theirs("a</s>")["input_ids"][-1] == ours.eos_id and ours.eos_id not in ours.encode("a</s>")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tok") / "model")  # a tokenizer.model and nothing else


def test_merged_export_of_a_sentencepiece_checkpoint_reads_in_transformers(tiny, tmp_path):
    """A checkpoint with only tokenizer.model: its merged export gets the converted tokenizer.json and config."""
    model = hub.load_model(tiny)
    export.export_merged(model, tiny, tmp_path / "merged")
    names = sorted(os.listdir(tmp_path / "merged"))
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    assert_same_ids(tmp_path / "merged", SENTENCES + EDGES)


def test_full_training_output_reads_in_transformers(tiny, tmp_path):
    """train.py --method full writes OUT/model with tokenizer files that transformers reads as we do."""
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    assert train.main(["--model", tiny, "--data", str(p), "--method", "full", "--steps", "1", "--seq-len", "32",
                       "--out", str(tmp_path / "run")]) == 0
    assert_same_ids(tmp_path / "run" / "model", SENTENCES + EDGES)


def test_source_tokenizer_files_are_copied_as_they_are(tmp_path):
    """Where the source has tokenizer.json and tokenizer_config.json, they are copied byte for byte, nothing added."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    shutil.copytree(OLMO_DIR, src)
    dst.mkdir()
    assert tokenizer_files.write(str(src), str(dst)) == ["tokenizer.json", "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()


def test_a_sentencepiece_model_it_cannot_reproduce_is_refused(tmp_path):
    """NFKC normalisation (not the identity the converter writes) is refused, naming the file."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 20), model_writer=buf, vocab_size=200,
                                   model_type="bpe", normalization_rule_name="nmt_nfkc", minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="tokenizer.model: sentencepiece normalises"):
        tokenizer_files.from_sentencepiece(str(tmp_path / "tokenizer.model"))
