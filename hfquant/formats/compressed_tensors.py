"""compressed-tensors export, written by the ``compressed-tensors`` library's own compressors.

* W4A16 (and 2/3/8-bit weight-only) -> ``pack-quantized``: ``weight_packed`` int32 ``[out, in * b / 32]``,
  ``weight_scale`` ``[out, G]``, ``weight_shape``, and for asymmetric grids a packed ``weight_zero_point``.
  compressed-tensors uses signed codes (``[-2**(b-1), 2**(b-1) - 1]``), so hfquant's unsigned code ``q``
  with zero ``z`` becomes ``q - 2**(b-1)`` with zero ``z - 2**(b-1)`` (0 for symmetric grids): the same
  weights, exactly.
* W8A8 (SmoothQuant) -> ``int-quantized``: ``weight`` int8 ``[out, in]``, ``weight_scale`` ``[out, 1]``,
  activations int8 dynamic per token (or ``input_scale`` for static per-tensor).

Each module's dequantized float weight and its scale/zero point go through the library's
``compress(state_dict, scheme)``, which re-derives the integer codes; the result is decompressed again
with the library and compared with hfquant's dequantized weight (``torch.equal``), so a file that would
load differently is never written. The config block is written by the library's
``ModelCompressor.update_config``.

Per-module schemes (``module_schemes``, from overrides or ``bits: auto``) become one config group per
distinct ``(bits, group_size, sym)``, each targeting its modules by exact name.

Mixture-of-Experts checkpoints: each expert's projection is written as its own Linear (``weight_packed`` ...) under
the names of the family's checkpoints (``hfquant.formats.export_experts``), what vLLM and transformers load MoE
compressed-tensors checkpoints by; the routers are listed in ``ignore``.

Refused (``FormatError``): groups that do not divide ``in_features`` (compressed-tensors' group strategy
requires it), act-order with a non-monotone ``g_idx`` (``actorder="group"`` was removed from
compressed-tensors 0.20), GPT-2 ``Conv1D`` modules, and zero points outside the signed range.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from hfquant.core.errors import FormatError
from hfquant.core.grids import dequantize_grouped
from hfquant.core.packing import unpack_codes
from hfquant.formats.files import write_json
from hfquant.nn.experts import router_names


def _import_ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise FormatError("compressed-tensors export needs the compressed-tensors package: pip install 'compressed-tensors>=0.20,<0.21' (or pip install -e .[interop])") from None


def _module_q(q, name: str):
    """The config fields of module ``name``: its entry in ``module_schemes``, else the top-level ones."""
    s = (q.module_schemes or {}).get(name)
    if s is None:
        return q
    return SimpleNamespace(bits=s["bits"], group_size=s["group_size"], sym=s["sym"], activation_scheme=q.activation_scheme)


def _scheme(q, w8a8: bool, targets: list[str] | None = None):
    # optional dependency (the `interop` extra), imported only for this export
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    targets = targets or ["Linear"]

    if w8a8:
        static = q.activation_scheme == "static"
        return QuantizationScheme(
            targets=targets,
            weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False),
            input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True,
                                               strategy="tensor" if static else "token", dynamic=not static),
            format="int-quantized",
        )
    grouped = q.group_size != -1
    return QuantizationScheme(
        targets=targets,
        weights=QuantizationArgs(num_bits=q.bits, type="int", symmetric=q.sym, strategy="group" if grouped else "channel",
                                 group_size=q.group_size if grouped else None, dynamic=False),
        format="pack-quantized",
    )


def _w4a16_state(name: str, t: dict, q) -> dict:
    in_f = t["g_idx"].numel()
    g = in_f if q.group_size == -1 else q.group_size
    if in_f % g:
        raise FormatError(f"{name}: in_features={in_f} is not a multiple of group_size={g}; compressed-tensors groups must "
                          "divide the input dimension; re-quantize with a group_size that divides it (or -1), or export to gptq")
    if not torch.equal(t["g_idx"].long(), torch.arange(in_f, device=t["g_idx"].device) // g):
        raise FormatError(f"{name}: act-order g_idx is not monotone; compressed-tensors>=0.20 has no g_idx; re-quantize "
                          "with static_groups=True (the default) or desc_act=False, or export to gptq")
    half = 2 ** (q.bits - 1)
    zp = t["zeros"].to(torch.int32) - half
    if q.sym and bool((zp != 0).any()):
        raise FormatError(f"{name}: symmetric config but zero points differ from {half}; export to gptq or hfquant")
    if bool((zp < -half).any()) or bool((zp >= half).any()):
        raise FormatError(f"{name}: zero points {int(t['zeros'].min())}..{int(t['zeros'].max())} outside 0..{2 * half - 1}")
    codes = unpack_codes(t["weight"], q.bits, in_f)
    weight = dequantize_grouped(codes, t["scales"], t["zeros"], t["g_idx"])
    state = {"weight": weight, "weight_scale": t["scales"].clone()}
    if not q.sym:
        state["weight_zero_point"] = zp.to(torch.int8)
    return state


def _w8a8_state(name: str, t: dict, q) -> dict:
    out_f = t["weight"].shape[0]
    codes = t["weight"].reshape(out_f, -1)
    scale = t["weight_scale"].float().reshape(out_f, 1)
    state = {"weight": codes.float() * scale, "weight_scale": scale}
    if q.activation_scheme == "static":
        state["input_scale"] = t["input_scale"].float().reshape(1)
    return state


def _groups(q, w8a8: bool, scheme_key: dict[str, str]):
    """``(config groups, exported Linear -> its scheme)``: one group targeting ``Linear`` for one scheme, else one
    group per distinct ``(bits, group_size, sym)`` targeting its Linears by exported name."""
    by_key: dict[tuple, list[str]] = {}
    for name, key in scheme_key.items():
        mq = _module_q(q, key)
        by_key.setdefault((mq.bits, mq.group_size, mq.sym) if not w8a8 else (), []).append(name)
    if len(by_key) == 1:
        group = _scheme(_module_q(q, next(iter(scheme_key.values()))), w8a8)
        return {"group_0": group}, dict.fromkeys(scheme_key, group)
    groups, scheme_of = {}, {}
    for i, names in enumerate(by_key.values()):
        groups[f"group_{i}"] = _scheme(_module_q(q, scheme_key[names[0]]), w8a8, targets=sorted(names))
        scheme_of.update(dict.fromkeys(names, groups[f"group_{i}"]))
    return groups, scheme_of


def _ignore(ckpt) -> list[str]:
    """The config's ``ignore``: the model's Linears left float and the MoE routers (kept float; some are not
    ``nn.Linear`` in transformers but are Linears in vLLM), under their exported names."""
    model, names = ckpt.meta_model(), ckpt.export_names()
    floats = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in names.modules]
    return sorted({names.rename_module(n) for n in floats + router_names(model)})


def ct_writer(ckpt):
    """``(convert(name, tensors) -> compressed-tensors tensors, write_config(config, folder))`` for an ``HFQuantCheckpoint``."""
    _import_ct()
    # optional dependency (the `interop` extra), imported only for this export
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    q = ckpt.qconfig
    model, names = ckpt.meta_model(), ckpt.export_names()
    types = dict(model.named_modules())
    for name in names.modules:
        if not isinstance(types.get(name), nn.Linear):
            kind = type(types.get(name)).__name__
            raise FormatError(f"{name}: is a {kind}, not nn.Linear; compressed-tensors export supports Linear modules only")
    scheme_key = names.quantized()  # exported Linear -> its module_schemes name
    groups, scheme_of = _groups(q, ckpt.w8a8, scheme_key)
    compressor = BaseCompressor.get_value_from_registry(next(iter(groups.values())).format)

    def convert(name, t):
        scheme = scheme_of[name]
        state = (_w8a8_state if ckpt.w8a8 else _w4a16_state)(name, t, _module_q(q, scheme_key[name]))
        packed = compressor.compress(dict(state), scheme)
        back = compressor.decompress(dict(packed), scheme)["weight"]
        if not torch.equal(back.float(), state["weight"].float()):
            diff = (back.float() - state["weight"].float()).abs().max()
            raise FormatError(f"{name}: compressed-tensors round trip changed the weight (max |diff| {float(diff):.3g}); not written")
        out = {f"{name}.{k}": v for k, v in packed.items()}
        if "bias" in t:
            out[f"{name}.bias"] = t["bias"]
        return out

    qc = QuantizationConfig(config_groups=groups, format=next(iter(groups.values())).format, ignore=_ignore(ckpt),
                            quantization_status=QuantizationStatus.COMPRESSED)

    def write_config(config: dict, folder) -> None:
        # The library writes its own config block into config.json (the same call llm-compressor makes).
        write_json(Path(folder) / "config.json", {k: v for k, v in config.items() if k != "quantization_config"})
        ModelCompressor(quantization_config=qc).update_config(str(folder))

    return convert, write_config
