"""What eval.py shares with lm-evaluation-harness (v0.4), so that its numbers and per-item logs can be set side by
side with lm-eval's: the standard error of a mean, few-shot contexts drawn as lm-eval's default sampler, and the
per-item log (`eval.py --log-samples`, lm-eval's `--log_samples`).

- `mean_stderr`: lm-eval's `mean_stderr`: the sample standard deviation (n - 1) over sqrt(n); for a 0/1 metric
  sqrt(p (1 - p) / (n - 1)). None below two items.
- `fewshot`: lm-eval's ContextSampler with its defaults: one `random.Random(seed)` (lm-eval's fewshot seed is 1234)
  drawn in the order of the evaluated records, `rnd.sample(pool, k)` per record (k + 1 when the pool is the evaluated
  file itself, the record then dropped from its own examples); each example written as its prompt + " " + its answer
  (target_delimiter), the examples and the record joined by "\\n\\n" (fewshot_delimiter).
"""
import json
import math
import random

from files import atomic


def mean_stderr(values):
    """lm-eval's standard error of the mean of `values` (sample std / sqrt(n)); None for fewer than 2."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def _prompt_key(kind):
    return {"mc": "query", "qa": "question"}[kind]


def _example(rec, kind):  # a solved example as lm-eval writes it: doc_to_text + " " + doc_to_target
    if kind == "mc":
        return rec["query"] + " " + rec["choices"][rec["gold"]]
    return rec["question"] + " " + str(rec["answer"])


def fewshot(records, pool, k, seed=1234, kind="mc", same_file=False):
    """Copies of `records` whose prompt ("query" / "question") is preceded by k solved examples from `pool`, drawn
    as lm-eval's default sampler (module docstring). same_file: the pool is the evaluated file (a record never
    shows itself)."""
    if kind not in ("mc", "qa"):
        raise ValueError(f"few-shot examples are written for mc and qa records, not {kind}")
    need = k + 1 if same_file else k
    if len(pool) < need:
        raise ValueError(f"--fewshot-data has {len(pool)} records, fewer than the {need} that --num-fewshot {k} draws")
    rnd, key, out = random.Random(seed), _prompt_key(kind), []
    for rec in records:
        shots = [x for x in rnd.sample(pool, need) if x != rec][:k]
        context = "\n\n".join(_example(x, kind) for x in shots)
        out.append({**rec, key: context + "\n\n" + rec[key]} if k else dict(rec))
    return out


def write_samples(path, items):
    """--log-samples: one JSON object per line, written atomically."""
    atomic.write_text(path, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
