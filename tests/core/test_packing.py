import pytest
import torch

from hfquant.core.packing import pack_codes, packed_shape, unpack_codes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 31, 32, 33, 64, 100, 576])
def test_pack_unpack_identity(bits, cols):
    gen = torch.Generator().manual_seed(bits * 1000 + cols)
    codes = torch.randint(0, 2**bits, (5, cols), generator=gen, dtype=torch.int32)
    packed = pack_codes(codes, bits)
    assert packed.shape == packed_shape(5, cols, bits)
    assert packed.dtype == torch.int32
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


def test_4bit_order_is_lsb_first_along_input():
    # codes 0..15 then 15..0 in one chunk of 32: word 0 holds codes 0..7, code k at bits 4k..4k+3.
    codes = torch.tensor([list(range(16)) + list(range(15, -1, -1))], dtype=torch.int32)
    packed = pack_codes(codes, 4)
    expected0 = sum(k << (4 * k) for k in range(8))
    assert packed[0, 0, 0].item() == expected0
    word3 = sum((7 - k) << (4 * k) for k in range(8))  # codes 7..0 for inputs 24..31
    assert packed[0, 0, 3].item() == word3 - (1 << 32 if word3 >= 1 << 31 else 0)


def test_3bit_is_a_continuous_stream():
    # Code 10 straddles words 0 and 1: its low 2 bits at bits 30..31 of word 0, its high bit at bit 0 of word 1.
    codes = torch.zeros(1, 32, dtype=torch.int32)
    codes[0, 10] = 0b101
    packed = pack_codes(codes, 3)
    assert packed[0, 0, 0].item() == (0b01 << 30)
    assert packed[0, 0, 1].item() == 0b1


def test_sign_bit_words_roundtrip():
    codes = torch.full((2, 32), 15, dtype=torch.int32)
    packed = pack_codes(codes, 4)
    assert (packed == -1).all()  # 0xFFFFFFFF as int32
    assert torch.equal(unpack_codes(packed, 4, 32), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("cols", [1, 31, 32, 100, 576])
def test_byte_packing_equals_the_bit_stream(bits, cols):
    """The byte-wise packer (2/4/8 bits, little-endian) writes exactly the words of the general bit stream."""
    from hfquant.core.packing import _pack_bytes, _pack_stream

    codes = torch.randint(0, 2**bits, (7, cols), generator=torch.Generator().manual_seed(cols))
    assert torch.equal(_pack_bytes(codes, bits), _pack_stream(codes, bits))
