"""The final number of a GSM8K-style answer, for eval.py's `gen` task: the first number after the last "####" if
there is one (GSM8K's gold format, lm-eval's strict match), else the last number in the text (its flexible
extract); commas dropped and the value normalised, so "1,200" == "1200" and "3.50" == "3.5"."""
import re
from decimal import Decimal

_NUMBER = re.compile(r"-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")  # 1,234  -3.50  .5 (a trailing "." is not taken)


def _normalise(s):
    d = Decimal(s.replace(",", ""))
    return "0" if d == 0 else format(d.normalize(), "f")  # "3.50" -> "3.5", "1,200" -> "1200", "-0" -> "0"


def extract_number(text):
    """The final number of an output or gold answer, normalised ("#### 1,234" -> "1234"), or None:
    the first number after the last "####" if there is one, else the last number in the text."""
    text = str(text)
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        if found:
            return _normalise(found[0])
    found = _NUMBER.findall(text)
    return _normalise(found[-1]) if found else None


def exact_match(outputs, answers):
    """Per output: does its final number equal the gold answer's? (No number in the output: False.)"""
    preds = [extract_number(o) for o in outputs]
    return [p is not None and p == extract_number(a) for p, a in zip(preds, answers)]
