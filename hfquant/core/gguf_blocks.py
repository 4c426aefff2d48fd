"""Bit-exact packing of llama.cpp GGUF quantized blocks (Q8_0, Q4_0, Q5_0, Q4_1, Q5_1, Q3_K, Q4_K, Q5_K, Q6_K).

A GGUF quantized row of ``cols`` weights is ``cols // block_values`` blocks stored back to back, each
``block_bytes`` long. Every multi-byte field is little-endian; ``d``, ``m`` and ``dmin`` are IEEE fp16.
Inside one block, ``q[i]`` is the code of the block's ``i``-th weight. ``_LAYOUT`` lists each type's fields in
file order (name, bytes):

* ``Q8_0`` (32 values, 34 bytes): ``d``, ``int8 qs[32]`` with ``qs[i] = q[i]``. Codes are *signed*
  (-128..127). ``y = q * d``.
* ``Q4_0`` (32 values, 18 bytes): ``d``, ``qs[16]`` with ``qs[j] = q[j] | q[j + 16] << 4`` (the first half
  of the block in the low nibbles, the second half in the high nibbles). ``y = (q - 8) * d``.
* ``Q5_0`` (32 values, 22 bytes): ``d``, ``uint32 qh`` whose bit ``j`` is bit 4 of ``q[j]``, then ``qs[16]``
  holding the low four bits of the codes as in ``Q4_0``. ``y = (q - 16) * d``.
* ``Q4_1`` (32 values, 20 bytes): ``d``, ``m``, ``qs[16]`` as in ``Q4_0``. ``y = q * d + m``.
* ``Q5_1`` (32 values, 24 bytes): ``d``, ``m``, ``qh``, ``qs[16]`` as in ``Q5_0``. ``y = q * d + m``.
* ``Q4_K`` (256 values in 8 sub-blocks of 32, 144 bytes): ``d``, ``dmin``, ``scales[12]``, ``qs[128]``.
  Sub-block ``j`` has 6-bit ``sc[j]`` and ``mn[j]``; ``scales`` packs them as::

      j < 4:  sc = scales[j] & 63                           mn = scales[j + 4] & 63
      j >= 4: sc = scales[j + 4] & 15 | scales[j - 4] >> 6 << 4
              mn = scales[j + 4] >> 4 | scales[j] >> 6 << 4

  ``qs`` covers the block in 64-value chunks ``c``: ``qs[32c + l] = q[64c + l] | q[64c + 32 + l] << 4``.
  ``y = (d * sc) * q - (dmin * mn)``.
* ``Q5_K`` (256 values in 8 sub-blocks of 32, 176 bytes): ``d``, ``dmin``, ``scales[12]`` as in ``Q4_K``,
  ``qh[32]``, ``qs[128]`` holding the low four bits as in ``Q4_K``; bit ``s`` of ``qh[l]`` is bit 4 of
  ``q[32s + l]``. ``y = (d * sc) * q - (dmin * mn)``, codes 0..31.
* ``Q3_K`` (256 values in 16 groups of 16, 110 bytes): ``hmask[32]``, ``qs[64]``, ``scales[12]``, ``d`` last.
  Bit ``s`` of ``hmask[l]`` is bit 2 of ``q[32s + l]``; the block is two halves ``h`` of 128 values with
  ``qs[32h + l] = sum over s in 0..3 of (q[128h + 32s + l] & 3) << 2s``. Group ``g`` has the signed 6-bit scale
  ``sc[g]`` (-32..31) stored as ``u = sc + 32``: the low nibble of ``u[g]`` is nibble ``g // 8`` of
  ``scales[g % 8]``, its top two bits are bits ``2 * (g // 4)`` of ``scales[8 + g % 4]``.
  ``y = (d * sc[g]) * (q - 4)``, codes 0..7.
* ``Q6_K`` (256 values in 16 groups of 16, 210 bytes): ``ql[128]``, ``qh[64]``, ``int8 scales[16]``, and
  ``d`` *last*. The block is two halves ``h`` of 128 values; with ``l`` in 0..63 and ``k`` in 0..31::

      ql[64h + l]  = (q[128h + l] & 15) | (q[128h + 64 + l] & 15) << 4
      qh[32h + k]  = sum over s in 0..3 of (q[128h + 32s + k] >> 4) << 2s

  ``y = (d * scales[g]) * (q - 32)`` for the weight's group ``g = i // 16``.

The codes are unsigned (0..maxq) for every type but ``Q8_0``. ``dequantize_rows`` and
``dequantize_codes`` use the same float32 operations in the same order as ggml's (and gguf-py's)
dequantization, so their results match it bit for bit. fp16 fields are read and written through
``Tensor.view``, which assumes a little-endian host (as gguf-py does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockType:
    """Geometry of one GGUF block type."""

    name: str
    ggml_type: int  # GGML type id
    block_values: int  # weights per stored block
    block_bytes: int  # bytes per stored block
    group_size: int  # weights sharing one scale
    bits: int  # code width
    maxq: int  # largest code; Q8_0 codes are signed (-128..127), the others run 0..maxq


BLOCK_TYPES: dict[str, BlockType] = {
    "Q8_0": BlockType("Q8_0", 8, 32, 34, 32, 8, 127),
    "Q4_0": BlockType("Q4_0", 2, 32, 18, 32, 4, 15),
    "Q5_0": BlockType("Q5_0", 6, 32, 22, 32, 5, 31),
    "Q4_1": BlockType("Q4_1", 3, 32, 20, 32, 4, 15),
    "Q5_1": BlockType("Q5_1", 7, 32, 24, 32, 5, 31),
    "Q3_K": BlockType("Q3_K", 11, 256, 110, 16, 3, 7),
    "Q4_K": BlockType("Q4_K", 12, 256, 144, 32, 4, 15),
    "Q5_K": BlockType("Q5_K", 13, 256, 176, 32, 5, 31),
    "Q6_K": BlockType("Q6_K", 14, 256, 210, 16, 6, 63),
}

_F16 = (1, torch.float16, None)
_K_SCALES = {"d": _F16, "dmin": _F16, "sc": (8, torch.uint8, (0, 63)), "mn": (8, torch.uint8, (0, 63))}
# Parameters of each type: name -> (entries per block, dtype, allowed range or None for fp16).
_PARAMS: dict[str, dict[str, tuple[int, torch.dtype, tuple[int, int] | None]]] = {
    "Q8_0": {"d": _F16},
    "Q4_0": {"d": _F16},
    "Q5_0": {"d": _F16},
    "Q4_1": {"d": _F16, "m": _F16},
    "Q5_1": {"d": _F16, "m": _F16},
    "Q3_K": {"d": _F16, "sc": (16, torch.int8, (-32, 31))},
    "Q4_K": _K_SCALES,
    "Q5_K": _K_SCALES,
    "Q6_K": {"d": _F16, "sc": (16, torch.int8, (-128, 127))},
}

# Each type's fields in file order: (name, bytes). "d", "m", "dmin" are fp16.
_LAYOUT: dict[str, list[tuple[str, int]]] = {
    "Q8_0": [("d", 2), ("qs", 32)],
    "Q4_0": [("d", 2), ("qs", 16)],
    "Q5_0": [("d", 2), ("qh", 4), ("qs", 16)],
    "Q4_1": [("d", 2), ("m", 2), ("qs", 16)],
    "Q5_1": [("d", 2), ("m", 2), ("qh", 4), ("qs", 16)],
    "Q3_K": [("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2)],
    "Q4_K": [("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128)],
    "Q5_K": [("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128)],
    "Q6_K": [("ql", 128), ("qh", 64), ("sc", 16), ("d", 2)],
}
_HALF = ("d", "m", "dmin")


def block_type(name: str) -> BlockType:
    bt = BLOCK_TYPES.get(name)
    if bt is None:
        raise ValueError(f"unknown GGUF block type {name!r}; expected one of {', '.join(BLOCK_TYPES)}")
    return bt


def _n_blocks(bt: BlockType, cols: int) -> int:
    if cols < 0 or cols % bt.block_values:
        raise ValueError(f"{bt.name}: cols must be a multiple of {bt.block_values}, got {cols}")
    return cols // bt.block_values


def _check_range(what: str, t: torch.Tensor, lo: int, hi: int) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer tensor, got {t.dtype}")
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise ValueError(f"{what} must lie in [{lo}, {hi}], got values in [{int(t.min())}, {int(t.max())}]")


def _check(bt: BlockType, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Validate codes and params; return codes as int32 [rows, blocks, block_values] and params per block."""
    if codes.dim() != 2:
        raise ValueError(f"{bt.name}: codes must be 2-D [rows, cols], got shape {tuple(codes.shape)}")
    rows, cols = codes.shape
    nb = _n_blocks(bt, cols)
    lo, hi = (-128, 127) if bt.name == "Q8_0" else (0, bt.maxq)
    _check_range(f"{bt.name} codes", codes, lo, hi)
    spec = _PARAMS[bt.name]
    if set(params) != set(spec):
        raise ValueError(f"{bt.name}: params must have keys {sorted(spec)}, got {sorted(params)}")
    out = {}
    for key, (per_block, dtype, bounds) in spec.items():
        p = params[key]
        if tuple(p.shape) != (rows, nb * per_block):
            raise ValueError(f"{bt.name}: params[{key!r}] must have shape {(rows, nb * per_block)}, got {tuple(p.shape)}")
        if bounds is None:
            if p.dtype != dtype:
                raise ValueError(f"{bt.name}: params[{key!r}] must be {dtype}, got {p.dtype}")
        else:
            _check_range(f"{bt.name} params[{key!r}]", p, *bounds)
            p = p.to(dtype)
        out[key] = p.reshape(rows, nb, per_block)
    return codes.to(torch.int32).reshape(rows, nb, bt.block_values), out


def _join(fields: torch.Tensor, width: int) -> torch.Tensor:
    """int32 ``[..., k, n]`` fields of ``width`` bits -> uint8 ``[..., n]``: field ``i`` at bits ``width * i``."""
    shifts = torch.arange(0, fields.shape[-2] * width, width, dtype=torch.int32, device=fields.device)
    return (fields << shifts.reshape(-1, 1)).sum(-2).to(torch.uint8)


def _split(b: torch.Tensor, k: int, width: int) -> torch.Tensor:
    """uint8 ``[..., n]`` -> int32 ``[..., k, n]``: the ``k`` fields of ``width`` bits (inverse of ``_join``)."""
    shifts = torch.arange(0, k * width, width, dtype=torch.int32, device=b.device).reshape(-1, 1)
    return b.int().unsqueeze(-2) >> shifts & ((1 << width) - 1)


def _encode(name: str, q: torch.Tensor, p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The code and sub-scale fields of ``name``'s blocks (uint8 ``[rows, blocks, bytes]``) from int32 codes
    ``[rows, blocks, block_values]`` and per-block params."""
    rows, nb, _ = q.shape
    low = q & 15
    if name == "Q8_0":
        return {"qs": q.to(torch.int8).view(torch.uint8)}
    if BLOCK_TYPES[name].block_values == 32:  # Q4_0, Q4_1, Q5_0, Q5_1
        out = {"qs": _join(low.reshape(rows, nb, 2, 16), 4)}
        if name in ("Q5_0", "Q5_1"):  # bit j of the uint32: byte j // 8, bit j % 8
            out["qh"] = _join((q >> 4).reshape(rows, nb, 4, 8).transpose(-1, -2), 1)
        return out
    if name in ("Q4_K", "Q5_K"):
        sc, mn = p["sc"].int(), p["mn"].int()
        scales = torch.cat([sc[..., :4] | (sc[..., 4:] >> 4) << 6, mn[..., :4] | (mn[..., 4:] >> 4) << 6,
                            (sc[..., 4:] & 15) | (mn[..., 4:] & 15) << 4], dim=-1).to(torch.uint8)
        out = {"scales": scales, "qs": _join(low.reshape(rows, nb, 4, 2, 32), 4).reshape(rows, nb, 128)}
        if name == "Q5_K":
            out["qh"] = _join((q >> 4).reshape(rows, nb, 8, 32), 1)
        return out
    if name == "Q3_K":
        u = p["sc"].int() + 32
        scales = torch.cat([_join((u & 15).reshape(rows, nb, 2, 8), 4), _join((u >> 4).reshape(rows, nb, 4, 4), 2)], -1)
        return {"hmask": _join((q >> 2 & 1).reshape(rows, nb, 8, 32), 1), "scales": scales,
                "qs": _join((q & 3).reshape(rows, nb, 2, 4, 32), 2).reshape(rows, nb, 64)}
    # Q6_K
    return {"ql": _join(low.reshape(rows, nb, 2, 2, 64), 4).reshape(rows, nb, 128),
            "qh": _join((q >> 4).reshape(rows, nb, 2, 4, 32), 2).reshape(rows, nb, 64),
            "sc": p["sc"].view(torch.uint8)}


def _decode(name: str, f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Inverse of ``_encode``: int32 codes ``[rows, blocks, block_values]`` and the sub-scale params per block."""
    rows, nb, _ = next(iter(f.values())).shape
    if name == "Q8_0":
        return f["qs"].view(torch.int8).int(), {}
    if BLOCK_TYPES[name].block_values == 32:
        q = _split(f["qs"], 2, 4).reshape(rows, nb, 32)
        if name in ("Q5_0", "Q5_1"):
            q = q | _split(f["qh"], 8, 1).transpose(-1, -2).reshape(rows, nb, 32) << 4
        return q, {}
    if name in ("Q4_K", "Q5_K"):
        s = f["scales"].int()
        s0, s1, s2 = s[..., :4], s[..., 4:8], s[..., 8:]
        sc = torch.cat([s0 & 63, (s2 & 15) | (s0 >> 6) << 4], dim=-1).to(torch.uint8)
        mn = torch.cat([s1 & 63, (s2 >> 4) | (s1 >> 6) << 4], dim=-1).to(torch.uint8)
        q = _split(f["qs"].reshape(rows, nb, 4, 32), 2, 4).reshape(rows, nb, 256)
        if name == "Q5_K":
            q = q | _split(f["qh"], 8, 1).reshape(rows, nb, 256) << 4
        return q, {"sc": sc, "mn": mn}
    if name == "Q3_K":
        s = f["scales"]
        u = _split(s[..., :8], 2, 4).reshape(rows, nb, 16) | _split(s[..., 8:], 4, 2).reshape(rows, nb, 16) << 4
        q = _split(f["qs"].reshape(rows, nb, 2, 32), 4, 2).reshape(rows, nb, 256)
        q = q | _split(f["hmask"], 8, 1).reshape(rows, nb, 256) << 2
        return q, {"sc": (u - 32).to(torch.int8)}
    # Q6_K
    low = _split(f["ql"].reshape(rows, nb, 2, 64), 2, 4).reshape(rows, nb, 256)
    high = _split(f["qh"].reshape(rows, nb, 2, 32), 4, 2).reshape(rows, nb, 256)
    return low | high << 4, {"sc": f["sc"].clone(memory_format=torch.contiguous_format).view(torch.int8)}


def pack_rows(name: str, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Pack codes [rows, cols] and their params into GGUF blocks: uint8 [rows, cols // block_values * block_bytes]."""
    bt = block_type(name)
    q, p = _check(bt, codes, params)
    rows, nb, _ = q.shape
    fields = _encode(name, q, p)
    for key in _HALF:
        if key in p:  # fp16 [rows, blocks, 1] -> its little-endian bytes
            fields[key] = p[key].contiguous().view(torch.uint8)
    return torch.cat([fields[key] for key, _ in _LAYOUT[name]], dim=-1).reshape(rows, nb * bt.block_bytes)


def unpack_rows(name: str, data: torch.Tensor, cols: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Inverse of ``pack_rows``: codes int32 [rows, cols] and params (fp16 d/m/dmin, uint8 or int8 sc/mn)."""
    bt = block_type(name)
    nb = _n_blocks(bt, cols)
    if data.dim() != 2 or data.dtype != torch.uint8 or data.shape[1] != nb * bt.block_bytes:
        raise ValueError(
            f"{name}: data must be uint8 [rows, {nb * bt.block_bytes}] for cols={cols}, "
            f"got {data.dtype} {tuple(data.shape)}"
        )
    rows = data.shape[0]
    b = data.reshape(rows, nb, bt.block_bytes)
    fields, at = {}, 0
    for key, size in _LAYOUT[name]:
        fields[key] = b[..., at:at + size]
        at += size
    q, params = _decode(name, fields)
    for key in _HALF:
        if key in fields:  # a copy, never a view of the packed data
            params[key] = fields[key].clone(memory_format=torch.contiguous_format).view(torch.float16).squeeze(-1)
    return q.reshape(rows, cols), {k: v.reshape(rows, -1) for k, v in params.items()}


def _dequantize(bt: BlockType, q: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 values from int32 codes [rows, blocks, block_values] and per-block params, in ggml's op order."""
    rows, nb, _ = q.shape
    d = p["d"].float()
    if bt.name == "Q8_0":
        y = q.float() * d
    elif bt.name == "Q4_0":
        y = d * (q - 8).float()
    elif bt.name == "Q5_0":
        y = d * (q - 16).float()
    elif bt.name in ("Q4_1", "Q5_1"):
        y = d * q.float() + p["m"].float()
    elif bt.name in ("Q4_K", "Q5_K"):
        d1 = (d * p["sc"].float()).unsqueeze(-1)
        m1 = (p["dmin"].float() * p["mn"].float()).unsqueeze(-1)
        y = d1 * q.reshape(rows, nb, 8, 32).float() - m1
    else:  # Q3_K, Q6_K: groups of 16, a constant zero
        d1 = (d * p["sc"].float()).unsqueeze(-1)
        y = d1 * (q - (4 if bt.name == "Q3_K" else 32)).reshape(rows, nb, 16, 16).float()
    return y.reshape(rows, nb * bt.block_values)


def dequantize_rows(name: str, data: torch.Tensor, cols: int) -> torch.Tensor:
    """Dequantize packed GGUF rows to float32 [rows, cols], bit-identical to ggml / ``gguf.quants.dequantize``."""
    bt = block_type(name)
    codes, params = unpack_rows(name, data, cols)
    return dequantize_codes(bt.name, codes, params)


def dequantize_codes(name: str, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 values ``dequantize_rows(pack_rows(name, codes, params))`` would give, without packing."""
    bt = block_type(name)
    return _dequantize(bt, *_check(bt, codes, params))
