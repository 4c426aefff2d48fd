"""Per-module overrides, sensitivity, budget allocation (``bits: auto``) and their save/reload/export."""

import itertools
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfquant import HFQuantConfig
from hfquant.mixed.allocation import allocate
from hfquant.core.errors import ConfigError, FormatError
from hfquant.nn.weight_only import QuantLinearWeightOnly
from hfquant.core import IntGrid, Scheme
from hfquant.core.schemes import resolve, specificity, stored_bits
from helpers import run_cli, small_calibration, write_recipe

NAMES = [f"model.layers.{i}.{m}" for i in range(2) for m in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")]
DEFAULT = Scheme(IntGrid(4, 128, True), "gptq")
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
MIXED = {"re:.*down_proj": {"bits": 8}, "*.self_attn.q_proj": {"bits": 3, "group_size": 16},
         "model.layers.0.self_attn.k_proj": {"skip": True}, "*.1.self_attn.v_proj": {"method": "rtn", "sym": False}}


# ------------------------------------------------------------------------------------------ precedence
def test_exact_beats_glob_beats_regex_whatever_the_order():
    overrides = {"model.layers.0.mlp.down_proj": {"bits": 2}, "*.down_proj": {"bits": 3}, "re:.*down_proj": {"bits": 8}}
    for perm in itertools.permutations(overrides.items()):
        schemes, _, conflicts = resolve(dict(perm), NAMES, DEFAULT)
        assert schemes["model.layers.0.mlp.down_proj"].bits == 2
        assert schemes["model.layers.1.mlp.down_proj"].bits == 3
        assert {c["module"] for c in conflicts} == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}


def test_more_literal_glob_wins_then_later_listed_and_fields_merge():
    schemes, _, conflicts = resolve({"*.1.*": {"bits": 8, "sym": False}, "*": {"bits": 3, "group_size": 32}},
                                    NAMES, DEFAULT)
    s = schemes["model.layers.1.self_attn.q_proj"]
    assert (s.bits, s.sym, s.group_size) == (8, False, 32)  # bits from the more literal glob, group_size merged
    assert schemes["model.layers.0.self_attn.q_proj"].bits == 3
    assert all(c["winner"] == "*.1.*" for c in conflicts)
    tie_a, tie_b = {"*k_proj": {"bits": 2}}, {"*q_proj": {"bits": 2}}  # disjoint: no conflict
    assert resolve({**tie_a, **tie_b}, NAMES, DEFAULT)[2] == []
    same = {"re:.*layers.0.*": {"bits": 2}, "re:.*layers.[0].*": {"bits": 8}}  # equal literal count: later wins
    assert specificity("re:.*layers.0.*", 0) < specificity("re:.*layers.[0].*", 1)
    assert resolve(same, NAMES, DEFAULT)[0]["model.layers.0.self_attn.q_proj"].bits == 8


def test_skip_and_unmatched_pattern():
    schemes, skipped, _ = resolve({"*.k_proj": {"skip": True}}, NAMES, DEFAULT)
    assert skipped == [n for n in NAMES if n.endswith("k_proj")] and not set(skipped) & set(schemes)
    with pytest.raises(ConfigError, match=r"^quantization\.overrides\['\*\.nope'\]: matches no quantizable module .*e\.g\. model"):
        resolve({"*.nope": {"bits": 8}}, NAMES, DEFAULT)


# ------------------------------------------------------------------------------------------ allocation
def _brute(losses, costs, budget):
    best = None
    for pick in itertools.product(*[range(len(r)) for r in losses]):
        if sum(costs[i][j] for i, j in enumerate(pick)) <= budget:
            value = sum(losses[i][j] for i, j in enumerate(pick))
            best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_allocation_meets_budget_and_is_optimal(seed):
    rng = random.Random(seed)
    n, k = rng.randint(2, 6), rng.randint(2, 4)
    costs = [sorted(rng.randint(1, 40) for _ in range(k)) for _ in range(n)]
    losses = [sorted((rng.random() for _ in range(k)), reverse=True) for _ in range(n)]
    budget = rng.randint(sum(min(c) for c in costs), sum(max(c) for c in costs))
    pick = allocate(losses, costs, budget)
    assert sum(costs[i][j] for i, j in enumerate(pick)) <= budget
    assert sum(losses[i][j] for i, j in enumerate(pick)) == pytest.approx(_brute(losses, costs, budget))
    coarse = allocate(losses, costs, budget, resolution=7)  # costs rounded up: still within budget
    assert sum(costs[i][j] for i, j in enumerate(coarse)) <= budget
    with pytest.raises(ConfigError, match="cheapest allocation"):
        allocate(losses, costs, sum(min(c) for c in costs) - 1)


@pytest.mark.parametrize("bits,group_size,shape", [(2, 64, (576, 192)), (3, 128, (576, 1536)), (4, 32, (100, 7)),
                                                    (8, -1, (64, 64)), (4, 128, (1536, 576))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_bits_is_what_the_module_stores(bits, group_size, shape, dtype):
    m = QuantLinearWeightOnly(*shape, bits=bits, group_size=group_size, dtype=dtype)
    stored = sum(p.numel() * p.element_size() * 8 for n, p in m.named_parameters() if n != "bias")
    assert stored_bits(*shape, bits, group_size, torch.finfo(dtype).bits) == stored


# ------------------------------------------------------------------------------------------ overrides in a run
def _quantize(folder, **kw):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=HFQuantConfig(**small_calibration(**kw))).eval()


def test_overrides_round_trip_save_reload(tiny_models, tmp_path):
    q = _quantize(tiny_models["llama"], group_size=32, overrides=MIXED)
    layers = q.model.layers
    assert isinstance(layers[0].self_attn.k_proj, torch.nn.Linear)  # skipped
    assert (layers[0].self_attn.q_proj.bits, layers[0].self_attn.q_proj.group_size) == (3, 16)
    assert layers[1].mlp.down_proj.bits == 8 and layers[1].mlp.gate_proj.bits == 4
    reports = {m["name"]: m for m in q.hfquant_report["modules"]}
    assert reports["model.layers.1.self_attn.v_proj"]["method"] == "rtn"
    q.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["module_schemes"]["model.layers.1.self_attn.v_proj"] == {"bits": 4, "group_size": 32, "sym": False,
                                                                          "method": "rtn"}
    assert "model.layers.0.self_attn.k_proj" in saved["modules_to_not_convert"]
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    for name, m in q.named_modules():
        if isinstance(m, QuantLinearWeightOnly):
            back = r.get_submodule(name)
            assert (back.bits, back.group_size) == (m.bits, m.group_size)
            assert torch.equal(back.dequantize(), m.dequantize())
    with torch.no_grad():
        assert torch.equal(q(input_ids=IDS).logits, r(input_ids=IDS).logits)


def test_uniform_restated_as_override_is_bit_identical(tiny_models):
    a = _quantize(tiny_models["llama"], group_size=32).state_dict()
    b = _quantize(tiny_models["llama"], group_size=32, overrides={"*": {"bits": 4, "group_size": 32}}).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_split_group_solves_each_scheme_on_the_shared_hessian(tiny_models):
    """q at 8 bits, k/v at 4: k and v (same Hessian as in the uniform run) get the same codes as there."""
    a = _quantize(tiny_models["llama"], group_size=32)
    b = _quantize(tiny_models["llama"], group_size=32, overrides={"model.layers.0.self_attn.q_proj": {"bits": 8}})
    for n in ("k_proj", "v_proj"):
        qa, qb = a.model.layers[0].self_attn.get_submodule(n), b.model.layers[0].self_attn.get_submodule(n)
        assert torch.equal(qa.codes(), qb.codes()) and torch.allclose(qa.scales, qb.scales)
    assert b.model.layers[0].self_attn.q_proj.bits == 8


# ------------------------------------------------------------------------------------------ sensitivity
def test_sensitivity_more_bits_never_more_error_and_weights_untouched(tiny_models):
    """The table against an independent computation: every module's float inputs X (n tokens) captured with
    hooks on a plain forward over the same windows give ``energy = 2/n |X W^T|^2`` and, RTN being
    deterministic, ``rtn = 2/n |X (W - RTN(W))^T|^2`` per candidate; GPTQ beats RTN by a clear margin."""
    from hfquant.calibration.data import calibration_windows
    from helpers import tiny_tokenizer
    from hfquant.core.grids import dequantize_grouped, rtn_quantize
    from hfquant.mixed.sensitivity import measure_sensitivity

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = calibration_windows(tiny_tokenizer(), num_samples=8, seq_len=64, seed=0)
    cands = [{"bits": b, "group_size": 32} for b in (2, 3, 4, 8)]
    table = measure_sensitivity(model, list(windows.split(4)), lambda n: "lm_head" not in n, cands, progress=False)
    assert list(table["modules"]) == [f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # all 14, in execution order
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    inputs = {n: [] for n in table["modules"]}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: inputs[n].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for n in table["modules"]]
    with torch.no_grad():
        for batch in windows.split(4):
            model(input_ids=batch, use_cache=False)
    for h in hooks:
        h.remove()

    for name, m in table["modules"].items():
        lin = model.get_submodule(name)
        assert (m["in"], m["out"]) == (lin.in_features, lin.out_features), name
        x = torch.cat(inputs[name]).double()
        assert x.shape[0] == 8 * 64
        w = lin.weight.detach()

        def proxy(err):
            return 2 / x.shape[0] * float((x @ err.double().t()).pow(2).sum())

        assert m["energy"] == pytest.approx(proxy(w), rel=1e-5), name
        want_rtn = [proxy(w - dequantize_grouped(*rtn_quantize(w, c["bits"], 32, True, "minmax"))) for c in cands]
        assert m["rtn"] == pytest.approx(want_rtn, rel=1e-5), name
        for kind in ("gptq", "rtn"):
            assert all(a > b for a, b in zip(m[kind], m[kind][1:])), (name, kind, m[kind])  # strictly fewer errors
        assert all(g < 0.8 * r for g, r in zip(m["gptq"], m["rtn"])), (name, m["gptq"], m["rtn"])  # GPTQ << RTN
        rel = [g / m["energy"] for g in m["gptq"]]
        assert 1e-3 < rel[0] < 0.5 and rel[-1] < 1e-4, (name, rel)  # 2 bits: a visible error; 8 bits: tiny


def test_output_fisher_matches_retained_gradients(tiny_models):
    """``output_fisher`` against autograd's retained output gradients, window by window; weights get no
    gradients and keep their requires_grad flags."""
    from hfquant.calibration.data import calibration_windows
    from helpers import tiny_tokenizer
    from hfquant.mixed.sensitivity import output_fisher

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    windows = calibration_windows(tiny_tokenizer(), num_samples=6, seq_len=32, seed=0)
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    got = output_fisher(model, list(windows.split(4)), names, windows=5)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())

    want = {n: 0.0 for n in names}
    for ids in windows[:5].split(1):
        outs = {}
        hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o)) for n in names]
        logits = model(input_ids=ids).logits[:, :-1]
        for h in hooks:
            h.remove()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        grads = torch.autograd.grad(loss, [outs[n] for n in names])
        for n, g in zip(names, grads):
            want[n] = want[n] + g.double().pow(2).reshape(-1, g.shape[-1]).sum(0)
    model.zero_grad(set_to_none=True)
    for n in names:
        assert got[n].shape == (model.get_submodule(n).out_features,)
        torch.testing.assert_close(got[n], want[n] / (5 * 31), rtol=1e-4, atol=1e-12)


def test_module_the_loss_never_reaches_costs_nothing(tiny_models):
    """A module whose output gets no gradient has no Fisher entry: its estimates are zero, not an error."""
    from hfquant.calibration.data import calibration_windows
    from helpers import tiny_tokenizer
    from hfquant.mixed.sensitivity import measure_sensitivity

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    cut = "model.layers.1.self_attn.v_proj"
    model.get_submodule(cut).register_forward_hook(lambda m, a, out: out.detach())
    windows = calibration_windows(tiny_tokenizer(), num_samples=4, seq_len=32, seed=0)
    cands = [{"bits": 2, "group_size": 32}, {"bits": 4, "group_size": 32}]
    table = measure_sensitivity(model, list(windows.split(2)), lambda n: "lm_head" not in n, cands, progress=False,
                                fisher_windows=2)
    assert table["modules"][cut]["fisher_gptq"] == [0.0, 0.0] and table["modules"][cut]["gptq"][0] > 0
    assert all(v > 0 for n, m in table["modules"].items() if n != cut for v in m["fisher_gptq"])


def test_fisher_weights_scale_each_row_of_the_proxy():
    """``fisher_*`` is sum_j f_j (E H E^T)_jj / 4: all-ones weights give a quarter of the plain proxy, a
    one-hot weight picks one output row."""
    from hfquant.mixed.sensitivity import group_losses

    torch.manual_seed(0)
    w1, w2 = torch.randn(6, 32), torch.randn(4, 32)
    x = torch.randn(256, 32)
    h = 2 / 256 * x.t() @ x
    cands = [{"bits": 3, "group_size": 16}, {"bits": 4, "group_size": 16}]
    from hfquant.core import IntGrid
    from hfquant.core.gptq import SolveArgs

    kw = dict(args=SolveArgs(desc_act=True, static_groups=True, damp_percent=0.01, block_size=16),
              grid=IntGrid(sym=True, observer="minmax"))
    plain = group_losses([w1, w2], h, cands, **kw)
    ones = group_losses([w1, w2], h, cands, fisher=[torch.ones(6), torch.ones(4)], **kw)
    for p, o in zip(plain, ones):
        for kind in ("gptq", "rtn"):
            assert o[kind] == p[kind]
            assert o["fisher_" + kind] == pytest.approx([v / 4 for v in p[kind]], rel=1e-9)
    onehot = torch.zeros(6)
    onehot[2] = 1.0
    picked = group_losses([w1, w2], h, cands, fisher=[onehot, torch.zeros(4)], **kw)
    for j, c in enumerate(cands):
        from hfquant.core.grids import dequantize_grouped, rtn_quantize

        e = (w1 - dequantize_grouped(*rtn_quantize(torch.cat([w1, w2]), c["bits"], c["group_size"], True, "minmax"))[:6])[2]
        assert picked[0]["fisher_rtn"][j] == pytest.approx(float(e.double() @ h.double() @ e.double()) / 4, rel=1e-9)
        assert picked[1]["fisher_gptq"][j] == 0.0


def test_allocation_uses_the_estimated_loss_when_measured():
    """With ``fisher_gptq`` present the allocation minimises it, not the relative proxy: a module that is
    cheap by the relative proxy but costly by the estimated loss gets the extra bits."""
    from hfquant.mixed.budget import allocate_bits, losses_of

    cands = [{"bits": 2, "group_size": -1}, {"bits": 4, "group_size": -1}]
    mod = {"in": 64, "out": 64}
    table = {"candidates": cands, "modules": {
        "a": {**mod, "energy": 1.0, "gptq": [0.9, 0.1], "rtn": [1.0, 0.2], "fisher_gptq": [0.01, 0.001]},
        "b": {**mod, "energy": 1.0, "gptq": [0.5, 0.1], "rtn": [0.6, 0.2], "fisher_gptq": [2.0, 0.2]}}}
    assert losses_of(table) == [[0.01, 0.001], [2.0, 0.2]]
    alloc, _ = allocate_bits(table, 4.0, 16)  # room for one module at 4 bits (2.875 + 4.875 stored bits)
    assert alloc["b"]["bits"] == 4 and alloc["a"]["bits"] == 2
    relative = {**table, "modules": {n: {k: v for k, v in m.items() if k != "fisher_gptq"} for n, m in table["modules"].items()}}
    alloc, _ = allocate_bits(relative, 4.0, 16)
    assert alloc["a"]["bits"] == 4 and alloc["b"]["bits"] == 2


def test_fisher_windows_is_checked():
    with pytest.raises(ConfigError, match="fisher_windows"):
        HFQuantConfig(method="gptq", bits="auto", target_avg_bits=3.5, fisher_windows=-1)


# ------------------------------------------------------------------------------------------ budget mode
CANDS = [{"bits": 2, "group_size": 32}, {"bits": 4, "group_size": 32}, {"bits": 8, "group_size": 32}]


@pytest.mark.parametrize("target", [4.0, 5.5])
def test_auto_meets_target_in_the_saved_tensors(tiny_models, tmp_path, target):
    from hfquant.app.report import stored_average_bits

    q = _quantize(tiny_models["llama"], bits="auto", target_avg_bits=target, candidates=CANDS)
    auto = q.hfquant_report["auto"]
    q.save_pretrained(tmp_path / "q")
    measured = stored_average_bits(tmp_path / "q")
    assert measured["modules"] == 14
    assert measured["avg_bits"] == pytest.approx(auto["predicted_avg_bits"], rel=1e-12)
    assert measured["avg_bits"] <= target
    # every module gets a candidate, and the allocation is the one the table and the budget give
    from hfquant.core.schemes import stored_bits
    from hfquant.mixed.budget import allocate_bits

    alloc, mods = auto["allocation"], auto["sensitivity"]["modules"]
    assert set(alloc) == set(mods) and len(alloc) == 14
    assert all(s in CANDS for s in alloc.values())
    assert allocate_bits(auto["sensitivity"], target, auto["scale_bits"]) == (alloc, auto["predicted_avg_bits"])
    weights = sum(m["in"] * m["out"] for m in mods.values())

    def cost(name, c):
        return stored_bits(mods[name]["in"], mods[name]["out"], c["bits"], c["group_size"], auto["scale_bits"])

    spent = sum(cost(n, s) for n, s in alloc.items())
    assert spent / weights == pytest.approx(auto["predicted_avg_bits"], rel=1e-12)
    # neither uniform 4 bits (over budget) nor uniform 2 bits (wasteful) is the answer: bit widths are mixed
    assert sum(cost(n, CANDS[1]) for n in mods) > target * weights
    assert len({s["bits"] for s in alloc.values()}) >= 2 and min(s["bits"] for s in alloc.values()) == 2
    # optimal, hence maximal: upgrading any one module (less loss, since losses fall with bits) breaks the budget
    for n, s in alloc.items():
        for c in CANDS:
            if c["bits"] > s["bits"]:
                assert spent - cost(n, s) + cost(n, c) > target * weights, (n, s, c)
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    with torch.no_grad():
        assert torch.equal(q(input_ids=IDS).logits, r(input_ids=IDS).logits)


def test_auto_more_budget_less_total_proxy_loss(tiny_models):
    from hfquant.mixed.budget import allocate_bits, losses_of

    q = _quantize(tiny_models["llama"], bits="auto", target_avg_bits=4.0, candidates=CANDS)
    table = q.hfquant_report["auto"]["sensitivity"]
    total = []
    for t in (3.7, 4.0, 4.5, 6.0, 9.5):
        alloc, avg = allocate_bits(table, t)
        assert avg <= t
        j = {(c["bits"], c["group_size"]): i for i, c in enumerate(table["candidates"])}
        loss = dict(zip(table["modules"], losses_of(table)))
        total.append(sum(loss[n][j[(s["bits"], s["group_size"])]] for n, s in alloc.items()))
    assert all(a >= b for a, b in zip(total, total[1:]))


def test_auto_max_ppl_increase(tiny_models):
    """A 50% allowance: on the tiny model every RTN trial stays within it (the perplexity barely moves), so the
    bisection starts at the largest average and halves the interval toward the smallest 7 times, always
    downward, and picks the last (smallest) target tried."""
    from hfquant.mixed.budget import allocate_bits, average_range

    q = _quantize(tiny_models["llama"], bits="auto", max_ppl_increase=0.5, candidates=CANDS)
    auto = q.hfquant_report["auto"]
    search, table = auto["search"], auto["sensitivity"]
    assert search["ppl_limit"] == pytest.approx(search["ppl_float"] * 1.5)
    ok = [t for t in search["trials"] if t["ppl_rtn_trial"] <= search["ppl_limit"]]
    assert ok == search["trials"] and len(ok) == 1 + 7
    lo, hi = average_range(table, auto["scale_bits"])
    expected = [hi] + [lo + (hi - lo) / 2**k for k in range(1, 8)]
    assert [t["target_avg_bits"] for t in search["trials"]] == pytest.approx(expected, rel=1e-12)
    # the chosen target is the smallest one whose RTN trial met the limit, and the run uses its allocation
    assert search["target_avg_bits"] == min(t["target_avg_bits"] for t in ok) == search["trials"][-1]["target_avg_bits"]
    alloc, avg = allocate_bits(table, search["target_avg_bits"], auto["scale_bits"])
    assert auto["allocation"] == alloc and search["avg_bits"] == avg == search["trials"][-1]["avg_bits"]
    assert avg <= search["target_avg_bits"] < lo + (hi - lo) / 64


# ------------------------------------------------------------------------------------------ export
def test_mixed_export_gptq_refused_compressed_tensors_groups(tiny_models, tmp_path):
    pytest.importorskip("compressed_tensors")
    from hfquant.formats import export_checkpoint

    q = _quantize(tiny_models["llama"], group_size=32, overrides={"re:.*down_proj": {"bits": 8}})
    q.save_pretrained(tmp_path / "q")
    with pytest.raises(FormatError, match=r"per-module schemes \(W4 g32: 12, W8 g32: 2\).*compressed-tensors"):
        export_checkpoint(tmp_path / "q", "gptq", tmp_path / "g")
    assert not (tmp_path / "g").exists()
    out = export_checkpoint(tmp_path / "q", "compressed-tensors", tmp_path / "ct")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    by_bits = {g["weights"]["num_bits"]: g["targets"] for g in groups.values()}
    assert sorted(by_bits[8]) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)] and len(by_bits[4]) == 12


# ------------------------------------------------------------------------------------------ CLI
def test_cli_sensitivity_and_auto_run_write_plot_and_card(tiny_models, tmp_path, capsys):
    quant = {"bits": "auto", "target_avg_bits": 4.0, "candidates": CANDS}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], tmp_path / "sens", quantization=quant)
    code, out, err = run_cli(["-q", "sensitivity", str(recipe)], capsys)
    assert code == 0, err
    folder = tmp_path / "sens"
    assert {"sensitivity.json", "sensitivity.md", "sensitivity.png", "README.md"} <= {p.name for p in folder.iterdir()}
    assert "](sensitivity.png)" in (folder / "README.md").read_text()
    assert (folder / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = run_cli(["-q", "run", str(recipe), "--output", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert "per-module schemes: W" in out and "stored bits per weight" in out
    run = tmp_path / "run"
    card = (run / "README.md").read_text()
    assert "![per-module sensitivity](sensitivity.png)" in card and (run / "sensitivity.png").is_file()
    report = json.loads((run / "report.json").read_text())
    assert report["stored_bits"]["avg_bits"] <= 4.0
    assert report["stored_bits"]["avg_bits"] == pytest.approx(report["auto"]["predicted_avg_bits"], rel=1e-12)
    assert set(report["auto"]["allocation"]) == set(report["config"]["module_schemes"])


def test_auto_run_equals_its_module_schemes_run(tiny_models):
    """What scripts/bench_mixed.py relies on: quantizing a bits-auto run's stored module_schemes gives the same model."""
    a = _quantize(tiny_models["llama"], bits="auto", target_avg_bits=4.0, candidates=CANDS)
    schemes = a.config.quantization_config.module_schemes
    b = _quantize(tiny_models["llama"], bits=4, group_size=32, module_schemes=schemes)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_readme_precedence_example():
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).parent.parent.parent / "README.md").read_text()
    block = re.search(r"```yaml\n(quantization:\n  method: gptq\n.*?)```", text, re.S).group(1)
    q = yaml.safe_load(block)["quantization"]
    names = [f"model.layers.{i}.{m}" for i in (0, 5) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    schemes, skipped, _ = resolve(q["overrides"], names, Scheme(IntGrid(q["bits"], q["group_size"], True), "gptq"))
    assert skipped == ["model.layers.0.mlp.down_proj"]
    assert schemes["model.layers.0.self_attn.q_proj"] == Scheme(IntGrid(3, 64, True), "gptq")
    assert schemes["model.layers.5.mlp.down_proj"] == Scheme(IntGrid(8, 128, True), "gptq")
    assert schemes["model.layers.0.self_attn.v_proj"] == Scheme(IntGrid(3, 64, True), "rtn")
    assert schemes["model.layers.5.self_attn.v_proj"] == Scheme(IntGrid(4, 128, True), "rtn")


def test_cli_run_with_overrides_then_inspect(tiny_models, tmp_path, capsys):
    quant = {"overrides": {"re:.*down_proj": {"bits": 8}, "*.0.self_attn.k_proj": {"skip": True}}}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], tmp_path / "o", quantization=quant)
    code, out, err = run_cli(["-q", "run", str(recipe)], capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert len(cfg["module_schemes"]) == 13 and "model.layers.0.self_attn.k_proj" in cfg["modules_to_not_convert"]
    code, out, err = run_cli(["inspect", str(tmp_path / "o")], capsys)
    assert code == 0 and "per-module schemes: W4 g32: 11, W8 g32: 2" in out
