"""A new weight format is one class: ``Row8`` below (8-bit symmetric codes with one float scale per output row) is
written here and nowhere else, registered for the test, and it quantizes (RTN and GPTQ), saves, reloads bit for bit,
and is refused by the export formats that cannot hold it, without touching any other file."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from helpers import small_calibration, tiny_tokenizer
from transformers import AutoModelForCausalLM

from hfquant import HFQuantConfig
from hfquant.core.errors import FormatError
from hfquant.core.int_grid import GroupGrids
from hfquant.core.weight_format import register_format, unregister_format, WeightFormat


@dataclass(frozen=True)
class Row8(WeightFormat):
    """int8 codes in [-127, 127] times one float32 scale per output row (absmax / 127)."""

    kind = "row8"
    fields = ("codes", "row_scale")
    keys = ("format",)

    @property
    def bits(self) -> int:
        return 8

    @property
    def group_size(self) -> int:
        return -1

    @classmethod
    def check_field(cls, key, value):
        return None if value == cls.kind else repr(cls.kind)

    @classmethod
    def from_fields(cls, fields, observer="minmax"):
        return cls() if fields.get("format") == cls.kind else None

    def to_dict(self, method):
        return {"bits": 8, "group_size": -1, "sym": True, "method": method, "format": self.kind}

    def stored_bits(self, in_features, out_features, scale_bits=32):
        return out_features * (in_features * 8 + 32)

    def rtn(self, w, scale_dtype=None):
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale

    def solver_grids(self, w, perm, static, hinv, scale_dtype, h_diag=None):
        return _RowGrids(w, self.rtn(w)[1])

    def dequantize(self, stored, cols):
        codes, scale = stored
        return codes.float() * scale[:, None]

    def empty(self, rows, cols, device):
        return torch.empty(rows, cols, dtype=torch.int8, device=device), torch.empty(rows, device=device)


class _RowGrids(GroupGrids):
    """One grid per row, fitted up front: every column is rounded on it."""

    def __init__(self, w, scale):
        super().__init__(w.shape[0], w.shape[1], w.shape[1], w.device, None)
        self.scale = scale

    def column_grid(self, j, block):
        def quantize(col):
            q = torch.round(col / self.scale).clamp(-127, 127)
            return q, q * self.scale
        return quantize

    def groups(self):
        return torch.zeros(self.cols, dtype=torch.long, device=self.device)

    def stored(self, codes, g_idx):
        return codes.to(torch.int8), self.scale


@pytest.fixture
def row8():
    register_format(Row8)
    yield Row8
    unregister_format(Row8)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_format_written_as_one_class_quantizes_saves_reloads_and_is_refused_by_exports(
        row8, method, tiny_models, tmp_path):
    from hfquant.formats.export import export_checkpoint
    from hfquant.nn.stored import QuantLinearStored

    extra = small_calibration(tokenizer=tiny_tokenizer()) if method == "gptq" else {}
    config = HFQuantConfig(method=method, overrides={"*": {"format": "row8"}}, **extra)
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    float_model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=config).eval()

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinearStored)}
    assert len(quantized) == 14 and all(m.format == Row8() for m in quantized.values())
    assert all(m.codes.dtype == torch.int8 and m.row_scale.shape == (m.out_features,) for m in quantized.values())
    out = _logits(model, ids)
    ref = _logits(float_model, ids)
    assert 0 < (out - ref).abs().max() < 0.05 * ref.abs().max()  # 8 bits: close to float, not equal
    assert all(r["method"] == method for r in model.hfquant_report["modules"])

    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["module_schemes"]
    assert set(saved) == set(quantized) and all(s["format"] == "row8" for s in saved.values())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert all(isinstance(again.get_submodule(n), QuantLinearStored) for n in quantized)
    assert torch.equal(_logits(again, ids), out)

    with pytest.raises(FormatError, match=r"holds row8 weights \(codes, row_scale\), which a gptq checkpoint cannot "
                                          r"store \(this weight format is written as \['hfquant'\]\); keep save_format hfquant"):
        export_checkpoint(tmp_path / "q", "gptq", tmp_path / "g")
    with pytest.raises(FormatError, match="compressed-tensors checkpoint cannot store"):
        export_checkpoint(tmp_path / "q", "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "g").exists() and not (tmp_path / "ct").exists()


def test_a_format_key_is_unknown_until_its_format_is_registered():
    from hfquant.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"overrides\['\*'\]\.format: unknown key"):
        HFQuantConfig(method="rtn", overrides={"*": {"format": "row8"}})
