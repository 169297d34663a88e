"""The pictures: a run's loss curve, the routing heatmap of a profile (router_profile.py), DMEP's utilization at
pruning; every picture is written by `save`.

matplotlib is optional: it is imported only here, only when a picture is drawn, and without it each function
prints a one-line note and returns False (no file written). The Figure API is used, not pyplot: no global
state, no GUI backend. Files are written atomically (a reader never sees half a PNG).
"""
import os

from files import atomic


def figure_class(what):
    """matplotlib's Figure, or None after printing that matplotlib is missing (so `what` is not drawn)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"plots: matplotlib is not installed, skipping {what}")
        return None
    return Figure


def save(fig, path):
    """The figure as a PNG at `path`, written atomically."""
    atomic.write(os.fspath(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def loss(log, path):
    """loss.png: the training loss against the step, the learning rate on a second axis (train.py has no
    validation set, so there is no validation curve). log: train.py's entries (step, loss, lr)."""
    Figure = figure_class(path)
    if Figure is None:
        return False
    steps = [e["step"] for e in log]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    (loss_line,) = ax.plot(steps, [e["loss"] for e in log], color="tab:blue", label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per target token)", color="tab:blue")
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    (lr_line,) = lr.plot(steps, [e["lr"] for e in log], color="tab:orange", linestyle="--", label="learning rate")
    lr.set_ylabel("learning rate", color="tab:orange")
    lr.set_ylim(bottom=0)
    lr.legend(handles=[loss_line, lr_line], loc="best")  # inside the axes, where it covers the least
    ax.set_title(f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}: {len(log)} steps")
    save(fig, path)
    return True


def heatmap(path, values, title, xlabel, ylabel, rows, cbar, marks=(), dots=(), note=None, cbar_line=None):
    """One way to draw every heatmap here: `values` (list of equal-length rows), `rows` the row labels,
    x ticks the column index, `marks` (row, col) cells outlined in red, `dots` (row, col) cells crossed out,
    `cbar_line` a value marked by a red line on the colour bar. Returns True when the PNG was written."""
    Figure = figure_class(path)
    if Figure is None:
        return False
    from matplotlib.patches import Rectangle
    n_cols = len(values[0])
    fig = Figure(figsize=(min(18, max(8, 2.5 + 0.28 * n_cols)), 1.8 + 0.3 * len(values)))
    ax = fig.add_subplot()
    im = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    step = 1 if n_cols <= 32 else 4 if n_cols <= 128 else 8
    ax.set_xticks(range(0, n_cols, step), [str(c) for c in range(0, n_cols, step)], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    for r, c in marks:
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.4))
    for r, c in dots:
        ax.plot([c], [r], marker="x", color="white", markersize=5)
    bar = fig.colorbar(im, ax=ax, label=cbar)
    if cbar_line is not None:
        bar.ax.axhline(cbar_line, color="red", linewidth=2)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7)
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    save(fig, path)
    return True


def routing(p, path, plan=None):
    """A profile's layers x experts heatmap, experts by id: count / the uniform share (1 = balanced). With a
    sieve plan ({layer: [ids]}), the chosen experts are outlined."""
    values = []
    for row in p["counts"]:
        mean = max(sum(row) / len(row), 1e-12)
        values.append([c / mean for c in row])
    layer_pos = {layer: i for i, layer in enumerate(p["layers"])}
    marks = [(layer_pos[int(layer)], e) for layer, ids in (plan or {}).items() for e in ids]
    note = f"red outline: the {len(marks)} experts of the plan" if plan else None
    title = f"{p['model_type']} routing counts / uniform share ({p['tokens']:,} tokens, top-{p['top_k']})"
    return heatmap(path, values, title, "expert id", "MoE layer", [str(layer) for layer in p["layers"]],
                   "count / (layer total / E)", marks=marks, note=note)


def dmep(report, path):
    """DMEP's utilization at pruning (modules x LoRA experts, as a share of the module's assignments);
    pruned experts are crossed out; the note gives the keep rule tau / N."""
    names = list(report)
    values = [report[n]["util"] for n in names]
    width = max(len(v) for v in values)
    values = [v + [float("nan")] * (width - len(v)) for v in values]
    dots = [(i, j) for i, n in enumerate(names) for j in range(report[n]["before"]) if j not in report[n]["keep"]]
    tau = next(iter(report.values()))["tau"]
    note = f"x: pruned. Red line on the colour bar: tau/N = {tau}/{width} = {tau / width:.3f} (each module keeps >= K)"
    before, after = sum(r["before"] for r in report.values()), sum(r["after"] for r in report.values())
    return heatmap(path, values, f"DMEP utilization at pruning: {after} of {before} LoRA experts kept",
                   "LoRA expert", "module", [n.removeprefix("model.layers.") for n in names],
                   "share of top-K assignments", dots=dots, note=note, cbar_line=tau / width)
