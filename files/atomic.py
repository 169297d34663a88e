"""Every file the project writes goes through here, written whole or not at all.

A reader (or a run killed half-way, or a power cut) sees either the old file or the whole new one, never part of
one: the content goes to a temporary name beside the target, is fsynced, then renamed over it, and the directory
is fsynced so the rename itself survives. A directory (a checkpoint, an export) is built under a temporary name
and swapped in the same way.

    write(path, fill)          fill(tmp) writes the file at tmp; the primitive the others use
    write_text / write_json    text, JSON (indent 1)
    write_tensors              a safetensors file (tensors copied to the host, contiguous)
    write_dir(path, fill)      fill(tmp_dir) builds the directory; then it replaces path
Appending a line to a log (train.py's log.jsonl) is the one write that is not atomic: a cut line is the last
line, and resume rewrites the log from the checkpoint.
"""
import json
import os
import shutil

from safetensors.torch import save_file


def write(path, fill):
    """fill(tmp) then rename tmp -> path, with the file and then its directory fsynced."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        fill(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    def fill(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write(path, fill)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1))


def write_tensors(path, tensors, metadata=None):
    """{name: tensor} as one safetensors file; each tensor copied to the host (contiguous) first."""
    host = {n: t.detach().contiguous().cpu() for n, t in tensors.items()}
    write(path, lambda tmp: save_file(host, tmp, metadata=metadata))


def write_dir(path, fill):
    """fill(tmp) builds a whole directory under a temporary name, which then replaces `path`."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OSError(f"{path}: exists and is not a directory")
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        fill(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
