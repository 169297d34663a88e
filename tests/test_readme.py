"""The documentation points only at files that exist, and the README's file map names every file of the code.

A reader follows the README's links and file map to the code; a renamed or removed file must not leave a dead
pointer behind, and a new file must get its line in the map."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "model/README.md", "tasks/README.md", "notes/fidelity.md", "notes/speed.md", "notes/history.md"]


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def test_every_relative_link_opens_a_file_of_the_repository():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", read(doc)):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target.split("#")[0]))
            assert os.path.exists(path), f"{doc}: link to {target}, which is not in the repository"


def test_file_map_names_every_python_file_and_test():
    text = read("README.md")
    mapped = set(re.findall(r"^([\w./-]+\.py)\s", text, flags=re.M))
    code = {os.path.relpath(os.path.join(d, f), ROOT) for d in [ROOT] + [os.path.join(ROOT, p) for p in ("files", "training", "evaluation", "tools")] for f in os.listdir(d) if f.endswith(".py") and f != "__init__.py"}
    tests = {f for f in os.listdir(os.path.join(ROOT, "tests")) if f.startswith("test_") and f.endswith(".py")}
    missing = sorted((code | tests) - mapped)
    assert not missing, f"README.md's file map has no line for {missing}"
    gone = sorted(f for f in mapped if not os.path.exists(os.path.join(ROOT, f))
                  and not os.path.exists(os.path.join(ROOT, "tests", f)))
    assert not gone, f"README.md's file map names files that do not exist: {gone}"


def test_no_pointer_to_files_outside_the_repository():
    for doc in DOCS:
        for name in ("DESIGN.md", "STYLE.md", "../shared"):
            assert name not in read(doc), f"{doc} mentions {name}, which is not in the repository"



def test_line_links_point_at_what_they_name():
    """A link to lines of a file, [`name`](file.py#L10-L20), starts at the line that defines `name` (def/class, its
    last dotted part) or holds it: the README's answers stay true when the code moves."""
    checked = 0
    for doc in DOCS:
        for m in re.finditer(r"\[([^\]]*)\]\(([^)\s#]+)#L(\d+)(?:-L\d+)?\)", read(doc)):
            text, path, line = m.group(1), m.group(2), int(m.group(3))
            names = re.findall(r"`([^`]+)`", text)
            assert names, f"{doc}: the link to {path}#L{line} names nothing in backticks"
            with open(os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)), encoding="utf-8") as f:
                first = f.read().splitlines()[line - 1]
            leaf = names[0].split(".")[-1].removesuffix("()")
            assert re.search(rf"\b(def|class) {re.escape(leaf)}\b", first) or leaf in first, \
                f"{doc}: {text} -> {path} line {line} is {first.strip()!r}"
            checked += 1
    assert checked, "no line links found"
