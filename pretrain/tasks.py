"""tasks.py: seeded generators of the study's multiple-choice tasks, whose answers are computed, not labelled.

    python pretrain/tasks.py                 # writes tasks/<name>.{train,val}.jsonl for every task in TASKS
    python pretrain/tasks.py --check         # regenerates them in memory; exit 1 if a committed file differs

Each task is a function (rng, vocabulary) -> (query, choices, gold index); the records have the format of the
other task files ({"id", "query", "choices", "gold"}, the query ending in "Answer:"), so train.py, eval.py
--task mc and study.py read them as they read ARC-Easy. Two domains, two kinds of text the model routes
differently (study.py --routing):
    numbers : max   (the largest of five two-digit numbers)
              count (how many numbers a list of 2-9 digits has)
    words   : words (how many words a phrase of 2-9 English words has)
Every answer is recomputed from the query text (check_record) before it is written, and every query occurs
once over both splits, so no validation item is trained on. The word task's validation phrases use only
words its train phrases never use (WORDS split in two halves). The shipped model's pretraining corpus
(Austen, Shakespeare, Python source, ARC / PIQA text) contains none of these items.
"""
import argparse
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# common English nouns and adjectives, listed for this file (no licence question); train phrases draw from the
# first half, validation phrases from the second
WORDS = ("apple river stone house garden window morning candle letter silver winter summer forest castle "
         "butter mirror pocket basket ladder hammer island valley meadow harbor bridge temple market cottage "
         "feather pencil button carpet orange purple yellow shadow thunder lantern blanket bottle kettle "
         "jacket rabbit turtle monkey donkey parrot falcon spider beetle dragon tiger lion horse sheep goat "
         "wolf bear eagle salmon cherry lemon melon grape honey bread cheese pepper ginger olive onion carrot "
         "potato tomato cabbage pumpkin wagon anchor arrow barrel cannon saddle sword shield crown ring "
         "needle thread ribbon velvet cotton marble copper iron glass paper clock chair table bench sofa "
         "piano violin drum flute trumpet guitar poem story song dance game puzzle riddle secret promise").split()


def max_(rng, vocab):
    """The largest of five distinct numbers 10-99 (two digits each: no length cue); the choices are the largest
    and three of the others."""
    xs = rng.sample(range(10, 100), 5)
    choices = [max(xs)] + rng.sample([x for x in xs if x != max(xs)], 3)
    return f"Question: the largest of {' '.join(map(str, xs))} is\nAnswer:", [str(c) for c in choices], 0


def count(rng, vocab):
    """How many numbers a list of 2-9 digits 1-9 has; the choices are the true length and three other lengths."""
    n = rng.randint(2, 9)
    xs = [rng.randint(1, 9) for _ in range(n)]
    others = rng.sample([k for k in range(2, 10) if k != n], 3)
    query = f"Question: how many numbers are in {' '.join(map(str, xs))}?\nAnswer:"
    return query, [str(n)] + [str(k) for k in others], 0


def words(rng, vocab):
    """How many words a phrase of 2-9 words (repeats allowed) has; choices the true count and three others."""
    n = rng.randint(2, 9)
    ws = [rng.choice(vocab) for _ in range(n)]
    others = rng.sample([k for k in range(2, 10) if k != n], 3)
    return f"Question: how many words are in \"{' '.join(ws)}\"?\nAnswer:", [str(n)] + [str(k) for k in others], 0


TASKS = {"max": max_, "count": count, "words": words}


def check_record(name, rec):
    """Recompute the answer from the query and compare it with the gold choice (a generator bug fails here)."""
    q = rec["query"].removeprefix("Question: ").split("\n")[0]
    if name == "words":
        want = str(len(q.split('"')[1].split()))
    else:
        nums = [int(x) for x in q.removesuffix(" is").removesuffix("?").split() if x.isdigit()]
        want = str(max(nums)) if name == "max" else str(len(nums))
    if rec["choices"][rec["gold"]] != want or len(set(rec["choices"])) != len(rec["choices"]):
        raise ValueError(f"{name}: record {rec['id']}: gold {rec['choices'][rec['gold']]!r}, expected {want!r}, "
                         f"or repeated choices {rec['choices']}")


def make(name, n_train, n_val, seed=0):
    """(train, val) records of one task: seeded, the gold choice shuffled into place, each query used once."""
    rng = random.Random(f"{name}-{seed}")  # a string seed: one stream per task, whatever the other tasks do
    half = len(WORDS) // 2
    vocab = {"val": WORDS[half:], "train": WORDS[:half]}
    out, seen = {"train": [], "val": []}, set()
    for split, n in (("val", n_val), ("train", n_train)):
        tries = 0
        while len(out[split]) < n:
            tries += 1
            if tries > 100 * n:
                raise ValueError(f"{name}: cannot draw {n} distinct {split} items")
            query, choices, gold = TASKS[name](rng, vocab[split])
            if query in seen:  # every query once over both splits: no validation item is trained on
                continue
            seen.add(query)
            order = list(range(len(choices)))
            rng.shuffle(order)
            rec = dict(id=f"{name}-{split}-{len(out[split])}", query=query, choices=[choices[i] for i in order],
                       gold=order.index(gold))
            check_record(name, rec)
            out[split].append(rec)
    return out["train"], out["val"]


def dumps(records):
    return "".join(json.dumps(r) + "\n" for r in records)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    ap.add_argument("--n-train", type=int, default=2000, help="train records per task")
    ap.add_argument("--n-val", type=int, default=400, help="validation records per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(ROOT, "tasks"), help="directory of the task files")
    ap.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = ap.parse_args(argv)
    unknown = [t for t in args.tasks.split(",") if t not in TASKS]
    if unknown or args.n_train < 1 or args.n_val < 1:
        ap.error(f"--tasks: unknown {unknown}; choose from {','.join(TASKS)}" if unknown
                 else "--n-train and --n-val must be at least 1")
    if not os.path.isdir(args.out):
        ap.error(f"--out {args.out}: directory not found")
    bad = 0
    for name in args.tasks.split(","):
        train, val = make(name, args.n_train, args.n_val, args.seed)
        for split, recs in (("train", train), ("val", val)):
            path = os.path.join(args.out, f"{name}.{split}.jsonl")
            if args.check:
                ok = os.path.isfile(path) and open(path).read() == dumps(recs)
                bad += not ok
                print(f"{path}: {'same' if ok else 'DIFFERS'}")
            else:
                with open(path, "w") as f:
                    f.write(dumps(recs))
                print(f"wrote {path}: {len(recs)} records")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
