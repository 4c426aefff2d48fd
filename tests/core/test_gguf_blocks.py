import time

import numpy as np
import pytest
import torch

from hfquant.core.gguf_blocks import BLOCK_TYPES, dequantize_codes, dequantize_rows, pack_rows, unpack_rows

ALL = list(BLOCK_TYPES)
QUANTIZABLE = ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1"]  # the types gguf-py can quantize
# byte offsets of the fp16 fields inside one block
FP16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q5_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q3_K": [108], "Q4_K": [0, 2],
               "Q5_K": [0, 2], "Q6_K": [208]}


@pytest.fixture
def gguf():
    return pytest.importorskip("gguf")


def _qtype(gguf, name):
    return getattr(gguf.GGMLQuantizationType, name)


def _random_blocks(name, rows, n_blocks, seed):
    """Random bytes for rows of GGUF blocks, with every fp16 field a random finite fp16 (subnormals included)."""
    bt = BLOCK_TYPES[name]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, n_blocks, bt.block_bytes), dtype=np.uint8)
    for off in FP16_FIELDS[name]:
        bits = rng.integers(0, 1 << 16, size=(rows, n_blocks), dtype=np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF  # inf/nan exponent -> finite
        moderate = (rng.standard_normal((rows, n_blocks)) * 0.05).astype(np.float16).view(np.uint16)
        bits = np.where(rng.random((rows, n_blocks)) < 0.5, moderate, bits)
        data[:, :, off : off + 2] = bits.view(np.uint8).reshape(rows, n_blocks, 2)
    return data.reshape(rows, n_blocks * bt.block_bytes)


def _random_codes_params(name, rows, cols, seed):
    bt = BLOCK_TYPES[name]
    g = torch.Generator().manual_seed(seed)
    lo = -128 if name == "Q8_0" else 0
    codes = torch.randint(lo, bt.maxq + 1, (rows, cols), generator=g, dtype=torch.int32)
    nb = cols // bt.block_values
    params = {"d": torch.randn(rows, nb, generator=g).half()}
    if name in ("Q4_1", "Q5_1"):
        params["m"] = torch.randn(rows, nb, generator=g).half()
    if name in ("Q4_K", "Q5_K"):
        params["dmin"] = torch.randn(rows, nb, generator=g).half()
        params["sc"] = torch.randint(0, 64, (rows, nb * 8), generator=g, dtype=torch.uint8)
        params["mn"] = torch.randint(0, 64, (rows, nb * 8), generator=g, dtype=torch.uint8)
    if name == "Q6_K":
        params["sc"] = torch.randint(-128, 128, (rows, nb * 16), generator=g, dtype=torch.int8)
    if name == "Q3_K":
        params["sc"] = torch.randint(-32, 32, (rows, nb * 16), generator=g, dtype=torch.int8)
    return codes, params


def test_block_types_match_gguf(gguf):
    for name, bt in BLOCK_TYPES.items():
        qt = _qtype(gguf, name)
        assert bt.ggml_type == int(qt)
        assert (bt.block_values, bt.block_bytes) == gguf.GGML_QUANT_SIZES[qt]
        assert bt.maxq == (127 if name == "Q8_0" else 2**bt.bits - 1)


@pytest.mark.parametrize("name", QUANTIZABLE)
@pytest.mark.parametrize("cols", [64, 160, 576])
def test_gguf_quantized_roundtrip_and_dequantize(gguf, name, cols):
    rng = np.random.default_rng(cols)
    x = (rng.standard_normal((6, cols)) * rng.uniform(0.01, 3, size=(6, 1))).astype(np.float32)
    x[1] = 0.0
    x[2] = 0.37
    x[3, ::7] *= 40  # outliers
    data = gguf.quants.quantize(x, _qtype(gguf, name))
    ref = gguf.quants.dequantize(data, _qtype(gguf, name))

    t = torch.from_numpy(data)
    codes, params = unpack_rows(name, t, cols)
    assert codes.dtype == torch.int32 and codes.shape == (6, cols)
    assert torch.equal(pack_rows(name, codes, params), t)
    assert np.array_equal(dequantize_rows(name, t, cols).numpy(), ref)
    assert np.array_equal(dequantize_codes(name, codes, params).numpy(), ref)


@pytest.mark.parametrize("name", ALL)
def test_random_blocks_roundtrip_and_dequantize(gguf, name):
    bt = BLOCK_TYPES[name]
    n_blocks = 3 if bt.block_values == 256 else 9
    data = _random_blocks(name, 5, n_blocks, seed=bt.ggml_type)
    cols = n_blocks * bt.block_values
    ref = gguf.quants.dequantize(data, _qtype(gguf, name))

    t = torch.from_numpy(data)
    codes, params = unpack_rows(name, t, cols)
    assert torch.equal(pack_rows(name, codes, params), t)
    out = dequantize_rows(name, t, cols)
    assert out.dtype == torch.float32 and out.shape == (5, cols)
    assert np.array_equal(out.numpy(), ref)
    assert torch.equal(dequantize_codes(name, codes, params), out)


@pytest.mark.parametrize("name", ALL)
def test_pack_then_unpack_returns_codes_and_params(name):
    bt = BLOCK_TYPES[name]
    cols = 2 * bt.block_values
    codes, params = _random_codes_params(name, 4, cols, seed=bt.ggml_type)
    data = pack_rows(name, codes, params)
    assert data.dtype == torch.uint8 and data.shape == (4, 2 * bt.block_bytes)
    codes2, params2 = unpack_rows(name, data, cols)
    assert torch.equal(codes2, codes)
    assert params2.keys() == params.keys()
    for k in params:
        assert params2[k].dtype == params[k].dtype, k
        assert torch.equal(params2[k].view(torch.uint8) if k in ("d", "m", "dmin") else params2[k],
                           params[k].view(torch.uint8) if k in ("d", "m", "dmin") else params[k]), k
    assert torch.equal(dequantize_codes(name, codes, params), dequantize_rows(name, data, cols))


def test_known_layouts_by_hand():
    # Q4_0: first half of the block in the low nibbles, second half in the high nibbles.
    codes = torch.tensor([list(range(16)) + list(range(15, -1, -1))])
    data = pack_rows("Q4_0", codes, {"d": torch.ones(1, 1).half()})
    assert data[0, :2].tolist() == [0x00, 0x3C]  # fp16 1.0, little-endian
    assert data[0, 2:].tolist() == [k | (15 - k) << 4 for k in range(16)]
    # Q5_0: bit 4 of code j is bit j of the little-endian uint32 after d.
    codes = torch.zeros(1, 32, dtype=torch.int32)
    codes[0, [0, 9, 31]] = 16
    data = pack_rows("Q5_0", codes, {"d": torch.ones(1, 1).half()})
    assert int.from_bytes(bytes(data[0, 2:6].tolist()), "little") == (1 << 0) | (1 << 9) | (1 << 31)
    assert data[0, 6:].tolist() == [0] * 16
    # Q6_K: d is the last field.
    codes, params = _random_codes_params("Q6_K", 1, 256, seed=0)
    params["d"] = torch.tensor([[2.0]]).half()
    assert pack_rows("Q6_K", codes, params)[0, -2:].tolist() == [0x00, 0x40]


def test_pack_is_fast():
    for name in ALL:
        codes, params = _random_codes_params(name, 576, 1536, seed=1)
        start = time.perf_counter()
        data = pack_rows(name, codes, params)
        unpack_rows(name, data, 1536)
        assert time.perf_counter() - start < 2.0, name


def test_bad_cols():
    codes, params = _random_codes_params("Q4_K", 2, 256, seed=0)
    with pytest.raises(ValueError, match="multiple of 256") as e:
        pack_rows("Q4_K", torch.zeros(2, 288, dtype=torch.int32), params)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="multiple of 32"):
        unpack_rows("Q8_0", torch.zeros(2, 34, dtype=torch.uint8), 48)
    with pytest.raises(ValueError, match="multiple of 32"):
        dequantize_rows("Q4_0", torch.zeros(2, 18, dtype=torch.uint8), 16)
    with pytest.raises(ValueError, match=r"uint8 \[rows, 36\]"):
        unpack_rows("Q4_0", torch.zeros(2, 18, dtype=torch.uint8), 64)


def test_unknown_type():
    with pytest.raises(ValueError, match="Q2_K") as e:
        pack_rows("Q2_K", torch.zeros(1, 256, dtype=torch.int32), {})
    for name in ALL:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="Q8_0, Q4_0"):
        unpack_rows("q8_0", torch.zeros(1, 34, dtype=torch.uint8), 32)


@pytest.mark.parametrize(
    "name, bad",
    [("Q8_0", 128), ("Q8_0", -129), ("Q4_0", 16), ("Q4_0", -1), ("Q5_0", 32), ("Q4_1", 16), ("Q5_1", 32), ("Q3_K", 8),
     ("Q4_K", 16), ("Q5_K", 32), ("Q6_K", 64)],
)
def test_codes_out_of_range(name, bad):
    bt = BLOCK_TYPES[name]
    codes, params = _random_codes_params(name, 2, bt.block_values, seed=0)
    codes[1, 3] = bad
    with pytest.raises(ValueError, match=r"codes must lie in \[") as e:
        pack_rows(name, codes, params)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="codes must lie"):
        dequantize_codes(name, codes, params)


def test_bad_params():
    codes, params = _random_codes_params("Q4_K", 2, 256, seed=0)
    with pytest.raises(ValueError, match=r"params\['sc'\] must lie in \[0, 63\]"):
        pack_rows("Q4_K", codes, {**params, "sc": params["sc"] | 64})
    with pytest.raises(ValueError, match="float16"):
        pack_rows("Q4_K", codes, {**params, "d": params["d"].float()})
    with pytest.raises(ValueError, match="keys"):
        pack_rows("Q4_K", codes, {k: v for k, v in params.items() if k != "mn"})
    with pytest.raises(ValueError, match="shape"):
        pack_rows("Q4_K", codes, {**params, "sc": params["sc"][:, :4]})
    with pytest.raises(ValueError, match="integer"):
        pack_rows("Q4_K", codes.float(), params)
