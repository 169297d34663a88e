"""Chat records (files/chat.py) against transformers' apply_chat_template on three real templates
(tests/data/chat_templates: Mixtral-8x7B-Instruct, OLMoE-1B-7B-Instruct, Qwen3): the rendered text, the ids,
the assistant mask (transformers' return_assistant_tokens_mask on the same template with {% generation %}
blocks around what we train on), malformed records named by file and line, and jinja2 imported only for chat."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from files import chat
from files import data
import eval as ev
from files import tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TEMPLATES = os.path.join(HERE, "data", "chat_templates")
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Green, like grass."}, {"role": "user", "content": " And the sky? 12 345"},
     {"role": "assistant", "content": "Blue — café naïve 日本 🤗."}],
    [{"role": "user", "content": "Think first."}, {"role": "assistant", "content": "<think>\n2 and 2\n</think>\n\n4"},
     {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Still 4."}],
]
# {% generation %} around exactly what chat.py trains on when a template has none: the assistant's output after
# its generation prompt, up to the special token that ends the turn (and not the newline after it)
TAGGED = {
    "mixtral": [("{{- ' ' + message['content'] + eos_token}}",
                 "{% generation %}{{- ' ' + message['content'] + eos_token}}{% endgeneration %}")],
    "olmoe": [("{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n",  # trim_blocks eats one newline:
               "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}\n\n")],
    "qwen3": [("    {%- elif message.role == \"assistant\" %}\n",
               "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role + '\\n' }}"
               "{% generation %}\n"),
              ("'<|im_start|>' + message.role + '\\n<think>\\n'", "'<think>\\n'"),
              ("{{- '<|im_start|>' + message.role + '\\n' + content }}", "{{- content }}"),
              ("        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}",
               "        {{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}\n    {%- elif message.role == \"tool\" %}")],
}


def template(name, tagged=False):
    file = {"mixtral": "mixtral-8x7b-instruct-v0.1", "olmoe": "olmoe-1b-7b-0924-instruct", "qwen3": "qwen3"}[name]
    text = open(os.path.join(TEMPLATES, file + ".jinja"), encoding="utf-8").read()
    for old, new in TAGGED[name] if tagged else []:
        assert text.count(old) >= 1, old
        text = text.replace(old, new)
    return text


def make_dir(path, name, tagged=False):
    """A tokenizer directory for `name`'s template: Mixtral's on the shipped sentencepiece model (BOS <s>, EOS
    </s>), OLMoE's on the OLMo tokenizer (BOS = EOS = <|endoftext|>, as OLMoE-Instruct), Qwen3's on the OLMo
    tokenizer with <|im_start|> and <|im_end|> added as special tokens (EOS <|im_end|>, no BOS)."""
    import tokenizers

    path.mkdir(parents=True, exist_ok=True)
    src = os.path.join(ROOT, "model") if name == "mixtral" else os.path.join(HERE, "data", "olmo_tokenizer")
    for f in ("config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), path)
    config = json.load(open(path / "tokenizer_config.json"))
    if name == "olmoe":
        config.update(bos_token="<|endoftext|>")
    if name == "qwen3":
        tk = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                               for t in ("<|im_start|>", "<|im_end|>")])
        tk.save(str(path / "tokenizer.json"))
        config.update(eos_token="<|im_end|>")
        cfg = json.load(open(path / "config.json"))
        json.dump({**cfg, "eos_token_id": tk.token_to_id("<|im_end|>")}, open(path / "config.json", "w"))
    json.dump(config, open(path / "tokenizer_config.json", "w"))
    (path / "chat_template.jinja").write_text(template(name, tagged), encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["mixtral", "olmoe", "qwen3"])
def dirs(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    return request.param, make_dir(base / "plain", request.param), make_dir(base / "tagged", request.param, True)


def auto_tokenizer(path):
    return pytest.importorskip("transformers").AutoTokenizer.from_pretrained(str(path))


def test_rendering_and_ids_equal_apply_chat_template(dirs):
    """The text (with and without the generation prompt) and the ids are transformers' own."""
    name, plain, _ = dirs
    tok, hf = tokenizer.load(str(plain)), auto_tokenizer(plain)
    for conv in CONVERSATIONS:
        for gen in (False, True):
            msgs = conv[:-1] if gen else conv
            theirs = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert chat.render(tok, msgs, gen) == theirs
        ids, mask, cut = chat.encode(tok, {"messages": conv}, 10_000, "answer")
        assert ids == list(hf.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]) and cut == 0
        prompt, gold = chat.prompt_and_answer(tok, {"messages": conv})
        theirs = hf.apply_chat_template(conv[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
        assert prompt == list(theirs)
        assert gold == conv[-1]["content"]
    # BOS where the template writes it, once; nothing added after rendering (Qwen3 writes none)
    first = {"mixtral": tok.bos_id, "olmoe": 50279, "qwen3": hf.convert_tokens_to_ids("<|im_start|>")}[name]
    assert ids[0] == first and (name != "mixtral" or ids.count(tok.bos_id) == 1)


def test_assistant_mask_equals_transformers_on_the_tagged_template(dirs):
    """Our mask from the plain template (no generation blocks) equals transformers' assistant mask from the same
    template with {% generation %} blocks around the assistant's output, and so does our mask from the tagged one."""
    name, plain, tagged = dirs
    hf = auto_tokenizer(tagged)
    for conv in CONVERSATIONS:
        out = hf.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        theirs = list(out["assistant_masks"])
        theirs[0] = 0  # nothing predicts the first token
        for d in (plain, tagged):
            ids, mask, _ = chat.encode(tokenizer.load(str(d)), {"messages": conv}, 10_000, "answer")
            assert ids == list(out["input_ids"])
            assert mask == theirs, (name, d.name, [hf.decode([i]) for i, m in zip(ids, mask) if m])
        assert sum(theirs) > len([m for m in conv if m["role"] == "assistant"])  # content and the end-of-turn token
        _, everything, _ = chat.encode(tokenizer.load(str(plain)), {"messages": conv}, 10_000, "all")
        assert everything == [0] + [1] * (len(ids) - 1)


def write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": []}, "non-empty list"),
])
def test_malformed_chat_records_are_named_by_file_and_line(tmp_path, bad, message):
    good = {"messages": CONVERSATIONS[0]}
    path = write(tmp_path / "chat.jsonl", [good, bad])
    with pytest.raises(data.DataError, match=rf"chat.jsonl:2: .*{message}"):
        data.check_records(data.read_jsonl(path), path)


def test_a_template_that_refuses_the_conversation_is_named_by_file_and_line(tmp_path):
    """Mixtral's template raises on roles that do not alternate: a DataError naming the file, line and reason."""
    tok = tokenizer.load(str(make_dir(tmp_path / "mx", "mixtral")))
    conv = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    path = write(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}, {"messages": conv}])
    with pytest.raises(data.DataError, match=r"chat.jsonl:2: the chat template refused .*must alternate"):
        data.encode_examples(tok, data.read_jsonl(path), 512, path=path)


def test_a_checkpoint_without_a_template_is_refused_for_chat(tmp_path):
    tok = tokenizer.load(os.path.join(ROOT, "model"))  # the shipped model has no chat template
    with pytest.raises(data.DataError, match=r"chat.jsonl:1: .*model: chat records need a chat template"):
        path = write(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
        data.encode_examples(tok, data.read_jsonl(path), 512, path=path)


def test_jinja2_is_imported_only_for_chat_records():
    code = ("import sys; from files import data, tokenizer; import train, eval, router_profile; "
            "tok = tokenizer.load('model'); data.encode_example(tok, {'text': 'hi'}, 16); "
            "assert 'jinja2' not in sys.modules, 'jinja2 imported without a chat record'; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_gen_reads_chat_records_with_the_generation_prompt(tmp_path, monkeypatch):
    """eval's gen task on chat records: the prompt is the conversation before the last assistant turn rendered with
    add_generation_prompt=True (exactly what generate receives), the gold that turn's content."""
    tok = tokenizer.load(str(make_dir(tmp_path / "q", "qwen3")))
    seen = []

    def fake_generate(model, ids, mask, max_new_tokens, eos_token_id, pad_token_id):
        for row, m in zip(ids.tolist(), mask.tolist()):
            seen.append([i for i, keep in zip(row, m) if keep])
        answer = torch.tensor([tok.tk.encode(" 4", add_special_tokens=False).ids + [eos_token_id]] * ids.shape[0])
        return torch.cat([ids, answer], dim=1)

    monkeypatch.setattr(ev.generate, "generate", fake_generate)
    recs = [{"messages": CONVERSATIONS[0]}, {"messages": CONVERSATIONS[2]}]
    ev.check_task(recs, "gen")
    items = []
    res = ev.generation(torch.nn.Linear(1, 1), tok, recs, batch_size=2, max_new_tokens=4, seq_len=512, items=items)
    assert sorted(seen) == sorted(chat.prompt_and_answer(tok, r)[0] for r in recs)
    assert chat.render(tok, CONVERSATIONS[0][:1], True).endswith("<|im_start|>assistant\n")
    assert res["exact_match"] == 1.0 and [i["correct"] for i in items] == [True, True]
    assert [i["gold"] for i in items] == ["4", "4"] and items[0]["output"] == " 4"


def test_chat_records_train_and_profile(tmp_path):
    """train.py --method sieve on chat records with the checkpoint's template: the routing profile reads the
    conversations as rendered, the loss is on the assistant tokens, and the run finishes."""
    from tiny import tiny_checkpoint
    import train

    ckpt = tiny_checkpoint(tmp_path / "model")
    shutil.copy(os.path.join(TEMPLATES, "mixtral-8x7b-instruct-v0.1.jinja"), os.path.join(ckpt, "chat_template.jinja"))
    path = write(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS[:2]] * 4)
    tok = tokenizer.load(ckpt)
    (ids, mask), = data.encode_examples(tok, data.read_jsonl(path)[:1], 512)[0]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "4" and ids[-1] == tok.eos_id and mask[-1] == 1
    assert train.main(["--model", ckpt, "--data", path, "--method", "sieve", "--steps", "2", "--seq-len", "64",
                       "--out", str(tmp_path / "run")]) == 0
    assert json.load(open(tmp_path / "run" / "profile.json"))["samples"] == 8
