"""compare: another implementation's tensors judged one by one against what the reference computes from the
tensors they recorded before each (verify_forced.forward), and where they first depart.

The bound (README, "Verify your implementation"). For each tensor the reference computes `exact` (no rounding
to speak of) and `rounded` (the same ops in the run's dtype, rounding wherever a plain run rounds) from the same
inputs; sigma, the rms of rounded - exact over the rms of exact (at least one unit roundoff u of the run's
dtype), is what the run's arithmetic does to this tensor here: about 0.4 u for one rounded op, more for a chain
(attention, an expert), and it grows with every op between the tensor and the nearest one they recorded.
Theirs passes when
    rms(theirs - exact) <= C_TENSOR * sigma * rms(exact)                over the tensor, and
    rms_row(theirs - exact) <= C_ROW * max(rms_row(rounded - exact), sigma * rms_row(exact), u * rms(exact))
                                                                                   for each token;
another correct implementation rounds at other places but at about as many, so its sigma is about ours. Any
non-finite value where the reference is finite fails. Routing: top-k sets per token; a different set is a
near-tie (excused, listed apart) when the reference's gap between its k-th and (k+1)-th router logit is below
twice the logits' own per-element bound, else a divergence. Weights are compared paired with their ids.
"""
import itertools
import re
from typing import NamedTuple

import torch

from tools import verify_forced as forced
from tools import verify_schema as schema

C_TENSOR = 3  # x sigma: the whole tensor's rms error (a statistic over many elements: stable)
C_ROW = 6  # x the row's own rounding: one token's rms error (a row of a few elements fluctuates more)


class Unusable(ValueError):
    """theirs cannot be compared (exit 2): wrong format, shapes, ids, nothing comparable."""


class Row(NamedTuple):
    name: str
    failed: bool
    rel: float | None  # rms(theirs - exact) / rms(exact) over the judged tokens
    bound: float | None  # C_TENSOR * sigma
    ratio: float | None  # the worst of the tensor's and any token's error / bound (> 1: fails)
    golden: float | None  # rms(theirs - golden) / rms(golden): the difference accumulated since the input ids
    token: int | None  # the first failing token (b*T + t), or the worst one
    note: str


class Bound(NamedTuple):
    sigma: float  # relative rms of rounded - exact, at least u
    scale: float  # rms(exact) over the judged rows
    row: torch.Tensor  # (M,) allowed rms error of each row
    elem: torch.Tensor  # (M,) allowed error of one element of each row (the near-tie rule)


def token_at(n, T):
    return "the whole" if n is None else f"(b{n // T}, t{n % T})"


def unit(dtype):
    return torch.finfo(dtype).eps / 2


def coarser(a, b):
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def rms(x, dim=None):
    return x.pow(2).mean().sqrt().item() if dim is None else x.pow(2).mean(dim).sqrt()


def bound(exact, rounded, keep, u):
    M = keep.shape[0]
    e, d = exact.reshape(M, -1).double(), (rounded.double() - exact.double()).reshape(M, -1)
    ok = keep & torch.isfinite(e).all(-1)
    scale = rms(e[ok]) if ok.any() else 0.0
    sigma = max(rms(d[ok]) / scale, u) if scale > 0 else u
    floor = u * scale  # a row near 0 (a cancellation) still carries rounding of the size of its terms
    row = C_ROW * torch.maximum(rms(d, -1), sigma * rms(e, -1)).clamp_min(floor)
    elem = C_ROW * torch.maximum(d.abs().amax(-1), sigma * e.abs().amax(-1)).clamp_min(floor)
    return Bound(sigma, scale, row, elem)


class Judge:
    """Called by verify_forced.forward at every name; keeps a Row per tensor theirs has, and the names it lacks."""

    def __init__(self, golden, theirs, cfg, run_dtype):
        self.golden, self.theirs, self.cfg, self.run = golden, theirs, cfg, run_dtype
        self.B, self.T = golden["input_ids"].shape
        self.rows, self.missing, self.bounds = [], [], {}
        self.ex = forced.exact_dtype(run_dtype)

    def take(self, name, like):
        """theirs[name] in the shape of `like` (merged or split trailing dims, (B*T, ...) for (B, T, ...))."""
        t = self.theirs.get(name)
        if t is None:
            return None
        if not t.is_floating_point():
            raise Unusable(f"{name}: dtype {t.dtype}, expected a floating tensor")
        per_token = lambda x: x.dim() >= 1 and (tuple(x.shape[:2]) == (self.B, self.T) or x.shape[0] == self.B * self.T)
        if t.shape != like.shape and not (t.numel() == like.numel() and (like.dim() == 0 or per_token(t) and per_token(like))):
            raise Unusable(f"{name}: shape {tuple(t.shape)}, expected {tuple(like.shape)} {schema.entry(name)[0]}"
                           " (python -m tools.verify names)")
        return t.reshape(like.shape).to(like.device)

    def forced(self, t, rows):
        return forced.Value(t.to(self.ex), t.to(self.run), torch.zeros(rows, dtype=torch.bool, device=t.device))

    def tensor(self, name, v, slots=None, t=None, tokens=None):
        t = self.take(name, v.exact) if t is None else t
        M = v.taint.shape[0]
        dtype = self.run if t is None else coarser(self.run, t.dtype)
        rounded = v.rounded if dtype == self.run else v.rounded.to(dtype).to(v.rounded.dtype)  # they stored coarser
        b = self.bounds[name] = bound(v.exact, rounded, ~v.taint, unit(dtype))
        if t is None:
            self.missing.append(name)
            return v
        self.rows.append(self.judge(name, v, t, b, slots, tokens))
        return self.forced(t, M)

    def judge(self, name, v, t, b, slots, tokens):
        M = v.taint.shape[0]
        e, tt = v.exact.reshape(M, -1).double(), t.reshape(M, -1).double()
        token = (lambda r: int(tokens[r])) if tokens is not None else (lambda r: r if M > 1 else None)
        fin_e, fin_t = torch.isfinite(e).all(-1), torch.isfinite(tt).all(-1)
        keep = ~v.taint & fin_e
        g = self.golden.get(name)
        vs = None
        if g is not None and g.numel() == t.numel() and fin_t.all() and g.abs().max() > 0:
            vs = rms(t.double().cpu().flatten() - g.double().flatten()) / rms(g.double())
        apart = [f"{int((~fin_e).sum())} token(s) not judged: their inputs were not finite"] if (~fin_e).any() else []
        if v.taint.any() and M == 1:
            apart.append("not judged: a token's routing was not recorded and is a near-tie upstream (record lm_head "
                         "and the loss is judged from it)")
        elif v.taint.any():
            apart.append(f"{int(v.taint.sum())} token(s) excused (routing not recorded, a near-tie upstream): "
                         + ", ".join(self.where(token(r)) for r in v.taint.nonzero().squeeze(1)[:4].tolist()))
        bad = fin_e & ~fin_t  # excused or not: nothing excuses a NaN
        if bad.any():
            r = int(bad.nonzero()[0])
            kind = "nan" if torch.isnan(tt[r]).any() else "inf"
            return Row(name, True, None, None, None, vs, token(r), f"not finite ({kind}) where the reference is finite")
        d = tt - e
        row_ratio = torch.where(keep, rms(d, -1) / b.row.clamp_min(1e-300), torch.zeros_like(b.row))
        rel = rms(d[keep]) / b.scale if keep.any() and b.scale > 0 else 0.0
        tensor_ratio = rel / (C_TENSOR * b.sigma)
        ratio = max(tensor_ratio, float(row_ratio.max()) if M else 0.0)
        over = (row_ratio > 1).nonzero().squeeze(1)
        worst = int(row_ratio.argmax()) if M else 0
        r = int(over[0]) if len(over) else worst
        note = "; ".join(apart)
        if ratio <= 1:
            return Row(name, False, rel, C_TENSOR * b.sigma, ratio, vs, None, note)
        if len(over):
            why = (f"token error {rms(d[r]):.3g} > its bound {b.row[r]:.3g} ({len(over)} token(s) over)"
                   if M > 1 else f"error {rms(d[r]):.3g} > bound {b.row[r]:.3g}")
        else:
            why = f"rms error {rel:.3g} of its size > {C_TENSOR} sigma = {C_TENSOR * b.sigma:.3g} (worst token named)"
        if (tt[r] == 0).all() and (e[r] != 0).any():
            why += "; their row is zero (dropped: a capacity limit?)"
        elif slots is not None:
            why += self.missing_term(r, tt[r], e[r], b.row[r], *slots)
        return Row(name, True, rel, C_TENSOR * b.sigma, ratio, vs, token(r), "; ".join([why] + apart))

    @staticmethod
    def missing_term(n, t, e, tol, slots, idx):  # mlp.experts: is one expert's term missing at token n?
        for k in range(idx.shape[1]):
            if rms(t - (e - slots[n, k].double())) <= tol:
                return f"; expert {int(idx[n, k])}'s term is missing there (dropped: a capacity limit?)"
        return ""

    def where(self, n):
        return token_at(n, self.T)

    def routing(self, prefix, logits, route):
        """(ids (N, K) to go on with, topk_weights Value): theirs when recorded, else the reference's."""
        name, (N, K), cfg = prefix + "topk_ids", (self.B * self.T, self.cfg.num_experts_per_tok), self.cfg
        _, ids_e = route(logits.exact)
        lg = logits.exact.reshape(N, -1).double()
        top = lg.topk(min(K + 1, lg.shape[1]), dim=-1).values
        gap = top[:, K - 1] - top[:, K] if lg.shape[1] > K else torch.full((N,), float("inf"), dtype=lg.dtype, device=lg.device)
        near = gap < 2 * self.bounds[prefix + "gate"].elem  # (N,) rounding could swap these experts
        t_ids, taint = self.theirs.get(name), logits.taint.clone()
        if t_ids is None:
            self.missing.append(name)
            ids, taint = ids_e, taint | near  # theirs may have chosen otherwise on a near-tie: excused below
        else:
            if t_ids.is_floating_point() or t_ids.numel() != N * K:
                raise Unusable(f"{name}: {t_ids.dtype} {tuple(t_ids.shape)}, expected integer ids (B, T, K) = "
                               f"({self.B}, {self.T}, {K})")
            ids = t_ids.reshape(N, K).long().to(ids_e.device)
            if ids.min() < 0 or ids.max() >= cfg.num_experts:
                raise Unusable(f"{name}: expert id {int(ids.max() if ids.max() >= cfg.num_experts else ids.min())} "
                               f"outside 0..{cfg.num_experts - 1}")
            differ = (ids.sort(-1).values != ids_e.sort(-1).values).any(-1)
            excused, hard = differ & (near | taint), differ & ~(near | taint)
            note = (f"{int(excused.sum())} near-tie flip(s) excused (logit gap below twice the logits' bound): "
                    + ", ".join(self.where(n) for n in excused.nonzero().squeeze(1)[:4].tolist())) if excused.any() else ""
            if hard.any():
                n = int(hard.nonzero()[0])
                why = (f"experts {sorted(ids[n].tolist())}, where the reference's top-{K} of these logits is "
                       f"{sorted(ids_e[n].tolist())} (logit gap {gap[n]:.3g} > near-tie bound "
                       f"{2 * self.bounds[prefix + 'gate'].elem[n]:.3g}); {int(hard.sum())} token(s) differ")
                self.rows.append(Row(name, True, None, None, None, None, n, "; ".join(filter(None, [why, note]))))
            else:
                self.rows.append(Row(name, False, None, None, 0.0, None, None, note))
        w = forced.Value(route(logits.exact, ids)[0], route(logits.rounded, ids)[0], taint)
        t_w = self.take(prefix + "topk_weights", w.exact)
        if t_w is not None and t_ids is None:  # no ids to pair them with: compare as sorted values (ours are sorted)
            t_w = t_w.sort(-1, descending=True).values
        return ids, self.tensor(prefix + "topk_weights", w, t=t_w) if t_w is not None else self.tensor(prefix + "topk_weights", w)

    def experts(self, prefix, e, tok, v):
        name = f"{prefix}experts.{e}"
        t = self.theirs.get(name)
        if t is not None and prefix + "topk_ids" not in self.theirs:
            self.missing.append(name + " (needs topk_ids)")
            return v
        if t is None or t.shape == v.exact.shape:
            return self.tensor(name, v, t=None if t is None else t.to(v.exact.device), tokens=tok)
        if t.dim() != 2 or t.shape[1] != v.exact.shape[1] or not t.is_floating_point():
            raise Unusable(f"{name}: {t.dtype} {tuple(t.shape)}, expected (n_e, {v.exact.shape[1]}) rows")
        b = bound(v.exact, v.rounded, ~v.taint, unit(coarser(self.run, t.dtype)))
        lost = self.unmatched(v.exact.double(), t.double().to(v.exact.device), b.row)
        more = "fewer" if t.shape[0] < len(tok) else "more"
        why = f"{t.shape[0]} rows, {more} than the {len(tok)} tokens routed to expert {e}"
        if lost:
            why += f": no row for token(s) {', '.join(self.where(int(tok[r])) for r in lost[:4])} (dropped: a capacity limit?)"
        self.rows.append(Row(name, True, None, None, None, None, int(tok[lost[0]]) if lost else None, why))
        return v

    @staticmethod
    def unmatched(e, t, tol):
        """The reference rows (ascending tokens) that their rows, a subsequence in the same order, leave out."""
        lost, j = [], 0
        for r in range(len(e)):
            if j < len(t) and rms(t[j] - e[r]) <= tol[r]:
                j += 1
            else:
                lost.append(r)
        return lost

    def experts_done(self, prefix, tokens):  # rows recorded for an expert no token is routed to
        for e in range(self.cfg.num_experts):
            t, name = self.theirs.get(f"{prefix}experts.{e}"), f"{prefix}experts.{e}"
            if e not in tokens and t is not None:
                if t.numel():
                    self.rows.append(Row(name, True, None, None, None, None, None,
                                         f"{t.shape[0]} rows, but no token is routed to expert {e}"))


# ----------------------------------------------------------------------------- the whole comparison

def grad_rows(golden, theirs, header, run_dtype):
    """d loss / d adapter tensors (dump --grad): one step's worth of every layer's rounding, so the accumulated
    rule: |theirs - golden| <= 16 u depth max|golden|, depth twice the layers passed (forward and backward)."""
    rows = []
    for name in (n for n in theirs if n.startswith("grad.") and n in golden):
        g, t = golden[name].double(), theirs[name].double()
        if t.shape != g.shape:
            raise Unusable(f"{name}: shape {tuple(t.shape)}, expected {tuple(g.shape)}")
        u = unit(coarser(run_dtype, coarser(golden[name].dtype, theirs[name].dtype)))
        tol = 16 * u * 2 * (header["num_hidden_layers"] + 2) * max(g.abs().max().item(), 1e-30)
        err = (t - g).abs().max().item()
        ok = bool(torch.isfinite(t).all()) and err <= tol
        rows.append(Row(name, not ok, err / max(g.abs().max().item(), 1e-30), tol / max(g.abs().max().item(), 1e-30),
                        err / tol if ok else None, None, None, "" if ok else f"max abs err {err:.3g} > {tol:.3g}"))
    return rows


def compare(golden, theirs, header, model, run_dtype):
    """(rows, first, missing, unknown): a Row per tensor theirs has, in forward order; the first divergence
    (name, layer, token or None) or None; the names golden has and theirs lacks; the names verify does not know.
    Raises Unusable when theirs cannot be compared."""
    cfg, ids = model.config, golden["input_ids"]
    if "input_ids" in theirs:
        t = theirs["input_ids"]
        if t.shape != ids.shape or t.is_floating_point() or not torch.equal(t.long(), ids.long()):
            n = next((i for i, (a, b) in enumerate(zip(t.flatten().tolist(), ids.flatten().tolist())) if a != b), None)
            at = f"first at token {n}: {t.flatten()[n]} vs {ids.flatten()[n]}" if n is not None else f"shape {tuple(t.shape)}"
            raise Unusable(f"input_ids: theirs ran on other ids than the golden file's ({at}): nothing to compare")
    order = {n: k for k, (n, *_) in enumerate(schema.names_of(cfg))}
    unknown, misspelled = schema.check_names(list(theirs), set(order) | set(golden))
    if not set(theirs) - set(unknown) - {"input_ids", "attention_mask"}:
        raise Unusable(f"none of its {len(theirs)} names is one verify knows (first: {sorted(theirs)[:3]}); save them "
                       "under the names `python -m tools.verify names --model DIR` lists")
    judge = Judge(golden, theirs, cfg, run_dtype)
    forced.forward(model, ids.to(next(model.parameters()).device), run_dtype, judge)
    rows = judge.rows + grad_rows(golden, theirs, header, run_dtype)
    for n, close in misspelled.items():
        hint = f"did you mean {close}?" if schema.entry(n) is None else f"this {cfg.model_type} model has no such tensor"
        rows.append(Row(n, True, None, None, None, None, None, f"not a name of this model's tensors ({hint})"))
        order[n] = order.get(close, order.get(re.sub(r"(model\.layers\.\d+).*", r"\1.input_layernorm", n), len(order))) - 0.5
    rows.sort(key=lambda r: order.get(r.name, len(order) + 1))  # stable: routing rows stay where they were made
    layer = lambda n: schema.describe(misspelled.get(n) or n, cfg.num_hidden_layers)["layer"]  # a misspelling: its match's
    first = next(((r.name, layer(r.name), r.token) for r in rows if r.failed), None)
    unknown = [n for n in unknown if n not in misspelled]
    missing = [n for n in judge.missing if n in golden or n.endswith("(needs topk_ids)")]
    if "input_ids" not in theirs:
        missing.insert(0, "input_ids (assumed to be the golden's)")
    return rows, first, missing, unknown


def report(result, golden, header, golden_name, theirs_name, run_note):
    """compare's result printed: a line per tensor (per layer for its experts), then the verdict; the exit status."""
    rows, first, missing, unknown = result
    (B, T), L = golden["input_ids"].shape, header["num_hidden_layers"]
    print(f"verify: {theirs_name} against {golden_name} ({header['model_type']}, {B} x {T} tokens); their run: {run_note}")
    print(f"each tensor is judged on the ops from the nearest tensors theirs recorded before it; bound: {C_TENSOR} "
          f"sigma over the tensor, {C_ROW}x each token's rounding (sigma: what the run's dtype does to it here)")
    print(f"{'tensor':<46} {'rel err':>9} {'bound':>9} {'err/bound':>9} {'vs golden':>9}")
    fmt = lambda x: f"{x:9.3g}" if x is not None else f"{'-':>9}"
    for name, group in itertools.groupby(rows, key=lambda r: re.sub(r"experts\.\d+$", "experts.*", r.name)):
        group = list(group)
        bad = [r for r in group if r.failed]
        if name.endswith("*"):
            bad = [r._replace(note=f"expert {r.name.rsplit('.', 1)[1]}: {r.note}") for r in bad]
            name = f"{name} ({len(group)} experts)"
        pick = lambda f: max((f(r) for r in group if f(r) is not None), default=None)
        note = bad[0].note if bad else next((r.note for r in group if r.note), "")
        at = f" at {token_at(bad[0].token, T)}" if bad and bad[0].token is not None else ""
        print(f"{name:<46} {fmt(pick(lambda r: r.rel))} {fmt(pick(lambda r: r.bound))} {fmt(pick(lambda r: r.ratio))} "
              f"{fmt(pick(lambda r: r.golden))}  {'DIVERGES' + at if bad else 'ok'} {note}".rstrip())
    if unknown:
        print(f"names verify does not know (not compared): {', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''} "
              f"({len(unknown)})")
    if missing:
        print(f"not recorded by theirs (computed from the nearest recorded tensors): {', '.join(missing[:4])}"
              f"{' ...' if len(missing) > 4 else ''} ({len(missing)} tensors)")
    if first is None:
        print(f"verify: no divergence beyond the bound ({len(rows)} tensors compared, {len(missing)} not recorded)")
        return 0
    name, layer, token = first
    where = f"layer {layer}" if 0 <= layer < L else "before the first layer" if layer < 0 else "after the last layer"
    at = "" if token is None else f", token (b{token // T}, t{token % T})"
    print(f"verify: first divergence: {where}, {name}{at}: {next(r.note for r in rows if r.failed)}")
    return 1
