"""Read llama.cpp GGUF files: ``read_gguf_header`` (what a file holds, from its header) and ``load_gguf`` (a file's
Linears as ``QuantLinearGGUF`` modules holding its blocks exactly, so the model saves and exports back byte for byte).
The writer is ``hfquant.formats.gguf``; both share ``hfquant.formats.gguf_layout``.
"""

from __future__ import annotations

from collections import Counter
import os
from pathlib import Path

import torch
import transformers

from hfquant.config import GGUF_TENSOR_TYPES, HFQuantConfig
from hfquant.core import gguf_types
from hfquant.core.errors import FormatError
from hfquant.core.gguf_blocks import BLOCK_TYPES
from hfquant.core.gguf_grids import symmetric
from hfquant.formats.files import CheckpointError
from hfquant.formats.gguf_layout import ARCHS, gguf_package, name_map, permute_rows, rotary_heads
from hfquant.nn.gguf import QuantLinearGGUF
from hfquant.nn.graph import is_quantizable, set_submodule


def read_gguf_header(file: str | os.PathLike) -> dict:
    """What the GGUF ``file`` holds, from its header (no tensor data is read): ``architecture``, ``name``,
    ``types`` (``{tensor type: {"tensors", "elements", "bytes"}}``), ``linears`` (the same totals over the block-type
    weights of the decoder layers: ``stored_bits`` = their bits per weight) and ``bytes`` (the file's size).
    ``CheckpointError`` (one line) when the file is not a readable GGUF file."""
    gguf = gguf_package()
    file = Path(file)
    try:
        reader = gguf.GGUFReader(str(file))
        fields = {k: reader.fields[k].contents() for k in ("general.architecture", "general.name")
                  if k in reader.fields}
        rows = [(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in reader.tensors]
    except Exception as exc:  # noqa: BLE001 - the gguf package raises ValueError, IndexError, OSError, ...
        detail = (str(exc).splitlines() or [""])[0][:120] or type(exc).__name__
        raise CheckpointError(f"{str(file)!r}: not a readable GGUF file ({detail}); write it again (`hfquant run`, "
                              "`hfquant export --format gguf`) or re-download it") from None
    types: dict[str, dict] = {}
    linears = {"tensors": 0, "elements": 0, "bytes": 0}
    for name, kind, elements, nbytes in rows:
        for totals in [types.setdefault(kind, {"tensors": 0, "elements": 0, "bytes": 0})] + (
                [linears] if name.startswith("blk.") and kind in BLOCK_TYPES else []):
            totals["tensors"] += 1
            totals["elements"] += elements
            totals["bytes"] += nbytes
    linears["stored_bits"] = linears["bytes"] * 8 / linears["elements"] if linears["elements"] else None
    return {"architecture": fields.get("general.architecture"), "name": fields.get("general.name"), "types": types,
            "linears": linears, "bytes": file.stat().st_size}


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, float_ok: bool = False):
    """Load a GGUF file (``.gguf`` path, or a folder holding one ``.gguf``) into hfquant modules: transformers'
    GGUF loader builds the model (config, tokenizer-free; norms and embeddings de-quantized), then every Linear
    stored in a block type of ``gguf_blocks.BLOCK_TYPES`` becomes a ``QuantLinearGGUF`` holding the file's blocks
    exactly (q/k rows back in the HF rotary layout); the head's and token embeddings' blocks are kept beside their
    de-quantized weights (``gguf_types.HELD_BLOCKS``). ``model.config.quantization_config`` records each tensor's
    type, so the model saves (hfquant layout), reloads and exports back to GGUF byte for byte.

    A file without such a Linear (a float export) raises ``FormatError``, unless ``float_ok``: then the float model
    transformers built is returned as it is (no ``quantization_config``)."""
    gguf = gguf_package()
    file = Path(path)
    if file.is_dir():
        found = sorted(file.glob("*.gguf"))
        if len(found) != 1:
            raise FormatError(f"{file}: expected exactly one .gguf file, found {len(found)}; pass the file's path")
        file = found[0]
    if not file.is_file():
        raise FormatError(f"{file}: no such GGUF file")
    reader = gguf.GGUFReader(str(file))
    model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype)
    if getattr(model, "hf_quantizer", None) is not None:  # transformers' GGUF loader: its weights are float now
        model.hf_quantizer.remove_quantization_config(model)
    cfg = model.config
    arch = ARCHS.get(cfg.model_type)
    if arch is None:
        raise FormatError(f"{file}: model_type {cfg.model_type!r}; load_gguf handles {sorted(ARCHS)}")
    names = name_map(gguf, arch, cfg.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    schemes = {}
    for name, module in list(model.named_modules()):
        if not name or not is_quantizable(module) or module is model.get_output_embeddings():
            continue
        target = names.get_name(name + ".weight", try_suffixes=(".weight",))
        t = tensors.get(target) if target else None
        if t is None or t.tensor_type.name not in BLOCK_TYPES:
            continue
        data = torch.from_numpy(t.data.copy()).reshape(module.out_features, -1)
        n = rotary_heads(arch, name, heads, kv_heads)
        if n is not None:  # llama.cpp's rotary row order -> HF's
            data = permute_rows(data, n, inverse=True)
        kind = t.tensor_type.name
        set_submodule(model, name, QuantLinearGGUF.from_blocks(module, data, kind, dtype))
        bt = BLOCK_TYPES[kind]
        schemes[name] = {"bits": bt.bits, "group_size": bt.group_size, "sym": symmetric(kind), "method": "rtn",
                         "gguf_type": kind}
    if not schemes:
        if float_ok:
            return model
        raise FormatError(f"{file}: no Linear stored in a block type hfquant reads ({sorted(BLOCK_TYPES)})")
    main = Counter(s["gguf_type"] for s in schemes.values()).most_common(1)[0][0]
    types = _hold_embedding_blocks(model, tensors)
    cfg.quantization_config = HFQuantConfig(gguf_type=main, method="rtn", module_schemes=schemes,
                                            gguf_head_type=types.get("output"),
                                            gguf_embedding_type=types.get("token_embd"))
    return model


def _hold_embedding_blocks(model, tensors: dict) -> dict[str, str]:
    """Keep the file's token-embedding (``token_embd``) and head (``output``) blocks in the modules'
    ``HELD_BLOCKS`` buffers, so a save and export writes them unchanged. Returns the types ``HFQuantConfig`` can
    state: ``{"output": the head's type (token_embd's when tied), "token_embd": untied embeddings' type}``."""
    tied = "output.weight" not in tensors
    pairs = [("token_embd", model.get_input_embeddings())]
    if not tied:
        pairs.append(("output", model.get_output_embeddings()))
    types = {}
    for gguf_name, module in pairs:
        t, weight = tensors.get(f"{gguf_name}.weight"), getattr(module, "weight", None)
        if t is None or weight is None:
            continue
        kind = t.tensor_type.name
        if kind in GGUF_TENSOR_TYPES:
            types["output" if tied else gguf_name] = kind
        if kind in BLOCK_TYPES:
            module.register_buffer(gguf_types.HELD_BLOCKS, torch.from_numpy(t.data.copy()).reshape(weight.shape[0], -1))
    return types
