"""The layout: every import of the library (lazy ones inside functions included) runs one way, down the layers
the README's file map describes, and none forms a cycle; the test-only oracles stay out of the library."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("files", "training", "evaluation", "tools")
# lowest first; a module may import its own layer and the layers below it, never one above
LAYERS = [
    ("files", {"files.atomic", "files.chat", "files.data", "files.plots", "files.tokenizer", "files.tokenizer_files"}),  # writing files, tokenizers and records, pictures
    ("model", {"moe", "moe_fast", "quant", "generate", "files.hub"}),  # the transformer, its fast twins, a quantized base, reading checkpoints
    ("lora", {"lora", "lora_fast"}),
    ("methods", {"sieve", "router_profile", "perft", "dmep", "methods", "files.export"}),
    ("training and evaluation", {"train", "eval", "training.flags", "training.checkpoint", "training.outputs",
                                 "training.parallel", "training.memory", "training.memcount", "evaluation.answers",
                                 "evaluation.harness"}),
    ("tools", None),  # everything under tools/
]


def modules():
    """{module name: path} of the root's .py files and every package's."""
    found = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    for pkg in PACKAGES:
        for f in os.listdir(os.path.join(ROOT, pkg)):
            if f.endswith(".py") and f != "__init__.py":
                found[f"{pkg}.{f[:-3]}"] = os.path.join(ROOT, pkg, f)
    return found


def imports(path, known):
    """[(module imported, line, at module level?)] of the project's modules imported anywhere in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n in known:
                out.append((n, node.lineno, id(node) in top))
    return out


def layer_of(name):
    for i, (_, members) in enumerate(LAYERS):
        if members is None and name.startswith("tools."):
            return i
        if members is not None and name in members:
            return i
    raise AssertionError(f"{name} is in no layer of test_layout.LAYERS: place it (and in the README's file map)")


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_imports_run_down_the_layers():
    known = modules()
    wrong = []
    for name, path in known.items():
        for dep, line, _ in imports(path, known):
            if layer_of(dep) > layer_of(name):
                wrong.append(f"{os.path.relpath(path, ROOT)}:{line} ({LAYERS[layer_of(name)][0]}) imports {dep} "
                             f"({LAYERS[layer_of(dep)][0]})")
    assert not wrong, "imports from a lower layer to a higher one:\n" + "\n".join(wrong)


def test_no_import_cycle():
    known = modules()
    graph = {name: sorted({d for d, _, _ in imports(path, known)} - {name}) for name, path in known.items()}
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for d in graph[n]:
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n, [n])


def test_the_oracles_stay_out_of_the_library():
    """transformers and peft are test-only: the library never imports them; a tool only inside the function
    that compares with them (so the tool runs without them otherwise)."""
    wrong = []
    for name, path in modules().items():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for m in mods:
                if m.split(".")[0] in ("transformers", "peft", "bitsandbytes"):
                    if not name.startswith("tools.") or id(node) in top:
                        wrong.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} imports {m}")
    assert not wrong, "\n".join(wrong)
