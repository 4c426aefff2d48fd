"""Bit packing of integer weight codes: the on-disk layout of ``QuantLinearWeightOnly``.

Layout (the one place it is written down; ``docs`` and the README refer here)
-----------------------------------------------------------------------------
For a Linear with ``out`` output and ``in`` input features quantized to ``b`` bits
(``b`` in 2, 3, 4, 8), codes ``q[o, i]`` are unsigned integers in ``[0, 2**b - 1]``.

* Each output row is cut into chunks of 32 consecutive input columns (the last chunk is zero-padded).
* A chunk's 32 codes form one little-endian bit stream of ``32 * b`` bits: code ``k`` of the chunk
  occupies stream bits ``[k*b, k*b + b)``, least significant bit first.
* The stream is stored as ``b`` int32 words: word ``w`` holds stream bits ``[32w, 32w + 32)``, stream
  bit ``32w + u`` at bit ``u`` of the word.

So the packed tensor is int32 of shape ``[out, ceil(in / 32), b]``. For ``b`` = 2, 4, 8 every word holds
``32 / b`` whole codes, LSB first, which is exactly the GPTQ ``qweight`` order along the input
dimension (``qweight[chunk * b + w, o] == packed[o, chunk, w]``); for ``b`` = 3 it is GPTQ's 3-bit
stream (10 codes and a split code per word).

The tensor is 3-D on purpose: it is saved under the name ``weight``, and a transformers process that
has not imported hfquant would try to load it into ``nn.Linear.weight`` (2-D), hit a size mismatch and
raise, instead of silently random-initialising the layer.
"""

from __future__ import annotations

import sys

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
_LITTLE_ENDIAN = sys.byteorder == "little"
CHUNK = 32


def packed_shape(out_features: int, in_features: int, bits: int) -> tuple[int, int, int]:
    """Shape of the packed tensor for a ``[out, in]`` weight at ``bits``."""
    return (out_features, (in_features + CHUNK - 1) // CHUNK, bits)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[out, in]`` (values in ``[0, 2**bits)``) into int32 ``[out, ceil(in/32), bits]``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if CHUNK % bits == 0 and _LITTLE_ENDIAN:
        return _pack_bytes(codes, bits)
    return _pack_stream(codes, bits)


def _pack_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``pack_codes`` for 2, 4 and 8 bits on a little-endian machine: the stream's bytes are the words' bytes in
    memory order, and each byte holds ``8 / bits`` whole codes, LSB first (one uint8 temporary per code, where
    the bit stream takes 32 int64s: an 8-bit 49152 x 576 head packs in about 60 MB instead of several GB)."""
    out, n = codes.shape
    chunks = (n + CHUNK - 1) // CHUNK
    per = 8 // bits
    c = torch.zeros(out, chunks * CHUNK, dtype=torch.uint8, device=codes.device)
    c[:, :n] = (codes & (2**bits - 1)).to(torch.uint8)
    c = c.view(out, chunks * CHUNK // per, per)
    packed = c[..., 0].clone()
    for j in range(1, per):
        packed |= c[..., j] << (bits * j)
    return packed.view(torch.int32).reshape(out, chunks, bits)


def _pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``pack_codes`` for any width: the bit stream of each chunk, summed into its words."""
    out, n = codes.shape
    chunks = (n + CHUNK - 1) // CHUNK
    c = torch.zeros(out, chunks * CHUNK, dtype=torch.int32, device=codes.device)
    c[:, :n] = codes.to(torch.int32)
    c = c.reshape(out, chunks, CHUNK)
    bit_idx = torch.arange(bits, dtype=torch.int32, device=codes.device)
    stream = ((c[..., None] >> bit_idx) & 1).reshape(out, chunks, bits, CHUNK)
    weights = torch.bitwise_left_shift(torch.ones(CHUNK, dtype=torch.int64, device=codes.device), torch.arange(CHUNK, device=codes.device))
    words = (stream.to(torch.int64) * weights).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: int32 ``[out, chunks, bits]`` to int32 codes ``[out, in_features]``."""
    out, chunks, b = packed.shape
    if b != bits:
        raise ValueError(f"packed tensor has {b} words per chunk but bits={bits}")
    if CHUNK % bits == 0:
        # Whole codes per byte of the little-endian words: work on bytes (fast path for 2, 4 and 8 bits).
        as_bytes = packed.contiguous().view(torch.uint8).reshape(out, chunks * b * 4, 1)
        if not _LITTLE_ENDIAN:
            as_bytes = packed.contiguous().view(torch.uint8).reshape(out, chunks * b, 4).flip(-1).reshape(out, -1, 1)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        values = (as_bytes >> shifts) & (2**bits - 1)
        return values.reshape(out, chunks * CHUNK)[:, :in_features].to(torch.int32)
    shifts = torch.arange(CHUNK, dtype=torch.int32, device=packed.device)
    stream = (packed[..., None] >> shifts) & 1  # arithmetic shift; the & 1 makes the sign bit harmless
    stream = stream.reshape(out, chunks, CHUNK, bits)
    values = (stream << torch.arange(bits, dtype=torch.int32, device=packed.device)).sum(-1, dtype=torch.int32)
    return values.reshape(out, chunks * CHUNK)[:, :in_features].contiguous()
