"""hfquant's codes in the ONNX graph of onnxruntime-genai's model builder: one class per kind of quantized weight.

The builder writes the graph (decoder, ``GroupQueryAttention`` KV cache, fused q/k/v, ``genai_config.json``) from a
float copy of the checkpoint whose quantized Linears hold their de-quantized weights exactly (``write_dequantized``).
``rewrite_matmuls`` then replaces every ``MatMul`` of a quantized Linear by the kind's own nodes over hfquant's
codes, after checking that the builder's float weight is exactly the de-quantized codes it stands for (the builder
fuses q/k/v; their codes are concatenated in the same column order). Nothing is rounded again.

Kinds (``KINDS``; a new one is one class here with ``read``, ``weight``, ``cat`` and ``nodes``):

- ``NBits`` -- weight-only (GPTQ, RTN; 4 or 8 bits, sym or asym): ``com.microsoft.MatMulNBits`` with hfquant's codes,
  scales and zero points. Its blocks are the largest power of two (16..128) dividing the group size, each block
  carrying its group's scale and zero point, so any static group size that is a multiple of 16 exports, including
  a partial last group (576 inputs in groups of 128: five blocks, the last one half used), and one group per row
  (blocks of 128, every one with the row's scale). Symmetric grids (every zero point ``2**(bits-1)``) leave the
  zero points to the kernel's default, which it runs faster (ORT's own RTN export does the same).
- ``PerTokenInt8`` -- W8A8 (SmoothQuant, dynamic activations): ONNX's dynamic-quantization ops take one scale per
  tensor, so per-token int8 quantization is written from standard ops, in ``hfquant.kernels.w8a8``'s order::

      s_x = max(ReduceMax(|x|, last axis) / 127, 1e-8)        # one scale per token
      q_x = Cast<int8>(Clip(Round(x / s_x), -127, 127))       # Round: half to even, as torch.round
      y   = Cast<float>(MatMulInteger(q_x, W_q)) * s_x * s_w   # exact int32 accumulation
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from hfquant.core.errors import FormatError
from hfquant.core.grids import dequantize_grouped
from hfquant.core.packing import unpack_codes

_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_NODE = re.compile(r"/model/layers\.(\d+)/\w+/(\w+)/MatMul$")
MAX_BLOCK = 128  # MatMulNBits' CPU kernels are built for blocks of 16 to 256; 128 keeps one block per GPTQ group


@dataclass
class NBits:
    """Weight-only codes ``[out, in]`` with per-group ``scales`` / ``zeros`` ``[out, G]`` of ``group`` inputs each."""
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group: int
    bits: int

    @classmethod
    def read(cls, name: str, t: dict) -> NBits:
        bits, g_idx = t["weight"].shape[-1], t["g_idx"].to(torch.int64)
        if bits not in (4, 8):
            raise FormatError(f"{name}: {bits}-bit codes; ONNX Runtime's MatMulNBits runs 4 and 8 bits here; "
                              "quantize with bits 4 or 8 to export to ONNX")
        group = int((g_idx == 0).sum())
        if not torch.equal(g_idx, torch.arange(g_idx.numel(), device=g_idx.device) // max(group, 1)):
            raise FormatError(f"{name}: act-order groups without static_groups (g_idx is not i // group_size); "
                              "MatMulNBits blocks hold consecutive inputs; quantize with static_groups: true")
        out = cls(unpack_codes(t["weight"], bits, g_idx.numel()).to(torch.uint8), t["scales"].float(),
                  t["zeros"].to(torch.uint8), group, bits)
        try:
            out.block()  # a group size MatMulNBits cannot carry fails here, before the builder runs
        except FormatError as exc:
            raise FormatError(f"{name}: {exc}") from None
        return out

    def g_idx(self) -> torch.Tensor:
        return torch.arange(self.codes.shape[1], device=self.codes.device) // self.group

    def weight(self) -> torch.Tensor:
        return dequantize_grouped(self.codes, self.scales, self.zeros, self.g_idx())

    @classmethod
    def cat(cls, parts: list[NBits]) -> NBits:
        if len({(p.group, p.bits) for p in parts}) > 1:
            raise FormatError("fused projections (q/k/v) with different bits or group sizes; MatMulNBits holds one "
                              "grid per node; give them the same scheme to export to ONNX")
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scales", "zeros")),
                   parts[0].group, parts[0].bits)

    def block(self) -> int:
        """The largest power of two (16..128) dividing the group size; any for one group per row."""
        b = MAX_BLOCK
        while b >= 16 and self.group % b and self.group < self.codes.shape[1]:
            b //= 2
        if b < 16:
            raise FormatError(f"group size {self.group} has no power-of-two divisor from 16 to {MAX_BLOCK}, the "
                              "block sizes MatMulNBits runs; quantize with a group_size that is a multiple of 16")
        return b

    def nodes(self, h, numpy_helper, node, stem: str, opset: int, accuracy_level: int) -> tuple[list, list]:
        n, k = self.codes.shape
        b, per = self.block(), 8 // self.bits
        blocks = -(-k // b)
        idx = torch.arange(blocks, device=self.codes.device) * b // self.group
        codes = torch.zeros(n, blocks * b, dtype=torch.uint8, device=self.codes.device)
        codes[:, :k] = self.codes
        zeros = self.zeros[:, idx]
        codes[:, k:] = zeros[:, -1:]  # the unused tail of a partial last block de-quantizes to 0
        packed = _pack_nibbles(codes.reshape(n, blocks, b), per)
        inits = [numpy_helper.from_array(packed.numpy(), f"{stem}/NBits/B"),
                 numpy_helper.from_array(self.scales[:, idx].contiguous().numpy(), f"{stem}/NBits/scales")]
        if not bool((zeros == 2 ** (self.bits - 1)).all()):  # symmetric: MatMulNBits's default zero point, no input
            zp = _pack_nibbles(torch.cat([zeros, zeros[:, -1:]], 1)[:, :-(-blocks // per) * per], per)
            inits.append(numpy_helper.from_array(zp.reshape(-1).numpy(), f"{stem}/NBits/zero_points"))
        mm = h.make_node("MatMulNBits", [node.input[0], *(i.name for i in inits)], [node.output[0]],
                         name=f"{stem}/MatMulNBits", domain="com.microsoft", K=k, N=n, bits=self.bits, block_size=b,
                         accuracy_level=accuracy_level)
        return [mm], inits


def _pack_nibbles(values: torch.Tensor, per: int) -> torch.Tensor:
    """uint8 ``[..., m]`` -> ``[..., m / per]``: ``per`` (2 or 1) values a byte, the first in the low bits."""
    if per == 1:
        return values.contiguous()
    v = values.reshape(*values.shape[:-1], -1, 2)
    return (v[..., 0] | (v[..., 1] << 4)).contiguous()


@dataclass
class PerTokenInt8:
    """W8A8: int8 codes ``[out, in]`` and float32 per-output-channel ``scales``; activations quantized per token."""
    codes: torch.Tensor
    scales: torch.Tensor
    QMAX = 127.0

    @classmethod
    def read(cls, name: str, t: dict) -> PerTokenInt8:
        if float(t["input_scale"].reshape(-1)[0]) != 0.0:
            raise FormatError(f"{name}: a static activation scale; the ONNX export writes dynamic per-token W8A8 "
                              "only (quantize with activation_scheme: dynamic)")
        return cls(t["weight"].reshape(t["weight"].shape[0], -1), t["weight_scale"].float())

    def weight(self) -> torch.Tensor:
        return self.scales[:, None] * self.codes.float()

    @classmethod
    def cat(cls, parts: list[PerTokenInt8]) -> PerTokenInt8:
        return cls(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]))

    def nodes(self, h, numpy_helper, node, stem: str, opset: int, accuracy_level: int) -> tuple[list, list]:
        x, y, p = node.input[0], node.output[0], f"{stem}/W8A8"
        inits = [numpy_helper.from_array(self.codes.t().contiguous().numpy(), f"{p}/codes"),
                 numpy_helper.from_array(self.scales.numpy(), f"{p}/scales"),
                 numpy_helper.from_array(np.array([self.QMAX], np.float32), f"{p}/qmax"),
                 numpy_helper.from_array(np.array([-self.QMAX], np.float32), f"{p}/lo"),
                 numpy_helper.from_array(np.array([1e-8], np.float32), f"{p}/eps"),
                 numpy_helper.from_array(np.array([-1], np.int64), f"{p}/axes")]
        nodes = [
            h.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/Abs"),
            h.make_node("ReduceMax", [f"{p}/abs", f"{p}/axes"], [f"{p}/amax"], keepdims=1, name=f"{p}/ReduceMax")
            if opset >= 18 else  # axes became an input in opset 18
            h.make_node("ReduceMax", [f"{p}/abs"], [f"{p}/amax"], axes=[-1], keepdims=1, name=f"{p}/ReduceMax"),
            h.make_node("Div", [f"{p}/amax", f"{p}/qmax"], [f"{p}/scale0"], name=f"{p}/DivQmax"),
            h.make_node("Max", [f"{p}/scale0", f"{p}/eps"], [f"{p}/scale"], name=f"{p}/Max"),
            h.make_node("Div", [x, f"{p}/scale"], [f"{p}/xs"], name=f"{p}/Div"),
            h.make_node("Round", [f"{p}/xs"], [f"{p}/xr"], name=f"{p}/Round"),
            h.make_node("Clip", [f"{p}/xr", f"{p}/lo", f"{p}/qmax"], [f"{p}/xc"], name=f"{p}/Clip"),
            h.make_node("Cast", [f"{p}/xc"], [f"{p}/q"], to=3, name=f"{p}/CastInt8"),  # 3 = INT8
            h.make_node("MatMulInteger", [f"{p}/q", f"{p}/codes"], [f"{p}/acc"], name=f"{p}/MatMulInteger"),
            h.make_node("Cast", [f"{p}/acc"], [f"{p}/accf"], to=1, name=f"{p}/CastFloat"),  # 1 = FLOAT
            h.make_node("Mul", [f"{p}/accf", f"{p}/scale"], [f"{p}/ys"], name=f"{p}/MulTokenScale"),
            h.make_node("Mul", [f"{p}/ys", f"{p}/scales"], [y], name=f"{p}/MulWeightScale"),
        ]
        return nodes, inits


KINDS = {"weight_only": NBits, "w8a8": PerTokenInt8}


def write_dequantized(ckpt, folder: Path) -> dict:
    """Write a float checkpoint of ``ckpt`` (an ``HFQuantCheckpoint``) into ``folder``: each quantized Linear's
    ``weight`` de-quantized to float32 by its kind, every other tensor as saved. Returns module name -> the kind's
    object holding its codes."""
    kind = KINDS["w8a8" if ckpt.w8a8 else "weight_only"]
    modules, tensors = {}, {}
    for key, name in ckpt.module_of.items():
        if name is None:
            tensors[key] = ckpt.tensor(key)
        elif name not in modules:
            t = ckpt.module_tensors(name)
            modules[name] = kind.read(name, t)
            tensors[f"{name}.weight"] = modules[name].weight()
            if "bias" in t:
                tensors[f"{name}.bias"] = t["bias"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return modules


def _sources(node_name: str, modules: dict) -> list[str]:
    """The checkpoint's Linears whose weights the builder's MatMul ``node_name`` holds, in column order."""
    m = _NODE.search(node_name)
    if m is None:
        return []
    layer, short = m.groups()
    names = [n for n in modules if n.startswith(f"model.layers.{layer}.")]
    out = []
    for part in _FUSED.get(short, (short,)):
        out += [n for n in names if n.endswith("." + part)]
    return out


def rewrite_matmuls(model_path: Path, modules: dict, accuracy_level: int = 1) -> int:
    """Replace the float ``MatMul`` of every quantized Linear in ``model_path`` (the builder's graph of
    ``write_dequantized``'s folder) by its kind's nodes; returns how many Linears were replaced. Every module must
    be found (nothing float in silence). The weights file is rewritten without the float weights."""
    # optional dependency (the onnx extra), needed only for the ONNX export
    import onnx
    from onnx import helper as h, numpy_helper

    model = onnx.load(str(model_path))
    graph, opset = model.graph, next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    inits = {t.name: t for t in graph.initializer}
    nodes, dropped, used = [], set(), set()
    for node in graph.node:
        names = _sources(node.name, modules) if node.op_type == "MatMul" and node.input[1] in inits else []
        if not names:
            nodes.append(node)
            continue
        parts = [modules[n] for n in names]
        fused = type(parts[0]).cat(parts) if len(parts) > 1 else parts[0]
        weight = torch.from_numpy(numpy_helper.to_array(inits[node.input[1]]).copy())
        if not torch.equal(weight, fused.weight().t()):
            raise FormatError(f"{model_path}: {node.name} does not hold the de-quantized codes of {names}; this "
                              "family's ONNX graph cannot carry hfquant's codes")
        new_nodes, new_inits = fused.nodes(h, numpy_helper, node, node.name.rsplit("/", 1)[0], opset,
                                          accuracy_level)
        nodes += new_nodes
        graph.initializer.extend(new_inits)
        dropped.add(node.input[1])
        used.update(names)
    if missing := sorted(set(modules) - used):
        raise FormatError(f"{model_path}: {len(missing)} quantized Linears (e.g. {missing[0]}) have no MatMul of their "
                          "own in the builder's graph; this family's ONNX graph cannot carry hfquant's codes")
    if any(isinstance(m, NBits) for m in modules.values()):
        model.opset_import.extend([] if any(o.domain == "com.microsoft" for o in model.opset_import)
                                  else [h.make_opsetid("com.microsoft", 1)])
    _finish_graph(onnx, model, nodes, dropped, model_path)
    return len(used)


def _finish_graph(onnx, model, nodes: list, dropped: set, model_path: Path) -> None:
    graph = model.graph
    del graph.node[:]
    graph.node.extend(nodes)
    keep = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    data = model_path.with_name(model_path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(model, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data.name, size_threshold=1024)


__all__ = ["KINDS", "NBits", "PerTokenInt8", "rewrite_matmuls", "write_dequantized"]
