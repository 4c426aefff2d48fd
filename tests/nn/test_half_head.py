"""A float32 output head held exactly in 16 bits (``HalfStoredLinear``, ``hfquant.kernels.half``): chosen only where
no value changes, computed in float32 to float32 accuracy on every CPU build, saved as the float model's tensor."""

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from hfquant.kernels import cpu_ext
from hfquant.kernels import half as half_kernels
from hfquant.nn.half import exact_half_dtype, HalfStoredLinear

from helpers import rel_err, use_build


def _linear(in_f: int, out_f: int, dtype: torch.dtype | None, bias: bool = False, seed: int = 0) -> torch.nn.Linear:
    """A float32 Linear whose values are exactly ``dtype``'s (``None``: plain float32 values)."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    if dtype is not None:
        lin.weight.data = lin.weight.data.to(dtype).float()
    return lin


def _reference(x: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    bias = None if lin.bias is None else lin.bias.detach().double()
    return F.linear(x.double(), lin.weight.detach().double(), bias).float()


def test_exact_half_dtype_takes_only_exact_values():
    w = torch.randn(64, 48)
    assert exact_half_dtype(w) is None  # float32 values
    assert exact_half_dtype(w.bfloat16().float()) is torch.bfloat16
    fp16 = w.half().float()
    assert exact_half_dtype(fp16) is torch.float16  # 10 mantissa bits: not bfloat16's 7
    big = torch.full((3, 4), 2.0 ** 20)  # exact in bfloat16, beyond float16's range
    assert exact_half_dtype(big) is torch.bfloat16
    nan = w.bfloat16().float()
    nan[5, 7] = float("nan")
    assert exact_half_dtype(nan) is None
    one_off = w.bfloat16().float()
    one_off[-1, -1] += 2.0 ** -20  # a single value with more bits, in the last chunk of rows
    assert exact_half_dtype(one_off.repeat(40, 1)) is None


@pytest.mark.parametrize("build", ["native", "avx2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_f,out_f,bias", [(576, 960, False), (100, 33, True), (4096, 70, False), (31, 5, True)])
def test_gemv_matches_float32(build, dtype, in_f, out_f, bias, monkeypatch):
    ext = use_build(build, monkeypatch)
    if not hasattr(ext, "half_gemv"):
        pytest.skip("this build has no 16-bit-weight GEMV")
    lin = _linear(in_f, out_f, dtype, bias)
    mod = HalfStoredLinear.from_linear(lin)
    assert mod.weight.dtype is dtype and torch.equal(mod.weight.float(), lin.weight)
    for rows in (1, 3, half_kernels.GEMV_MAX_ROWS):
        x = torch.randn(2, rows, in_f)[1]  # not the start of its storage
        y = half_kernels.half_cpu_gemv(x, mod)
        assert y.shape == (rows, out_f)
        assert rel_err(y, _reference(x, lin)) < 1e-6  # float32 sums in another order
    assert half_kernels.half_cpu_gemv(torch.randn(half_kernels.GEMV_MAX_ROWS + 1, in_f), mod) is None


@pytest.mark.parametrize("bias", [False, True])
def test_tiles_match_float32_across_tiles(bias, monkeypatch):
    monkeypatch.setattr(half_kernels, "TILE_BYTES", 64 * 4 * 96)  # 64-row tiles: 300 rows are five of them
    lin = _linear(96, 300, torch.bfloat16, bias)
    mod = HalfStoredLinear.from_linear(lin)
    x = torch.randn(2, 40, 96)
    y = half_kernels.half_cpu_tiles(x, mod)
    assert y.shape == (2, 40, 300)
    assert rel_err(y, _reference(x, lin)) < 1e-6


@pytest.mark.parametrize("path", ["auto", "gemv", "tiles", "big_tiles"])
def test_dispatch_float32_and_other_dtypes(path, monkeypatch):
    monkeypatch.setenv("HFQUANT_CPU_HALF", path)
    lin = _linear(128, 200, torch.float16, bias=True)
    mod = HalfStoredLinear.from_linear(lin)
    for rows in (1, 5, 40):  # 40 rows: the GEMV does not take them, forced or not
        x = torch.randn(rows, 128)
        assert rel_err(mod(x), _reference(x, lin)) < 1e-6
    xb = torch.randn(4, 128, dtype=torch.bfloat16)  # other activation dtypes: F.linear in that dtype
    assert mod(xb).dtype is torch.bfloat16
    assert rel_err(mod(xb).float(), _reference(xb.float(), lin)) < 2e-2
    with pytest.raises(ValueError, match="HFQUANT_CPU_HALF"):
        monkeypatch.setenv("HFQUANT_CPU_HALF", "fast")
        mod(torch.randn(2, 128))


def test_state_dict_is_the_float_tensor_and_loads_only_exact_values():
    lin = _linear(64, 32, torch.bfloat16, bias=True)
    mod = HalfStoredLinear.from_linear(lin)
    sd = mod.state_dict()
    assert sd["weight"].dtype is torch.float32 and torch.equal(sd["weight"], lin.weight)
    assert mod.weight.dtype is torch.bfloat16  # saving did not change the module
    other = _linear(64, 32, torch.bfloat16, bias=True, seed=1)
    mod.load_state_dict(other.state_dict())
    assert torch.equal(mod.weight.float(), other.weight) and torch.equal(mod.bias, other.bias)
    with pytest.raises(RuntimeError, match="not all exact in torch.bfloat16"):
        mod.load_state_dict(_linear(64, 32, None, bias=True).state_dict())
    assert torch.equal(mod.weight.float(), other.weight)  # unchanged by the refused load
    assert HalfStoredLinear.from_linear(_linear(64, 32, None)) is None
    assert HalfStoredLinear.from_linear(lin.to(torch.bfloat16)) is None  # only float32 models
    mod.to(torch.bfloat16)  # a model cast to bf16: a bf16 Linear, saved in bf16
    assert mod.float_dtype is torch.bfloat16 and mod.state_dict()["weight"].dtype is torch.bfloat16
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(mod(x), F.linear(x, mod.weight, mod.bias))
    mod.float()  # and back to float32: the weight too, as an nn.Linear's
    assert mod.weight.dtype is torch.float32 and torch.equal(mod.weight, other.weight)
    assert mod.state_dict()["weight"].dtype is torch.float32


def test_compiled_graph_calls_the_gemv():
    if cpu_ext.extension() is None or not half_kernels.cpu_gemv_available():
        pytest.skip("hfquant's CPU extension is not available here")
    torch._dynamo.reset()
    mod = HalfStoredLinear.from_linear(_linear(96, 300, torch.bfloat16, bias=True)).eval()
    compiled = torch.compile(mod, fullgraph=True)
    with torch.no_grad():
        for rows in (1, 40):
            x = torch.randn(1, rows, 96)
            assert torch.equal(compiled(x), mod(x)), rows
    ops = getattr(torch.ops, cpu_ext.extension().__name__)
    assert ops.half_gemv(torch.randn(2, 3, 96, device="meta"), torch.empty(300, 96, dtype=torch.int16, device="meta"),
                         None, True).shape == (2, 3, 300)


def _tiny_model(folder, tied: bool, values: torch.dtype | None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config)
    if values is not None:
        model = model.to(values).float()  # a float32 model as loaded from a 16-bit checkpoint
    model.save_pretrained(folder)
    return model


def _quantized(folder):
    from transformers import AutoModelForCausalLM

    from hfquant import HFQuantConfig

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                quantization_config=HFQuantConfig(method="rtn", group_size=32))


def test_quantized_model_stores_an_exact_head_in_16_bits_and_saves_it_as_float32(tmp_path, monkeypatch):
    if not half_kernels.cpu_gemv_available():
        pytest.skip("hfquant's CPU extension is not available here")
    from transformers import AutoModelForCausalLM

    float_model = _tiny_model(tmp_path / "fp", tied=False, values=torch.bfloat16)
    model = _quantized(tmp_path / "fp")
    assert isinstance(model.lm_head, HalfStoredLinear) and model.lm_head.weight.dtype is torch.bfloat16
    assert torch.equal(model.lm_head.weight.float(), float_model.lm_head.weight)
    monkeypatch.setenv("HFQUANT_HEAD_16BIT", "0")
    kept = _quantized(tmp_path / "fp")
    assert type(kept.lm_head) is torch.nn.Linear
    monkeypatch.delenv("HFQUANT_HEAD_16BIT")
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        logits, kept_logits = model(ids).logits, kept(ids).logits
    assert rel_err(logits, kept_logits) < 1e-5
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                       kept.generate(ids, max_new_tokens=8, do_sample=False))
    model.save_pretrained(tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        saved = f.get_tensor("lm_head.weight")
    assert saved.dtype is torch.float32 and torch.equal(saved, float_model.lm_head.weight)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(reloaded.lm_head, HalfStoredLinear)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


@pytest.mark.parametrize("tied,values", [(True, torch.bfloat16), (False, None)])
def test_tied_or_inexact_heads_stay_float32(tmp_path, tied, values):
    _tiny_model(tmp_path / "fp", tied=tied, values=values)
    model = _quantized(tmp_path / "fp")
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype is torch.float32
    if tied:
        assert model.lm_head.weight is model.get_input_embeddings().weight


def test_without_the_kernel_the_head_stays_float32(tmp_path, monkeypatch):
    """No extension (no compiler, a CPU without AVX2, ``HFQUANT_CPU_EXTENSION=0``): the float32 head is kept, since
    converting the whole weight per decode call would be slower than float32."""
    monkeypatch.setitem(cpu_ext._STATE, "ext", None)
    assert not half_kernels.cpu_gemv_available()
    _tiny_model(tmp_path / "fp", tied=False, values=torch.bfloat16)
    model = _quantized(tmp_path / "fp")
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype is torch.float32
