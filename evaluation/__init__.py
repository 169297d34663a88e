"""The parts of eval.py: extracting the final answer of a generation (answers.py), and what lm-evaluation-harness
does the same way (harness.py: standard errors, the few-shot sampler, the per-item log)."""
