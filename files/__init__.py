"""Files in and out: model checkpoints in the hub format (hub.py), tokenizers and JSON-lines records (data.py),
pictures (plots.py)."""
