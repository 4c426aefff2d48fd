"""GPTQ and compressed-tensors exports of Mixture-of-Experts checkpoints.

hfquant stores quantized experts fused (``<experts>.gate_up_proj.weight`` ``[experts, out, ...]``); the exports write
one Linear per expert and projection under the names of the family's own checkpoints, which is what transformers'
float ``save_pretrained`` writes (the float folder ``save_moe_model`` saved is the oracle for the names) and what
vLLM's MoE loaders read. Checked by reading back:

* GPTQ: every tensor decodes (``gptq_to_packed``) to exactly the hfquant model's codes, zero points and ``g_idx``,
  scales to their float16 values; the hfquant model holding the decoded tensors (a test-side import: hfquant's GPTQ
  import does not build fused experts from per-expert names) gives bit-identical logits to the hfquant model with
  float16-rounded scales, and within 1e-3 x max |logit| of the hfquant model itself.
* compressed-tensors: transformers alone (no hfquant imported) loads the export, dequantizing the experts, with
  max |logit diff| <= 1e-5 against the hfquant model; each expert's tensors decompress with the library to exactly
  hfquant's dequantized rows.

deepseek_v3 is quantized with groups of 8 (its tiny MLA has a 24-wide input that compressed-tensors groups must
divide); the other families with groups of 16.
"""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import small_calibration
from moe_helpers import save_moe_model
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from hfquant import HFQuantConfig, quantize_
from hfquant.core.errors import FormatError
from hfquant.formats import export_checkpoint
from hfquant.formats.gptq import gptq_to_packed
from hfquant.kernels import reference_kernels
from hfquant.nn.experts import QuantExperts, StackedExperts
from hfquant.nn.weight_only import QuantLinearWeightOnly

FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3")
CAL = small_calibration(num_samples=8, seq_len=32)
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx")
# The test's own statement of the families' checkpoint names (the export derives them from transformers):
# (the MoE block's name, each fused projection -> its per-expert Linears, in row order).
HUB_NAMES = {"mixtral": ("block_sparse_moe", {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)})}
DEFAULT_NAMES = ("mlp", {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)})


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """``moe(family)``: (float folder, hfquant folder, quantized model), built once per family."""
    root, cache = tmp_path_factory.mktemp("moe-export"), {}

    def get(family):
        if family not in cache:
            fp = save_moe_model(family, root / f"fp-{family}")
            model = AutoModelForCausalLM.from_pretrained(fp)
            method = {"method": "rtn"} if family == "gpt_oss" else {}
            group = 8 if family == "deepseek_v3" else 16
            quantize_(model, HFQuantConfig(bits=4, group_size=group, **method, **CAL), progress=False)
            model.eval().save_pretrained(root / f"q-{family}")
            cache[family] = (fp, root / f"q-{family}", model)
        return cache[family]

    get.root = root
    return get


def _logits(model):
    with torch.no_grad(), reference_kernels():
        return model(input_ids=IDS).logits


def _keys(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def _expected_keys(fp_keys: set[str], exported: set[str], names: tuple[str, ...]) -> set[str]:
    """The float checkpoint's keys, each quantized Linear's ``weight`` replaced by the format's ``names``."""
    out = set()
    for k in fp_keys:
        module = k.rpartition(".")[0]
        if k.endswith(".weight") and f"{module}.{names[0]}" in exported:
            out |= {f"{module}.{n}" for n in names}
        else:
            out.add(k)
    return out


def _exported_experts(name: str, family: str) -> tuple[str, dict]:
    block, parts = HUB_NAMES.get(family, DEFAULT_NAMES)
    return name.replace(".mlp.experts", f".{block}.experts"), parts


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_export_writes_the_family_checkpoint_names(family, moe):
    fp, src, model = moe(family)
    dst = export_checkpoint(src, "gptq", moe.root / f"gptq-names-{family}")
    exported = _keys(dst)
    assert exported == _expected_keys(_keys(fp), exported, GPTQ_KEYS)
    n_experts = sum(m.layout.num_experts * 3 for m in model.modules() if isinstance(m, QuantExperts))
    assert sum(".experts." in k and k.endswith(".qweight") for k in exported) == n_experts > 0
    assert not any(k.endswith((".zeros", "_proj.weight")) for k in exported)
    dtypes = {"qweight": torch.int32, "qzeros": torch.int32, "g_idx": torch.int32, "scales": torch.float16}
    for key, t in load_file(str(dst / "model.safetensors")).items():
        assert t.dtype == dtypes.get(key.rpartition(".")[2], t.dtype), key
    cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert json.loads((dst / "quantize_config.json").read_text()) == cfg
    assert (cfg["quant_method"], cfg["bits"], cfg["block_name_to_quantize"]) == ("gptq", 4, "model.layers")
    subset = cfg.get("modules_in_block_to_quantize")
    if family == "qwen2_moe":  # its shared expert's gate is a float Linear inside the blocks: the list leaves it out
        assert "mlp.shared_expert_gate" not in subset[0]
        assert {"mlp.experts.3.up_proj", "mlp.shared_expert.up_proj", "self_attn.q_proj"} <= set(subset[0])
    else:  # every Linear of the blocks is quantized (the routers are not nn.Linear)
        assert subset is None


def _decode(tensors: dict, name: str, cfg: dict):
    return gptq_to_packed(name, *(tensors[f"{name}.{k}"] for k in GPTQ_KEYS), cfg["bits"], cfg["group_size"])


def _check_decoded(decoded, weight, scales, zeros, g_idx, name):
    packed, d_scales, d_zeros, d_g_idx = decoded
    assert torch.equal(packed, weight) and torch.equal(d_zeros, zeros) and torch.equal(d_g_idx, g_idx), name
    assert torch.equal(d_scales, scales.half()), name


def _from_gptq_files(model, tensors: dict, cfg: dict, family: str):
    """A copy of the hfquant ``model`` holding the tensors decoded from the GPTQ export (asserting that codes, zero
    points and ``g_idx`` are exactly the model's and the scales their float16 values)."""
    imported = copy.deepcopy(model)
    for name, m in imported.named_modules():
        if isinstance(m, QuantLinearWeightOnly):
            decoded = _decode(tensors, name, cfg)
            _check_decoded(decoded, m.weight, m.scales, m.zeros, m.g_idx, name)
            m.scales = nn.Parameter(decoded[1].to(m.scales.dtype), requires_grad=False)
            m._kernel_cache.clear()
        elif isinstance(m, QuantExperts):
            exported, parts = _exported_experts(name, family)
            for proj, linears in parts.items():
                stack = getattr(m, proj)
                scales = []
                for e in range(m.layout.num_experts):
                    pieces = [_decode(tensors, f"{exported}.{e}.{n}", cfg) for n in linears]
                    decoded = [torch.cat([p[i] for p in pieces]) for i in range(3)] + [pieces[0][3]]
                    _check_decoded(decoded, stack.weight[e], stack.scales[e], stack.zeros[e], stack.g_idx[e],
                                   f"{exported}.{e}.{proj}")
                    scales.append(decoded[1])
                stack.scales = nn.Parameter(torch.stack(scales).to(stack.scales.dtype), requires_grad=False)
    return imported


def _fp16_scales(model):
    """A copy of ``model`` whose weight-only scales are rounded to float16 (what a GPTQ file stores)."""
    rounded = copy.deepcopy(model)
    for m in rounded.modules():
        if isinstance(m, (QuantLinearWeightOnly, StackedExperts)):
            m.scales = nn.Parameter(m.scales.half().to(m.scales.dtype), requires_grad=False)
        if isinstance(m, QuantLinearWeightOnly):
            m._kernel_cache.clear()
    return rounded


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_export_decodes_to_the_hfquant_model(family, moe):
    fp, src, model = moe(family)
    dst = export_checkpoint(src, "gptq", moe.root / f"gptq-rt-{family}")
    tensors = load_file(str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    hfq = load_file(str(src / "model.safetensors"))
    block, _ = HUB_NAMES.get(family, DEFAULT_NAMES)
    for key, t in hfq.items():  # the float tensors (norms, routers, embeddings) are carried as they are
        if f"{key.rpartition('.')[0]}.zeros" not in hfq:
            assert torch.equal(tensors[key.replace(".mlp.", f".{block}.")], t), key
    imported = _from_gptq_files(model, tensors, cfg, family)
    ref, got = _logits(model), _logits(imported)
    assert torch.equal(got, _logits(_fp16_scales(model)))
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()


CT_LOAD = textwrap.dedent("""
    import json, sys, torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    ids = torch.tensor(json.loads(sys.argv[1]))
    for folder in json.loads(sys.argv[2]):
        m = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            save_file({"logits": m(input_ids=ids).logits.contiguous()}, folder + ".logits.safetensors")
    print(json.dumps({"hfquant_imported": "hfquant" in sys.modules}))
""")


def test_compressed_tensors_export_loads_in_transformers_without_hfquant(moe):
    folders = {f: export_checkpoint(moe(f)[1], "compressed-tensors", moe.root / f"ct-{f}") for f in FAMILIES}
    for family, dst in folders.items():
        exported = _keys(dst)
        names = ("weight_packed", "weight_scale", "weight_shape")  # symmetric: no zero points
        assert exported == _expected_keys(_keys(moe(family)[0]), exported, names)
        cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
        assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
        assert cfg["config_groups"]["group_0"]["targets"] == ["Linear"]
        block, _ = HUB_NAMES.get(family, DEFAULT_NAMES)
        assert {"lm_head", f"model.layers.1.{block}.gate"} <= set(cfg["ignore"])  # routers stay float
        assert not any(".experts." in n for n in cfg["ignore"])
    proc = subprocess.run([sys.executable, "-c", CT_LOAD, json.dumps(IDS.tolist()),
                           json.dumps([str(f) for f in folders.values()])],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["hfquant_imported"] is False
    for family, dst in folders.items():
        ref = _logits(moe(family)[2])
        got = load_file(f"{dst}.logits.safetensors")["logits"]
        assert float((got - ref).abs().max()) <= 1e-5, family


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_compressed_tensors_experts_decompress_to_the_hfquant_weights(family, moe):
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    _, src, model = moe(family)
    dst = export_checkpoint(src, "compressed-tensors", moe.root / f"ct-rows-{family}")
    cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(**cfg["config_groups"]["group_0"])
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    tensors = load_file(str(dst / "model.safetensors"))
    checked = 0
    for name, m in model.named_modules():
        if not isinstance(m, QuantExperts):
            continue
        exported, parts = _exported_experts(name, family)
        for proj, linears in parts.items():
            for e in range(m.layout.num_experts):
                want = m.projection(e, proj).dequantize(torch.float32)
                got = []
                for n in linears:
                    prefix = f"{exported}.{e}.{n}."
                    local = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                    got.append(compressor.decompress(local, scheme)["weight"])
                assert torch.equal(torch.cat(got), want), f"{exported}.{e}.{proj}"
                checked += 1
    assert checked == 2 * 2 * 4


def test_moe_save_format_writes_the_export(moe, tmp_path):
    _, src, model = moe("mixtral")
    model.config.quantization_config.save_format = "gptq"
    try:
        model.save_pretrained(tmp_path / "via-save")
    finally:
        model.config.quantization_config.save_format = "hfquant"
    a = load_file(str(export_checkpoint(src, "gptq", tmp_path / "exported") / "model.safetensors"))
    b = load_file(str(tmp_path / "via-save" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "model.layers.0.block_sparse_moe.experts.2.w3.qweight" in a


def test_moe_exports_refused_in_one_line(moe, tmp_path):
    """gpt-oss: transformers' own checkpoints keep its experts fused (no per-expert Linear to write); W8A8 experts."""
    _, oss, _ = moe("gpt_oss")
    fp, _, _ = moe("mixtral")
    w8a8 = AutoModelForCausalLM.from_pretrained(fp)
    quantize_(w8a8, HFQuantConfig(method="smoothquant", **CAL), progress=False)
    w8a8.save_pretrained(tmp_path / "w8a8")
    cases = [(oss, "gptq", "fused"), (oss, "compressed-tensors", "fused"),
             (tmp_path / "w8a8", "compressed-tensors", "W8A8 experts"), (tmp_path / "w8a8", "gptq", "weight-only")]
    for src, fmt, words in cases:
        out = tmp_path / f"refused-{src.name}-{fmt}"
        with pytest.raises(FormatError, match=words) as err:
            export_checkpoint(src, fmt, out)
        assert "\n" not in str(err.value)
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}.tmp-*"))
