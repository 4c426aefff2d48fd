"""Every model family hfquant supports, end to end; the results are README's family table.

Per family (``family_helpers``: dense configs; ``moe_helpers``: fused 3-D experts, transformers 5.x):

1. ``from_pretrained(float folder, quantization_config=HFQuantConfig(W4 g16 GPTQ))``: the report's weights
   (bits per weight, expert weights quantized, float weights by documented class; any other float weight fails
   the run itself);
2. ``save_pretrained`` -> ``from_pretrained``: logits ``torch.equal`` to the quantized model's;
3. ``export_checkpoint`` to ``gptq`` (read back by ``load_gptq``: within 1e-3 x max |logit| of the hfquant model,
   and whether bit-equal to it with float16 scales, as ``tests/formats/test_interop.py``) and to
   ``compressed-tensors`` (read back by transformers + compressed-tensors, in this process: ``quant_method
   "compressed-tensors"`` never reaches hfquant's quantizer; max |logit diff| <= 1e-5, as test_interop);
4. GGUF leg (its own tiny config where transformers' GGUF loader needs one, ``family_helpers.GGUF_LEG_DIFFERS``):
   ``HFQuantConfig(gguf_type="Q4_0")`` GPTQ (RTN where ``GGUF_LEG_METHOD`` says), save,
   ``export_checkpoint(..., "gguf", ...)``, read back by transformers (``gguf_file=``; if the logits differ, again
   with the float model's config) against the hfquant model: atol 0 (Gemma 3 1e-5, its norms travel as ``w + 1``;
   MoE 1e-4), as ``tests/formats/test_gguf_families.py``.

Every step's outcome is recorded (``ok``, ``refused`` with hfquant's one-line reason, ``failed``, ...) and, when
``HFQUANT_FAMILY_RESULTS`` names a folder, written there as ``<family>.json`` (``scripts/family_table.py`` renders
them). Steps 1-2 must be ``ok`` for every family, and 100% of the expert weights quantized for the MoE ones; the
export outcomes must equal ``EXPECTED`` (update it when an export starts or stops working).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from family_helpers import FAMILIES, FEATURES, GGUF_LEG_DIFFERS, GGUF_LEG_METHOD, save_family_model
from helpers import tiny_tokenizer, VOCAB
from moe_helpers import MOE_FAMILIES
from hfquant import HFQuantConfig
from hfquant.core.errors import HFQuantError
from hfquant.formats import export_checkpoint, load_gptq
from hfquant.formats.gguf import read_gguf_header
from hfquant.formats.gptq import float16_rounded
from hfquant.kernels import reference_kernels
from hfquant.nn.experts import find_experts

# Expected outcomes of the exports: family -> (GPTQ export, compressed-tensors export, GGUF export + read-back).
# "ok": read back within tolerance; "ok with config": transformers reads the GGUF file back only when given the
# float model's config; "refused": hfquant refused to export (or, GGUF leg, to quantize) with a one-line error;
# "unreadable": written, but its reader (load_gptq; transformers + compressed-tensors; transformers' GGUF loader)
# cannot read it, or (GGUF) reads it as another architecture; "failed": anything else (a wrong read-back, an
# unexpected exception).
EXPECTED = {
    "llama": ("ok", "ok", "ok"),
    "llama3": ("ok", "ok", "ok with config"),
    "mistral": ("ok", "ok", "ok"),
    "qwen2": ("ok", "ok", "ok"),
    "qwen3": ("ok", "ok", "ok"),
    "gemma3": ("ok", "ok", "ok"),
    "phi3": ("ok", "ok", "ok"),
    "granite": ("ok", "ok", "unreadable"),
    # MoE: per-expert Linears under the family's checkpoint names (hfquant/formats/export_experts.py), read back
    # by load_gptq into fused quantized experts (hfquant/formats/gptq_experts.py)
    "mixtral": ("ok", "ok", "unreadable"),
    "qwen2_moe": ("ok", "ok", "ok"),
    "qwen3_moe": ("ok", "ok", "ok"),
    "gpt_oss": ("refused", "refused", "refused"),
    "deepseek_v3": ("ok", "refused", "refused"),
    "olmoe": ("ok", "ok", "refused"),
    "granitemoe": ("refused", "refused", "refused"),
}
EXPORTS = ("gptq", "compressed-tensors", "gguf")
CAL = dict(num_samples=8, seq_len=32, calibration_batch_size=4)
W4 = dict(bits=4, group_size=16, **CAL)
GPTQ_REL_BOUND, CT_BOUND = 1e-3, 1e-5
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def _gguf_atol(family: str) -> float:
    return 1e-4 if family in MOE_FAMILIES else 1e-5 if family == "gemma3" else 0.0


def _logits(model, reference: bool = False) -> torch.Tensor:
    """``model``'s logits on ``IDS``; ``reference``: quantized Linears on the exact float32 reference kernel (the
    format comparisons compare formats, not the fast CPU kernel's rounding)."""
    with torch.no_grad(), reference_kernels() if reference else contextlib.nullcontext():
        return model(input_ids=IDS).logits


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


class Refused(Exception):
    """hfquant refused to quantize or to export, with its one-line error (``_may_refuse``)."""


@contextlib.contextmanager
def _may_refuse():
    """An hfquant error inside the block (a quantization or an export) is a refusal, not a failure."""
    try:
        yield
    except HFQuantError as exc:
        raise Refused(_one_line(exc)) from exc


def _unreadable(reader: str, exc: BaseException) -> dict:
    return {"status": "unreadable", "reason": f"written; {reader} cannot read it: {_one_line(exc)}"}


def _step(fn, *args) -> dict:
    """Run one step: its record, or ``refused`` (``Refused``) / ``failed`` (any other exception)."""
    try:
        return fn(*args)
    except Refused as exc:
        return {"status": "refused", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - every outcome is recorded, the assertions below judge it
        return {"status": "failed", "reason": _one_line(exc)}


def _expert_weights(model) -> int:
    """The float model's expert weights: every element of its fused 3-D expert tensors."""
    return sum(p.numel() for m in find_experts(model).values() for p in m.parameters(recurse=False) if p.dim() == 3)


def _quantize(family: str, root: Path, state: dict) -> dict:
    """Step 1: W4 g16 GPTQ through ``from_pretrained``; keeps the quantized model in ``state``."""
    src = save_family_model(family, root / "float")
    float_model = AutoModelForCausalLM.from_pretrained(src)
    total_experts, cls = _expert_weights(float_model), type(float_model).__name__
    del float_model
    with _may_refuse():
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=HFQuantConfig(**W4)).eval()
    weights = model.hfquant_report["weights"]
    state["model"] = model
    pct = 100.0 * weights["expert_weights_quantized"] / total_experts if total_experts else None
    return {"status": "ok", "class": cls, "bits_per_weight": weights["bits_per_weight"],
            "expert_weights": total_experts, "expert_weights_quantized": weights["expert_weights_quantized"],
            "experts_quantized_pct": pct, "float_weights": weights["float_weights"]}


def _reload(root: Path, state: dict) -> dict:
    """Step 2: save, reload, the same logits bit for bit."""
    model, folder = state["model"], root / "q"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    state["folder"] = folder
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    equal = torch.equal(_logits(reloaded), _logits(model))
    return {"status": "ok" if equal else "failed", "reason": "" if equal else "reloaded logits differ",
            "class": type(reloaded).__name__}


def _gptq_export(root: Path, state: dict) -> dict:
    """Step 3a: GPTQ export, imported by ``load_gptq``."""
    model = state["model"]
    with warnings.catch_warnings(record=True) as caught, _may_refuse():
        warnings.simplefilter("always")
        out = export_checkpoint(state["folder"], "gptq", root / "gptq")
    try:
        imported = load_gptq(out).eval()
    except Exception as exc:  # noqa: BLE001 - recorded: the export was written, its import is what failed
        return _unreadable("hfquant's load_gptq", exc)
    ref, got = _logits(model, reference=True), _logits(imported, reference=True)
    diff, bound = _max_diff(got, ref), GPTQ_REL_BOUND * float(ref.abs().max())
    exact = torch.equal(_logits(float16_rounded(model), reference=True), got)
    record = {"status": "ok" if diff <= bound else "failed", "max_abs_diff": diff, "bound": bound,
              "exact_with_float16_scales": exact, "warnings": [" ".join(str(w.message).split()) for w in caught]}
    if diff > bound:
        record["reason"] = f"load_gptq logits differ by {diff:.3g} > {bound:.3g}"
    return record


def _ct_export(root: Path, state: dict) -> dict:
    """Step 3b: compressed-tensors export, read by transformers + compressed-tensors."""
    with _may_refuse():
        out = export_checkpoint(state["folder"], "compressed-tensors", root / "ct")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    except Exception as exc:  # noqa: BLE001 - recorded: the export was written, its read-back is what failed
        return _unreadable("transformers + compressed-tensors", exc)
    hfquant_modules = sorted({type(m).__name__ for m in loaded.modules() if type(m).__module__.startswith("hfquant")})
    got, ref = _logits(loaded), _logits(state["model"], reference=True)
    diff = _max_diff(got, ref)
    ok = diff <= CT_BOUND and not hfquant_modules
    record = {"status": "ok" if ok else "failed", "max_abs_diff": diff, "bound": CT_BOUND}
    if hfquant_modules:
        record["reason"] = f"loaded into hfquant modules {hfquant_modules}"
    elif not ok:
        record["reason"] = f"transformers' logits differ by {diff:.3g} > {CT_BOUND:.3g}"
    return record


def _read_gguf(out: Path, config_dir: Path | None):
    kwargs = {"config": AutoConfig.from_pretrained(config_dir)} if config_dir else {}
    return AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", **kwargs).eval()


def _gguf_read_back(family: str, out: Path, src: Path, model) -> dict:
    """transformers' read-back of ``out/model.gguf`` against ``model`` (the hfquant Q4_0 model)."""
    arch = read_gguf_header(out / "model.gguf")["architecture"]
    ref, atol = _logits(model), _gguf_atol(family)
    try:
        loaded = _read_gguf(out, None)
    except Exception as exc:  # noqa: BLE001 - transformers' loader refuses architectures it does not know
        return {**_unreadable(f"transformers ({arch})", exc), "arch": arch}
    record = {"arch": arch, "atol": atol, "class": type(loaded).__name__}
    diff = _max_diff(_logits(loaded), ref)
    if diff <= atol:
        return {**record, "status": "ok", "max_abs_diff": diff}
    try:
        with_config = _max_diff(_logits(_read_gguf(out, src)), ref)
    except Exception as exc:  # noqa: BLE001 - recorded
        with_config = None
        record["config_error"] = _one_line(exc)
    if with_config is not None and with_config <= atol:
        return {**record, "status": "ok with config", "max_abs_diff": with_config, "diff_without_config": diff,
                "reason": f"read back alone, logits {diff:.3g} off (transformers' GGUF loader does not read all "
                          "of this config from the file); with the float model's config=, within tolerance"}
    status = "unreadable" if type(loaded).__name__ != type(model).__name__ else "failed"
    return {**record, "status": status, "max_abs_diff": diff, "reason":
            f"written; transformers ({arch}) cannot read it: it loads a {type(loaded).__name__}, logits {diff:.3g} "
            "off" if status == "unreadable" else f"read-back logits differ by {diff:.3g} > {atol:.3g}"}


def _gguf_export(family: str, root: Path) -> dict:
    """Step 4: Q4_0 GPTQ, save, GGUF export, transformers' read-back."""
    src = save_family_model(family, root / "gguf-float", gguf_leg=True)
    method = GGUF_LEG_METHOD.get(family, "gptq")
    config = HFQuantConfig(gguf_type="Q4_0", method=method, **CAL)
    with _may_refuse():
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config)
    model.eval().save_pretrained(root / "gguf-q")
    tiny_tokenizer().save_pretrained(root / "gguf-q")
    with _may_refuse():
        out = export_checkpoint(root / "gguf-q", "gguf", root / "gguf")
    header = read_gguf_header(out / "model.gguf")
    record = _gguf_read_back(family, out, src, model)
    record["tensor_types"] = sorted(header["types"])
    record.update(config=GGUF_LEG_DIFFERS.get(family, ""), method=method)
    return record


def _run_family(family: str, root: Path) -> dict:
    state: dict = {}
    steps = {"quantize": _step(_quantize, family, root, state)}
    later = ("reload", "gptq", "compressed-tensors")
    if steps["quantize"]["status"] == "ok":
        steps["reload"] = _step(_reload, root, state)
    if "folder" in state:
        steps["gptq"] = _step(_gptq_export, root, state)
        steps["compressed-tensors"] = _step(_ct_export, root, state)
    for name in later:
        steps.setdefault(name, {"status": "not run", "reason": "quantization or save failed"})
    steps["gguf"] = _step(_gguf_export, family, root)
    return steps


def _write(family: str, result: dict, tmp: Path) -> None:
    """``result`` as ``$HFQUANT_FAMILY_RESULTS/<family>.json`` (the test's temporary folder written ``<tmp>``)."""
    folder = os.environ.get("HFQUANT_FAMILY_RESULTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        text = json.dumps(result, indent=1, sort_keys=True).replace(str(tmp), "<tmp>")
        (Path(folder) / f"{family}.json").write_text(text + "\n")


@pytest.mark.parametrize("family", FAMILIES)
def test_family(family, tmp_path):
    start = time.perf_counter()
    steps = _run_family(family, tmp_path)
    result = {"family": family, "order": FAMILIES.index(family), "moe": family in MOE_FAMILIES,
              "features": FEATURES[family], "steps": steps, "expected": dict(zip(EXPORTS, EXPECTED[family])),
              "seconds": round(time.perf_counter() - start, 1)}
    _write(family, result, tmp_path)
    for name in ("quantize", "reload"):
        assert steps[name]["status"] == "ok", f"{family} {name}: {steps[name]}"
    if family in MOE_FAMILIES:
        assert steps["quantize"]["expert_weights"] > 0
        assert steps["quantize"]["experts_quantized_pct"] == 100.0, steps["quantize"]
    got = tuple(steps[name]["status"] for name in EXPORTS)
    assert got == EXPECTED[family], {name: steps[name] for name in EXPORTS}
