"""Phases that need no gradient build no autograd graph, even while the base's parameters still require gradients
(train.py profiles before it freezes the base): DMEP's utilization tracking, the exports, bench.py's profile of
its sieve row. (The routing profile: test_router_profile.py; evaluation and generation: test_eval.py and
test_generate.py; verify.py's dump: test_verify.py.) A graph kept by such a phase costs memory that grows with
the model, the batch or the number of batches, which the tiny models of the other tests cannot show."""
import torch
from conftest import NoGradWatch, assert_no_graph
from tiny import _config_dict, save_checkpoint, tiny_model

import dmep
import methods
import router_profile
from files import export
from tools import bench


def test_dmep_tracking_keeps_no_graph_of_the_router_logits():
    """track reads the last forward's router logits, which carry a graph while training: the counts it adds to
    `util` must not (a graph tied to util would live for the whole first stage)."""
    m = tiny_model("olmoe")
    methods.attach(m, "dmep", r=4, alpha=8, dmep_experts=4, dmep_topk=2)
    m.train()
    m(torch.randint(3, 96, (2, 8)), labels=torch.randint(3, 96, (2, 8)))
    mods = [mod for _, mod in dmep.modules(m)]
    assert all(mod.router_logits.grad_fn is not None for mod in mods)  # so that the check below means something
    dmep.track(m)
    assert_no_graph([mod.util for mod in mods])


def test_exports_leave_no_graph_on_the_base(tmp_path):
    """export_merged merges B A into the base weights and back, export_peft copies the adapter: with the base
    requiring gradients (as before freezing), no parameter ends up the output of a graph, and nothing written is."""
    m = tiny_model("olmoe")
    save_checkpoint(m, _config_dict("olmoe"), tmp_path / "src")
    config = methods.attach(m, "lora", r=4, alpha=8)
    m.requires_grad_(True)
    with torch.no_grad():
        for p in methods.adapter_state(m).values():
            p.add_(0.01)
    export.export_merged(m, str(tmp_path / "src"), str(tmp_path / "merged"))
    export.export_peft(m, config, tmp_path / "peft")
    assert all(p.grad_fn is None and p.is_leaf for p in m.parameters())
    assert_no_graph(export.checkpoint_views(m))


def test_bench_profiles_its_sieve_row_without_autograd(monkeypatch):
    """bench.py's sieve row profiles its batch on the random base before attaching the adapters (its parameters
    require gradients then): every module forward of that profile runs with autograd off."""
    watched, real = [], router_profile.profile

    def watching(model, batches, *a, **k):
        with NoGradWatch(model) as watch:
            out = real(model, batches, *a, **k)
        watched.append(watch)
        return out

    monkeypatch.setattr(router_profile, "profile", watching)
    result = bench.main(["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0", "--methods", "sieve"])
    assert result["rows"][0]["status"] == "ok" and len(watched) == 1
    watched[0].check()
