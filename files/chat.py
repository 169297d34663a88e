"""Chat records, `{"messages": [{"role", "content"}, ...]}`, rendered with the checkpoint's own chat template.

This is the format TRL, axolotl, torchtune and LLaMA-Factory read. The text is what transformers'
`apply_chat_template` makes: the template (`chat_template.jinja`, or `chat_template` in tokenizer_config.json)
rendered by jinja2 in a sandbox with transformers' settings (trim_blocks, lstrip_blocks, loop controls, its
`tojson`, `raise_exception`, `strftime_now`; the special tokens as strings: bos_token, eos_token, ...), then
tokenized with the special tokens written in it matched and nothing added: BOS only where the template writes
`bos_token` (transformers tokenizes the rendering with add_special_tokens=False). No EOS is appended either: the
template ends each turn as the model was trained to.

Loss on the assistant turns (`--loss-on answer`): with `{% generation %}` blocks in the template (as TRL's
training templates have), exactly their characters, as transformers' return_assistant_tokens_mask. Without them
(the templates models ship), turn i's tokens are what the model generates after its prompt: from the end of
messages[:i] rendered with add_generation_prompt=True (which must be where the whole rendering goes on) to the
end of the message's content, and the special token right after it (EOS, <|im_end|>: the model learns to stop).
A token that straddles a boundary counts as assistant's, as transformers counts it. `--loss-on all`: every token.

jinja2 is needed only here, imported when a chat record is rendered.
"""
import functools
import json
import os
import re

ROLES = ("system", "user", "assistant")
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as transformers detects {% generation %}


class ChatError(ValueError):
    """A chat record or template that cannot be rendered; data.py adds the file and line."""


def check_messages(rec):
    """ValueError saying what is wrong with a chat record: messages a non-empty list of {"role", "content"} with a
    known role and non-empty string content, and at least one assistant turn (what trains or is scored)."""
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"chat record: 'messages' must be a non-empty list, not {str(msgs)[:60]!r}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"chat record: message {i + 1} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"chat record: message {i + 1} has role {m['role']!r}, not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise ValueError(f"chat record: message {i + 1} ({m['role']}) has empty or non-string content")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("chat record: no assistant turn (nothing to train on or to score)")


def _info(tok):
    """What chat needs beyond tokenizer.Tokenizer, read once per tokenizer from its directory (tok.where): the template
    (chat_template.jinja first, as transformers 5, else tokenizer_config.json's, a string or the "default" of a
    list), the special tokens as the strings the template sees, and a `tokenizers.Tokenizer` that matches special
    tokens in the rendered text and gives character offsets (a sentencepiece model: converted exactly,
    tokenizer_files.from_sentencepiece, so its ids are sentencepiece's)."""
    if getattr(tok, "_chat", None) is None:
        from files import tokenizer_files

        template = tok.tok_config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja_file = os.path.join(tok.where, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            template = open(jinja_file, encoding="utf-8").read()
        if tok.sp is not None:
            backend = tokenizer_files.from_sentencepiece(os.path.join(tok.where, "tokenizer.model"))
        else:
            backend = tok.tk
        special = {}
        for name in SPECIAL_NAMES:  # tokenizer_config.json's strings, as transformers passes special_tokens_map
            value = tok.tok_config.get(name, tok.special_map.get(name))
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None:
                special[name] = str(value)
        if tok.sp is not None:  # a lone tokenizer.model: its own pieces
            sp = tok.sp
            for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
                if i >= 0:
                    special.setdefault(name, tok.sp.id_to_piece(i))
        special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        tok._chat = dict(template=template, special=special, backend=backend, special_ids=special_ids)
    return tok._chat


def encode_rendered(tok, text):
    """(ids, (start, end) character offsets) of a rendered conversation: special tokens written in it matched,
    nothing added (transformers: add_special_tokens=False)."""
    enc = _info(tok)["backend"].encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets


@functools.lru_cache(maxsize=8)
def _compile(template):
    """The template compiled as transformers compiles it (chat_template_utils._compile_jinja_template)."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):  # {% generation %}...{% endgeneration %}: record where it rendered
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            if self.environment.spans is not None:
                self.environment.spans.append(text)  # placed by render: the blocks before it are known there
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.spans = None
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def render(tok, messages, add_generation_prompt=False, with_spans=False):
    """The conversation as the template writes it (and, with_spans, the (start, end) characters of each
    {% generation %} block, as transformers finds them)."""
    info = _info(tok)
    if not info["template"]:
        raise ChatError(f"{tok.where}: chat records need a chat template, and this checkpoint has none "
                        "(no chat_template in tokenizer_config.json, no chat_template.jinja)")
    import jinja2

    compiled = _compile(info["template"])
    kw = dict(messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
              **info["special"])
    try:
        if not with_spans:
            return compiled.render(**kw)
        blocks, spans, env = [], [], compiled.environment
        env.spans = marks = []
        for block in compiled.generate(**kw):  # a generation block's text is marked when it is rendered
            while marks:
                text = marks.pop(0)
                start = len("".join(blocks))
                spans.append((start, start + len(text)))
            blocks.append(block)
        return "".join(blocks), spans
    except jinja2.exceptions.TemplateError as e:
        raise ChatError(f"the chat template refused this conversation: {e}") from None
    finally:
        compiled.environment.spans = None


def assistant_spans(tok, messages, text):
    """(start, end) characters of `text` (the whole conversation rendered) that the loss covers, before the
    special tokens after each turn are added (see the module docstring)."""
    if _GENERATION.search(_info(tok)["template"]):
        return render(tok, messages, with_spans=True)[1]
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(tok, messages[:i], add_generation_prompt=True) if i else ""
        if not text.startswith(head):
            raise ChatError(f"the chat template writes the conversation before assistant turn {i + 1} differently "
                            "alone than inside the whole conversation, so its tokens cannot be told apart "
                            "(use --loss-on all, or a template with {% generation %} blocks)")
        content = m["content"].strip()
        at = text.find(content, len(head))
        if at < 0:  # a template that rewrites the content (Qwen3 moves <think>...</think> out): its last line
            content = content.splitlines()[-1].strip()
            at = text.find(content, len(head))
        if at < 0:
            raise ChatError(f"the chat template does not write assistant turn {i + 1}'s content as it is "
                            "(use --loss-on all, or a template with {% generation %} blocks)")
        spans.append((len(head), at + len(content)))
    return spans


def encode(tok, rec, max_len, loss_on):
    """(ids, loss_mask, tokens cut) of a chat record: the whole conversation rendered and tokenized, cut from the
    right to max_len; the mask as the module docstring says (loss_mask[0] is always 0)."""
    messages = rec["messages"]
    text = render(tok, messages)
    ids, offsets = encode_rendered(tok, text)
    if loss_on == "all":
        mask = [0] + [1] * (len(ids) - 1)
    else:
        mask = [0] * len(ids)
        for start, end in assistant_spans(tok, messages, text):
            # tokens overlapping [start, end) (a token straddling the edge counts, as char_to_token does)
            inside = [j for j, (a, b) in enumerate(offsets) if a < end and b > start]
            if not inside:
                continue
            last = inside[-1]
            if last + 1 < len(ids) and ids[last + 1] in _info(tok)["special_ids"]:  # EOS, <|im_end|>: the model
                last += 1  # stops; one token only (Llama 3 writes the next turn's <|start_header_id|> right after)
            for j in range(inside[0], last + 1):
                mask[j] = 1
        mask[0] = 0
    if not any(mask[1:max_len]):
        raise ChatError("no assistant token to train on within --seq-len" if any(mask) else
                        "the chat template wrote no assistant token")
    return ids[:max_len], mask[:max_len], max(0, len(ids) - max_len)


def prompt_and_answer(tok, rec):
    """For generation: (prompt ids, gold answer) of a chat record: the messages before its last assistant turn
    rendered with add_generation_prompt=True, and that turn's content."""
    messages = rec["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids, _ = encode_rendered(tok, render(tok, messages[:last], add_generation_prompt=True))
    return ids, messages[last]["content"]
