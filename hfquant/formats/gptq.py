"""The GPTQ checkpoint layout (AutoGPTQ / GPTQModel / optimum / transformers / vLLM / TGI) and its conversion.

Per quantized Linear with ``in`` inputs, ``out`` outputs, ``b`` bits and ``G = ceil(in / group_size)`` groups:

* ``qweight``: int32 ``[in * b / 32, out]``, codes packed along the INPUT dimension. Column ``o`` is the
  little-endian bit stream of ``q[0, o], q[1, o], ...`` (code ``i`` at stream bits ``[i*b, i*b + b)``),
  cut into 32-bit words: for 4 bits, ``qweight[r, o]`` holds input rows ``8r .. 8r+7``, row ``8r + j`` in
  bits ``[4j, 4j + 4)`` (lowest nibble = lowest input index). 3 bits is the same stream (10 codes and a
  split code per word), which is AutoGPTQ's 3-bit interleave.
* ``qzeros``: int32 ``[G, out * b / 32]``, zero points packed the same way along the OUTPUT dimension.
  Version 1 (``checkpoint_format: "gptq"``) stores ``zero - 1``; readers add 1 back. Version 2
  (``"gptq_v2"``, GPTQModel) stores ``zero``. A symmetric 4-bit v1 word is ``0x77777777``.
* ``scales``: float16 ``[G, out]``; ``g_idx``: int32 ``[in]`` (group of each input row; act-order makes it
  non-monotone); ``bias``: float16 ``[out]`` when the Linear has one.
* Dequantized: ``W[i, o] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])``.

hfquant's own packing (``hfquant.core.packing``) is the same bit stream per output row, so conversion is
a reshape + transpose of the words (no bit shuffling): ``qweight[chunk * b + w, o] == packed[o, chunk, w]``.

Mixture-of-Experts checkpoints: each expert's projection is written as its own Linear under the names of the
family's checkpoints (``hfquant.formats.export_experts``; e.g. Mixtral ``block_sparse_moe.experts.<e>.w1``),
exactly as a dense Linear; routers stay float (``modules_in_block_to_quantize`` leaves them out where a float Linear
sits in the blocks).

What the layout cannot express (export refuses with ``FormatError``): activation quantization (W8A8),
``in * b`` or ``out * b`` not a multiple of 32, zero point 0 in v1 (``-1`` does not fit; use
``gptq_v2``), and scales outside float16's range. Valid GPTQ that vLLM refuses (a partial last group, an
asymmetric grid) is exported with a one-line ``VLLMWarning`` that says what to do instead.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
import torch

from hfquant.nn.graph import find_blocks, is_quantizable
from hfquant.core.errors import FormatError
from hfquant.core.packing import CHUNK, pack_codes, unpack_codes
from hfquant.formats.files import write_json
from hfquant.core.schemes import summary
from hfquant.nn.weight_only import QuantLinearWeightOnly

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class GPTQLayout:
    """What a GPTQ checkpoint states once for all its modules and every module's tensor shapes follow from: the
    bits, the group size (``-1``: one group per output channel) and the layout version (``checkpoint_format``:
    ``"gptq"``, v1, or ``"gptq_v2"``)."""

    bits: int
    group_size: int
    checkpoint_format: str = "gptq"


def zero_offset(checkpoint_format: str) -> int:
    """What is subtracted from zero points before packing: 1 for v1 (``"gptq"``), 0 for ``"gptq_v2"``."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise FormatError(f"GPTQ checkpoint_format: got {checkpoint_format!r}; expected one of {list(GPTQ_FORMATS)}")
    return 1 if checkpoint_format == "gptq" else 0


def _words(n: int, bits: int, what: str, name: str) -> int:
    if (n * bits) % 32:
        raise FormatError(
            f"{name}: {what}={n} at {bits} bits is not a whole number of int32 words (needs {what} * bits % 32 == 0); "
            "the GPTQ layout cannot store it; keep this module float (modules_to_not_convert) or export to hfquant"
        )
    return n * bits // 32


def pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes [rows, n]`` per row as one little-endian stream: int32 ``[rows, n * bits / 32]``.

    ``n * bits`` must be a multiple of 32 (checked by the callers, which know the module name).
    """
    rows, n = codes.shape
    return pack_codes(codes, bits).reshape(rows, -1)[:, : n * bits // 32].contiguous()


def _stream_to_packed(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Per-row streams int32 ``[rows, n * bits / 32]`` as hfquant's packed ``[rows, ceil(n/32), bits]``
    (the same words; the last chunk zero-padded as ``pack_codes`` pads it)."""
    rows, w = words.shape
    chunks = (n + CHUNK - 1) // CHUNK
    full = torch.zeros(rows, chunks * bits, dtype=torch.int32, device=words.device)
    full[:, :w] = words.to(torch.int32)
    return full.reshape(rows, chunks, bits)


def unpack_stream(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_stream``: int32 ``[rows, n * bits / 32]`` to int32 codes ``[rows, n]``."""
    return unpack_codes(_stream_to_packed(words, bits, n), bits, n)


def to_gptq(name: str, tensors: dict[str, torch.Tensor], bits: int,
            checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """hfquant W4A16 tensors of module ``name`` -> its GPTQ tensors (``name.qweight`` etc.).

    ``tensors``: the module's tensors by their hfquant names, as a checkpoint holds them: ``weight`` (packed
    codes), ``scales``, ``zeros``, ``g_idx`` (one entry per input feature) and, when the Linear has one, ``bias``."""
    packed, scales, zeros, g_idx = tensors["weight"], tensors["scales"], tensors["zeros"], tensors["g_idx"]
    bias, in_features = tensors.get("bias"), g_idx.numel()
    if bits not in GPTQ_BITS:
        raise FormatError(f"{name}: bits={bits}; the GPTQ layout supports {list(GPTQ_BITS)}")
    out_features = packed.shape[0]
    rows = _words(in_features, bits, "in_features", name)
    _words(out_features, bits, "out_features", name)
    # qweight[chunk * b + w, o] == packed[o, chunk, w]: the same words, per output column.
    qweight = packed.reshape(out_features, -1)[:, :rows].t().contiguous()
    offset = zero_offset(checkpoint_format)
    z = zeros.to(torch.int32) - offset
    if bool((z < 0).any()) or bool((z >= 2**bits).any()):
        raise FormatError(
            f"{name}: zero points {int(zeros.min())}..{int(zeros.max())} do not fit {checkpoint_format!r} "
            f"(stores zero - {offset} in {bits} bits); export with checkpoint_format='gptq_v2' or quantize with sym=True"
        )
    qzeros = pack_stream(z.t().contiguous(), bits)
    scales16 = scales.to(torch.float16)
    if not bool(torch.isfinite(scales16).all()) or bool(((scales16 == 0) & (scales != 0)).any()):
        raise FormatError(f"{name}: scales {float(scales.abs().max()):.3g} overflow or underflow float16, which the GPTQ layout stores")
    out = {f"{name}.qweight": qweight, f"{name}.qzeros": qzeros,
           f"{name}.scales": scales16.t().contiguous(), f"{name}.g_idx": g_idx.to(torch.int32).contiguous()}
    if bias is not None:
        out[f"{name}.bias"] = bias.to(torch.float16)
    return out


def from_gptq(name: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
              bits: int, group_size: int, checkpoint_format: str = "gptq"):
    """GPTQ tensors -> ``(codes [out, in] int32, scales [out, G], zeros [out, G] uint8, g_idx [in] int32)``."""
    packed, scales, zeros, g_idx = gptq_to_packed(name, qweight, qzeros, scales, g_idx, bits, group_size,
                                                  checkpoint_format)
    return unpack_codes(packed, bits, g_idx.numel()), scales, zeros, g_idx


def gptq_to_packed(name: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor | None, bits: int, group_size: int, checkpoint_format: str = "gptq"):
    """GPTQ tensors -> ``(packed [out, ceil(in/32), bits] int32, scales [out, G], zeros [out, G] uint8,
    g_idx [in] int32)``: ``packed`` is ``QuantLinearWeightOnly.weight`` as is (the same words as ``qweight``).

    Scales keep their dtype (float16 in GPTQ files); zero points get the format's offset back, so a v1
    stored ``2**bits - 1`` becomes ``2**bits``, exactly what GPTQ kernels compute with.
    """
    if bits not in GPTQ_BITS:
        raise FormatError(f"{name}: bits={bits}; the GPTQ layout supports {list(GPTQ_BITS)}")
    rows, out_features = qweight.shape
    in_features = rows * 32 // bits
    if g_idx is not None:
        in_features = g_idx.numel()
    g = in_features if group_size == -1 else group_size
    n_groups = (in_features + g - 1) // g
    if rows != _words(in_features, bits, "in_features", name) or tuple(scales.shape) != (n_groups, out_features) \
            or tuple(qzeros.shape) != (n_groups, _words(out_features, bits, "out_features", name)):
        raise FormatError(
            f"{name}: GPTQ shapes qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)} "
            f"do not match bits={bits}, group_size={group_size}, in_features={in_features}; check the checkpoint's quantization_config"
        )
    packed = _stream_to_packed(qweight.t().contiguous(), bits, in_features)
    zeros = unpack_stream(qzeros, bits, out_features).t() + zero_offset(checkpoint_format)
    if int(zeros.max()) > 255:
        raise FormatError(f"{name}: zero point {int(zeros.max())} does not fit hfquant's uint8 zero points")
    if g_idx is None:
        g_idx = torch.arange(in_features, dtype=torch.int32, device=qweight.device) // g
    elif int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
        raise FormatError(f"{name}: g_idx values {int(g_idx.min())}..{int(g_idx.max())} outside 0..{n_groups - 1}")
    return packed, scales.t().contiguous(), zeros.to(torch.uint8).contiguous(), g_idx.to(torch.int32)


def gptq_quantization_config(layout: GPTQLayout, *, sym: bool, desc_act: bool, true_sequential: bool = True,
                             damp_percent: float | None = None, block_name_to_quantize: str | None = None,
                             modules_in_block_to_quantize: list[list[str]] | None = None) -> dict:
    """The ``quantization_config`` block of ``config.json`` (transformers/optimum ``GPTQConfig`` keys, plus
    ``checkpoint_format`` read by vLLM and GPTQModel) for a checkpoint in ``layout``. Also what
    ``quantize_config.json`` holds."""
    checkpoint_format = layout.checkpoint_format
    cfg = {
        "quant_method": "gptq",
        "bits": layout.bits,
        "group_size": layout.group_size,
        "desc_act": desc_act,
        "sym": sym,
        "true_sequential": true_sequential,
        "static_groups": False,
        "lm_head": False,
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "meta": {"quantizer": ["hfquant"]},
    }
    if damp_percent is not None and 0 < damp_percent < 1:
        cfg["damp_percent"] = damp_percent
    if block_name_to_quantize:
        cfg["block_name_to_quantize"] = block_name_to_quantize
    if modules_in_block_to_quantize:
        cfg["modules_in_block_to_quantize"] = modules_in_block_to_quantize
    return cfg


def _block_layout(ckpt):
    """``(block_name, modules_in_block_to_quantize or None)`` for the GPTQ config; refuses layouts it cannot state.

    The list (relative to a block, one group) is written when some Linear inside the blocks stays float (e.g. a
    shared expert's gate): it names every quantized Linear of any block (per-expert Linears included, under their
    exported names), so it must not name one that another block keeps float."""
    model, names = ckpt.meta_model(), ckpt.export_names()
    quantizable = {n for n, m in model.named_modules() if n and is_quantizable(m)}
    missing = sorted(set(names.modules) - quantizable)
    if missing:
        raise FormatError(f"{missing[0]}: quantized in the checkpoint but not a Linear of the model built from config.json")
    try:
        block_name, blocks = find_blocks(model)
    except ValueError:
        raise FormatError("no repeated decoder blocks found; the GPTQ config cannot name the quantized modules") from None
    prefixes = [f"{block_name}.{i}." for i in range(len(blocks))]

    def relative(name):
        return next((name[len(p):] for p in prefixes if name.startswith(p)), None)

    exported = names.quantized()
    outside = sorted(n for n in exported if relative(n) is None)
    if outside:
        raise FormatError(f"{outside[0]}: quantized outside the decoder blocks ({block_name}); the GPTQ layout exported "
                          "here covers block Linears only; re-quantize with it in modules_to_not_convert")
    used = {relative(n) for n in exported}
    floats = {relative(names.rename_module(n)) for n in quantizable - set(names.modules)} - {None}
    both = sorted(used & floats)
    if both:
        raise FormatError(f"{both[0]}: quantized in some blocks and float in others; a GPTQ config states one set of "
                          "Linears for all blocks; quantize it everywhere or nowhere")
    return block_name, ([sorted(used)] if floats else None)


def _uses_act_order(ckpt, group_size: int) -> bool:
    """Whether some module's ``g_idx`` (``[in]``, or ``[experts, in]`` for stacked experts) is not ``i // g``."""
    for name in ckpt.modules:
        g_idx = ckpt.tensor(f"{name}.g_idx")
        in_f = g_idx.shape[-1]
        g = in_f if group_size == -1 else group_size
        if not bool((g_idx.long() == torch.arange(in_f, device=g_idx.device) // g).all()):
            return True
    return False


class VLLMWarning(UserWarning):
    """A GPTQ export that is valid GPTQ but that vLLM refuses to load (one line each, ``warn_vllm_refusals``)."""


def _dividing_group_size(in_features: set[int], group_size: int) -> int:
    """The largest power of two below ``group_size`` (down to 16) that divides every ``in_features``; else -1."""
    g = group_size // 2
    while g >= 16 and any(n % g for n in in_features):
        g //= 2
    return g if g >= 16 else -1


def warn_vllm_refusals(ckpt, q) -> None:
    """Warn (``VLLMWarning``, one line) about what vLLM refuses in this GPTQ export, as measured with vLLM 0.32
    (``scripts/bench_vllm.py``): a partial last group (``in_features`` not a multiple of ``group_size``: vLLM allocates
    ``in // g`` groups and stops on a bare ``AssertionError`` while loading; gptqmodel refuses it too) and an
    asymmetric grid (vLLM: *Unsupported quantization config: bits=4, sym=False*)."""
    sizes = {n: ckpt.tensor(f"{n}.g_idx").shape[-1] for n in ckpt.modules}
    partial = [n for n in ckpt.modules if q.group_size != -1 and sizes[n] % q.group_size]
    if partial:
        g = _dividing_group_size(set(sizes.values()), q.group_size)
        warnings.warn(f"GPTQ export: {len(partial)} modules (e.g. {partial[0]}, in_features {sizes[partial[0]]}) have "
                      f"in_features not a multiple of group_size={q.group_size}; the file is valid GPTQ (ceil groups), but "
                      "vLLM and gptqmodel refuse such layers (vLLM 0.32: a bare AssertionError while loading); for them "
                      f"re-quantize with group_size={g}, which divides every in_features", VLLMWarning, stacklevel=3)
    if not q.sym:
        warnings.warn("GPTQ export: asymmetric grid (sym: false); vLLM 0.32 refuses asymmetric GPTQ (\"Unsupported "
                      f"quantization config: bits={q.bits}, sym=False\"); for vLLM export as compressed-tensors, which "
                      "vLLM reads asymmetric, or quantize with sym: true", VLLMWarning, stacklevel=3)


def gptq_writer(ckpt, checkpoint_format: str = "gptq"):
    """``(convert(name, tensors) -> GPTQ tensors, write_config(config, folder))`` for an ``HFQuantCheckpoint``
    (``name``: the Linear's exported name, a per-expert one for stacked experts)."""
    q = ckpt.qconfig
    if ckpt.w8a8:
        raise FormatError("W8A8 (SmoothQuant) checkpoint: the GPTQ layout is weight-only and cannot store int8 "
                          "activation quantization; export to compressed-tensors instead")
    mixed = {(s["bits"], s["group_size"], s["sym"]) for s in (q.module_schemes or {}).values()}
    if mixed - {(q.bits, q.group_size, q.sym)}:
        raise FormatError(f"per-module schemes ({summary(q.module_schemes)}): the GPTQ v1 layout has one bits/group_size "
                          "for the whole model; export to compressed-tensors (one config group per scheme) instead")
    zero_offset(checkpoint_format)
    block_name, subset = _block_layout(ckpt)
    desc_act = _uses_act_order(ckpt, q.group_size)
    warn_vllm_refusals(ckpt, q)

    def convert(name, t):
        return to_gptq(name, t, q.bits, checkpoint_format)

    cfg = gptq_quantization_config(GPTQLayout(q.bits, q.group_size, checkpoint_format), sym=q.sym, desc_act=desc_act,
                                   true_sequential=q.true_sequential, damp_percent=q.damp_percent,
                                   block_name_to_quantize=block_name, modules_in_block_to_quantize=subset)
    def write_config(config: dict, folder) -> None:
        write_json(Path(folder) / "config.json", {**config, "quantization_config": cfg})
        # AutoGPTQ / GPTQModel read quantize_config.json; transformers and vLLM read config.json.
        write_json(Path(folder) / "quantize_config.json", cfg)

    return convert, write_config


class GPTQImportLinear(torch.nn.Module):
    """Skeleton with a GPTQ module's tensors, so a GPTQ checkpoint loads by name; ``to_w4a16()`` converts it.

    Not an ``nn.Linear`` (transformers' init and type checks must not touch it); it has no forward.
    """

    def __init__(self, in_features: int, out_features: int, layout: GPTQLayout, has_g_idx: bool, bias: bool,
                 dtype: torch.dtype, name: str = ""):
        super().__init__()
        bits, group_size = layout.bits, layout.group_size
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.checkpoint_format, self.name = layout.checkpoint_format, name
        g = in_features if group_size == -1 else group_size
        n_groups = (in_features + g - 1) // g

        def param(*shape, dt):  # the caller builds skeletons under ``with torch.device("meta")``
            return torch.nn.Parameter(torch.zeros(*shape, dtype=dt), requires_grad=False)

        self.qweight = param(_words(in_features, bits, "in_features", name), out_features, dt=torch.int32)
        self.qzeros = param(n_groups, _words(out_features, bits, "out_features", name), dt=torch.int32)
        self.scales = param(n_groups, out_features, dt=dtype)
        self.g_idx = param(in_features, dt=torch.int32) if has_g_idx else None
        self.bias = param(out_features, dt=dtype) if bias else None

    def to_w4a16(self):
        packed, scales, zeros, g_idx = gptq_to_packed(self.name, self.qweight.data, self.qzeros.data, self.scales.data,
                                                None if self.g_idx is None else self.g_idx.data,
                                                self.bits, self.group_size, self.checkpoint_format)
        dtype = self.scales.dtype
        m = QuantLinearWeightOnly(self.in_features, self.out_features, self.bits, self.group_size, self.bias is not None,
                             dtype=dtype, device="cpu")
        m.weight.data = packed
        m.scales.data, m.zeros.data, m.g_idx.data = scales, zeros, g_idx
        if self.bias is not None:
            m.bias.data = self.bias.data.clone()
        return m.to(self.qweight.device)


def checkpoint_keys(checkpoint_files) -> set[str]:
    """Tensor names in the safetensors files (headers only)."""
    keys: set[str] = set()
    for f in checkpoint_files or []:
        if str(f).endswith(".safetensors"):
            with safe_open(f, "pt") as h:
                keys.update(h.keys())
    return keys


def float16_rounded(model):
    """A copy of ``model`` whose W4A16 scales and biases are rounded to float16, as the GPTQ layout stores
    them: what a GPTQ export of ``model`` computes exactly."""
    rounded = copy.deepcopy(model)
    for m in rounded.modules():
        if isinstance(m, QuantLinearWeightOnly):
            m.scales.data = m.scales.half().float()
            if m.bias is not None:
                m.bias.data = m.bias.half().float()
            m._kernel_cache.clear()
    return rounded
