"""quant.py against bitsandbytes (the test-only oracle, on the CPU): NF4 codes and scales bit for bit, with and
without double quant; a quantized model against one whose weights are bitsandbytes' dequantized values; LoRA's
gradients on it; every adapter method training on an NF4 base; the bad inputs named; the dry run's memory."""
import json

import pytest
import torch

from files import hub
import lora
import methods
import quant
import train
from conftest import CONFIGS, make_ids
from tiny import tiny_checkpoint

bnbf = pytest.importorskip("bitsandbytes.functional")
NAMES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe"]


def bnb_nf4(W, double=False):
    """bitsandbytes on W viewed as rows of 64 (the same flattened blocks, so the same codes: its CPU dequantize
    kernel mislays the blocks of rows narrower than a block, e.g. a (D, 32) expert; its reference agrees)."""
    q, st = bnbf.quantize_4bit(W.reshape(-1, 64).contiguous(), blocksize=64, quant_type="nf4",
                               compress_statistics=double)
    return q.view(-1), st, bnbf.dequantize_4bit(q, st).view(W.shape)


def targets_of(model):
    return {n: getattr(parent, attr) for n, (parent, attr) in quant.targets(model).items()}


@pytest.mark.parametrize("name", NAMES)
def test_nf4_codes_scales_values_equal_bitsandbytes(name, checkpoints):
    """Loading with --quantize nf4 (and --double-quant) gives bitsandbytes' codes and absmax for every quantized
    weight (experts: the stacked tensor), and dequantizes to its values; the router and norms stay as they were."""
    path = checkpoints(name).path
    plain = hub.load_model(path, dtype=torch.float32)
    ref = {n: (m.weight if isinstance(m, torch.nn.Linear) else m).detach() for n, m in targets_of(plain).items()}
    for double in (False, True):
        model = hub.load_model(path, dtype=torch.float32, quantize=("nf4", double, quant.DEFAULT_SET))
        got = {n: (m.weight if isinstance(m, quant.QuantLinear) else m) for n, m in targets_of(model).items()}
        assert set(got) == set(ref) and all(isinstance(w, quant.QuantWeight) for w in got.values())
        for n, W in ref.items():
            q, st, deq = bnb_nf4(W, double)
            w = got[n]
            assert torch.equal(w.codes, q), n
            assert torch.equal(w.absmax, st.absmax), n
            if double:
                assert torch.equal(w.absmax2, st.state2.absmax) and torch.equal(w.offset, st.offset), n
            assert torch.equal(w.dequantize(), deq), n
        assert model.model.layers[0].mlp.gate.weight.dtype == torch.float32  # the router: not quantized
        assert not any(isinstance(getattr(m, "weight", None), quant.QuantWeight) for m in [model.model.embed_tokens])


def test_bf16_weights_and_int8():
    """A bf16 weight: bitsandbytes' codes and its bf16 dequantized values; int8: per-row absmax codes within
    half a step of the weight; the 8-bit double quant of an all-zero block as bitsandbytes' CPU kernel."""
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(64, 96, generator=g) * 0.05).bfloat16()
    W[3] = 0
    q, st, deq = bnb_nf4(W, double=True)
    w = quant.QuantWeight(W.shape, "nf4", torch.bfloat16, double_quant=True)
    w.fill(W).finish()
    assert torch.equal(w.codes, q) and torch.equal(w.absmax, st.absmax) and torch.equal(w.dequantize(), deq)
    w8 = quant.QuantWeight(W.shape, "int8", torch.float32)
    w8.fill(W)
    step = W.float().abs().amax(-1, keepdim=True) / 127
    assert ((w8.dequantize() - W.float()).abs() <= step / 2 + 1e-7).all()
    codes, _ = bnbf.int8_vectorwise_quant(W.float().clone())[:2] if hasattr(bnbf, "int8_vectorwise_quant") else (w8.codes, None)
    assert torch.equal(w8.codes, codes)


def replaced_by_bnb(path, name_fn=None):
    """The model loaded plainly, its quantize targets replaced by bitsandbytes' dequantized values."""
    model = hub.load_model(path, dtype=torch.float32)
    with torch.no_grad():
        for n, m in targets_of(model).items():
            W = m.weight if isinstance(m, torch.nn.Linear) else m
            W.copy_(bnb_nf4(W.detach())[2])
    return model


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_lora_grads_equal_bnb_dequantized_base(name, checkpoints):
    """The NF4 model's logits, fast and plain, equal those of the model with bitsandbytes' dequantized weights;
    LoRA with B = 0 leaves them; LoRA's gradients on the NF4 base equal those on the dequantized base."""
    path = checkpoints(name).path
    ref = replaced_by_bnb(path)
    model = hub.load_model(path, dtype=torch.float32, quantize=("nf4", False, quant.DEFAULT_SET))
    ids = make_ids(2, 12)
    with torch.no_grad():
        want = ref(ids)
        assert torch.equal(model(ids), want)
        model.set_plain(True), ref.set_plain(True)
        assert torch.allclose(model(ids), ref(ids), atol=1e-5, rtol=1e-5)
        model.set_plain(False), ref.set_plain(False)
    grads = []
    for m in (ref, model):
        torch.manual_seed(0)
        methods.attach(m, "lora", 4, 8, 0.0, False, None)
        assert torch.equal(m(ids).detach(), want)  # B = 0
        for p in methods.adapter_state(m).values():  # B != 0 so that every factor gets a gradient
            if p.abs().sum() == 0:
                torch.nn.init.normal_(p.data, std=0.1, generator=torch.Generator().manual_seed(p.numel()))
        m.train()
        m(ids, labels=ids.roll(-1, 1)).backward()
        grads.append({n: p.grad for n, p in methods.adapter_state(m).items()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_backward_keeps_no_dequantized_weight():
    """Through a quantized product, autograd keeps nothing of the weight's size: only the codes live on."""
    w = quant.QuantWeight((64, 128), "nf4", torch.float32)
    w.fill(torch.randn(64, 128)).finish()
    x = torch.randn(5, 128, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        y = w.linear(x)
    assert kept == []
    y.sum().backward()
    assert torch.allclose(x.grad, w.dequantize().sum(0).expand(5, -1), atol=1e-6)


def run(*argv):
    return train.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("q") / "model")


@pytest.mark.parametrize("method", ["attn", "lora", "sieve", "random", "perft-e", "perft-r", "dmep"])
def test_every_method_trains_on_nf4(method, tiny, train_file, tmp_path):
    """Two steps of each adapter method on an NF4 base: finite loss, the adapter config records the quantization."""
    out = tmp_path / method
    assert run("--model", tiny, "--data", train_file, "--out", out, "--method", method, "--rank", 2, "--steps", 2,
               "--batch-size", 2, "--seq-len", 32, "--quantize", "nf4", "--calib-tokens", 32) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["quantization"]["kind"] == "nf4" and cfg["quantization"]["weights"] > 0


def test_bad_inputs_named(tiny, train_file, tmp_path, ckpt_copy, capsys):
    assert run("--model", tiny, "--data", train_file, "--out", tmp_path / "f", "--method", "full", "--quantize", "nf4") != 0
    assert "--method full" in capsys.readouterr().err
    path = ckpt_copy("olmoe")
    c = json.loads((path / "config.json").read_text())
    c["quantization_config"] = dict(quant_method="gptq", bits=4)
    (path / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="already quantized.*gptq"):
        hub.load_model(path)
    with pytest.raises(quant.QuantError, match="not a multiple of the block of 64"):
        quant.QuantWeight((3, 20), "nf4", torch.float32, what="model.layers.0.self_attn.q_proj.weight")
    assert run("--model", tiny, "--data", train_file, "--out", tmp_path / "d", "--quantize", "int8", "--double-quant") != 0
    assert "--double-quant" in capsys.readouterr().err


def test_dry_run_mixtral_nf4_fits_48gb(capsys):
    """Mixtral-8x7B, NF4 base, sieve r16, 1 x 2048 with grad checkpoint: under 48 GB and said to fit it."""
    assert run("--model", f"{CONFIGS}/mixtral-8x7b-v0.1", "--method", "sieve", "--rank", 16, "--seq-len", 2048,
               "--batch-size", 1, "--grad-checkpoint", "--quantize", "nf4", "--dry-run", "--gpu-memory", 48) == 0
    out = capsys.readouterr().out
    peak = float(out.split("predicted peak: ")[1].split(" GiB")[0])
    assert peak < 48 * 0.9 and "fits 48 GiB" in out, out
