"""Bit-exact packing of llama.cpp GGUF quantized blocks (Q8_0, Q4_0, Q5_0, Q4_1, Q4_K, Q6_K).

A GGUF quantized row of ``cols`` weights is ``cols // block_values`` blocks stored back to back, each
``block_bytes`` long. Every multi-byte field is little-endian; ``d``, ``m`` and ``dmin`` are IEEE fp16.
Inside one block, ``q[i]`` is the code of the block's ``i``-th weight:

* ``Q8_0`` (32 values, 34 bytes): ``d``, ``int8 qs[32]`` with ``qs[i] = q[i]``. Codes are *signed*
  (-128..127). ``y = q * d``.
* ``Q4_0`` (32 values, 18 bytes): ``d``, ``qs[16]`` with ``qs[j] = q[j] | q[j + 16] << 4`` (the first half
  of the block in the low nibbles, the second half in the high nibbles). ``y = (q - 8) * d``.
* ``Q5_0`` (32 values, 22 bytes): ``d``, ``uint32 qh`` whose bit ``j`` is bit 4 of ``q[j]``, then ``qs[16]``
  holding the low four bits of the codes as in ``Q4_0``. ``y = (q - 16) * d``.
* ``Q4_1`` (32 values, 20 bytes): ``d``, ``m``, ``qs[16]`` as in ``Q4_0``. ``y = q * d + m``.
* ``Q4_K`` (256 values in 8 sub-blocks of 32, 144 bytes): ``d``, ``dmin``, ``scales[12]``, ``qs[128]``.
  Sub-block ``j`` has 6-bit ``sc[j]`` and ``mn[j]``; ``scales`` packs them as::

      j < 4:  sc = scales[j] & 63                           mn = scales[j + 4] & 63
      j >= 4: sc = scales[j + 4] & 15 | scales[j - 4] >> 6 << 4
              mn = scales[j + 4] >> 4 | scales[j] >> 6 << 4

  i.e. bytes 0..3 hold ``sc[0..3]`` plus the top two bits of ``sc[4..7]``, bytes 4..7 hold ``mn[0..3]``
  plus the top two bits of ``mn[4..7]``, bytes 8..11 the low nibbles of ``sc[4..7]`` (low) and
  ``mn[4..7]`` (high). ``qs`` covers the block in 64-value chunks ``c``:
  ``qs[32c + l] = q[64c + l] | q[64c + 32 + l] << 4``. ``y = (d * sc) * q - (dmin * mn)``.
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
    "Q4_K": BlockType("Q4_K", 12, 256, 144, 32, 4, 15),
    "Q6_K": BlockType("Q6_K", 14, 256, 210, 16, 6, 63),
}

# Parameters of each type: name -> (entries per block, dtype, allowed range or None for fp16).
_PARAMS: dict[str, dict[str, tuple[int, torch.dtype, tuple[int, int] | None]]] = {
    "Q8_0": {"d": (1, torch.float16, None)},
    "Q4_0": {"d": (1, torch.float16, None)},
    "Q5_0": {"d": (1, torch.float16, None)},
    "Q4_1": {"d": (1, torch.float16, None), "m": (1, torch.float16, None)},
    "Q4_K": {
        "d": (1, torch.float16, None),
        "dmin": (1, torch.float16, None),
        "sc": (8, torch.uint8, (0, 63)),
        "mn": (8, torch.uint8, (0, 63)),
    },
    "Q6_K": {"d": (1, torch.float16, None), "sc": (16, torch.int8, (-128, 127))},
}


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


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """fp16 [rows, blocks, 1] -> its little-endian bytes, uint8 [rows, blocks, 2]."""
    return x.contiguous().view(torch.uint8)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, blocks, 2] -> fp16 [rows, blocks] (a copy, never a view of the packed data)."""
    return b.clone(memory_format=torch.contiguous_format).view(torch.float16).squeeze(-1)


def _nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return (lo | hi << 4).to(torch.uint8)


def pack_rows(name: str, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Pack codes [rows, cols] and their params into GGUF blocks: uint8 [rows, cols // block_values * block_bytes]."""
    bt = block_type(name)
    q, p = _check(bt, codes, params)
    rows, nb, _ = q.shape
    d = _f16_bytes(p["d"])
    if name == "Q8_0":
        parts = [d, q.to(torch.int8).view(torch.uint8)]
    elif name in ("Q4_0", "Q4_1"):
        qs = _nibbles(q[..., :16], q[..., 16:])
        parts = [d, qs] if name == "Q4_0" else [d, _f16_bytes(p["m"]), qs]
    elif name == "Q5_0":
        weights = 1 << torch.arange(8, dtype=torch.int32, device=q.device)
        qh = ((q >> 4 & 1).reshape(rows, nb, 4, 8) * weights).sum(-1).to(torch.uint8)
        low = q & 15
        parts = [d, qh, _nibbles(low[..., :16], low[..., 16:])]
    elif name == "Q4_K":
        sc, mn = p["sc"].to(torch.int32), p["mn"].to(torch.int32)
        scales = torch.cat(
            [
                sc[..., :4] | (sc[..., 4:] >> 4) << 6,
                mn[..., :4] | (mn[..., 4:] >> 4) << 6,
                (sc[..., 4:] & 15) | (mn[..., 4:] & 15) << 4,
            ],
            dim=-1,
        ).to(torch.uint8)
        q4 = q.reshape(rows, nb, 4, 2, 32)
        qs = _nibbles(q4[..., 0, :], q4[..., 1, :]).reshape(rows, nb, 128)
        parts = [d, _f16_bytes(p["dmin"]), scales, qs]
    else:  # Q6_K
        low = (q & 15).reshape(rows, nb, 2, 2, 64)
        ql = _nibbles(low[..., 0, :], low[..., 1, :]).reshape(rows, nb, 128)
        shifts = torch.arange(0, 8, 2, dtype=torch.int32, device=q.device).reshape(4, 1)
        qh = ((q >> 4).reshape(rows, nb, 2, 4, 32) << shifts).sum(-2).to(torch.uint8).reshape(rows, nb, 64)
        parts = [ql, qh, p["sc"].view(torch.uint8), d]
    return torch.cat(parts, dim=-1).reshape(rows, nb * bt.block_bytes)


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
    if name == "Q6_K":
        ql = b[..., :128].int().reshape(rows, nb, 2, 64)
        qh = b[..., 128:192].int().reshape(rows, nb, 2, 1, 32)
        shifts = torch.arange(0, 8, 2, dtype=torch.int32, device=data.device).reshape(4, 1)
        low = torch.stack([ql & 15, ql >> 4], dim=-2).reshape(rows, nb, 2, 128)
        high = (qh >> shifts & 3).reshape(rows, nb, 2, 128)
        q = low | high << 4
        params = {"d": _f16(b[..., 208:]), "sc": b[..., 192:208].clone(memory_format=torch.contiguous_format).view(torch.int8)}
        params["sc"] = params["sc"].reshape(rows, nb * 16)
        return q.reshape(rows, cols), params

    params = {"d": _f16(b[..., :2])}
    if name == "Q8_0":
        q = b[..., 2:].view(torch.int8).int()
    elif name == "Q4_K":
        params["dmin"] = _f16(b[..., 2:4])
        s = b[..., 4:16].int()
        s0, s1, s2 = s[..., :4], s[..., 4:8], s[..., 8:]
        params["sc"] = torch.cat([s0 & 63, (s2 & 15) | (s0 >> 6) << 4], dim=-1).to(torch.uint8).reshape(rows, nb * 8)
        params["mn"] = torch.cat([s1 & 63, (s2 >> 4) | (s1 >> 6) << 4], dim=-1).to(torch.uint8).reshape(rows, nb * 8)
        qs = b[..., 16:].int().reshape(rows, nb, 4, 1, 32)
        q = torch.cat([qs & 15, qs >> 4], dim=-2)
    else:  # Q4_0, Q4_1, Q5_0: qs is the last 16 bytes
        if name == "Q4_1":
            params["m"] = _f16(b[..., 2:4])
        qs = b[..., bt.block_bytes - 16 :].int()
        q = torch.cat([qs & 15, qs >> 4], dim=-1)
        if name == "Q5_0":
            bit = torch.arange(8, dtype=torch.int32, device=data.device)
            q = q | (b[..., 2:6].int().unsqueeze(-1) >> bit & 1).reshape(rows, nb, 32) << 4
    return q.reshape(rows, cols), params


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
    elif bt.name == "Q4_1":
        y = d * q.float() + p["m"].float()
    elif bt.name == "Q4_K":
        d1 = (d * p["sc"].float()).unsqueeze(-1)
        m1 = (p["dmin"].float() * p["mn"].float()).unsqueeze(-1)
        y = d1 * q.reshape(rows, nb, 8, 32).float() - m1
    else:  # Q6_K
        d1 = (d * p["sc"].float()).unsqueeze(-1)
        y = d1 * (q - 32).reshape(rows, nb, 16, 16).float()
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
