"""Tools built on the library, each run as `python -m tools.NAME` from the repository: the study and its
claims, the benchmark and the GPU measurement, the verifier."""
