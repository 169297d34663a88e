"""The parts of train.py: its flags (flags.py), checkpoints and guards (checkpoint.py), what a run writes at
the end (outputs.py), several processes (parallel.py)."""
