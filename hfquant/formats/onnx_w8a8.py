"""W8A8 (SmoothQuant) checkpoints in ONNX Runtime: int8 weights per output channel, int8 activations per token.

ONNX has no single operator for per-token dynamic quantization (``DynamicQuantizeLinear`` and the contrib
``DynamicQuantizeMatMul`` take one scale per tensor), but its standard operators express it exactly, so each
quantized Linear becomes the arithmetic of ``hfquant.kernels.w8a8`` in graph form::

    s_x = max(ReduceMax(|x|, last axis) / 127, 1e-8)        # one scale per token
    q_x = Cast<int8>(Clip(Round(x / s_x), -127, 127))       # Round: half to even, as torch.round
    y   = Cast<float>(MatMulInteger(q_x, W_q)) * s_x * s_w   # exact int32 accumulation, hfquant's epilogue order

The graph around the Linears comes from onnxruntime-genai's builder, run on a float copy of the checkpoint whose
weights are ``s_w * W_q`` exactly (the smoothing is already folded into the norms the checkpoint stores); every
``MatMul`` the builder writes for a quantized Linear (q/k/v fused into one) is then replaced by the subgraph above,
after checking that its float weight is exactly the de-quantized codes it stands for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from hfquant.core.errors import FormatError

QMAX = 127.0
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_NODE = re.compile(r"/model/layers\.(\d+)/\w+/(\w+)/MatMul$")


def write_dequantized(ckpt, folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Write a float checkpoint of ``ckpt`` (an ``HFQuantCheckpoint`` of a W8A8 model) into ``folder``: each
    quantized Linear's ``weight`` is ``weight_scale * weight`` in float32, every other tensor as saved. Returns
    module name -> (int8 codes ``[out, in]``, float32 scales ``[out]``)."""
    modules, module_of = {}, ckpt.module_of
    tensors = {}
    for key, name in module_of.items():
        if name is None:
            tensors[key] = ckpt.tensor(key)
        elif key == f"{name}.weight":
            t = ckpt.module_tensors(name)
            if float(t["input_scale"].reshape(-1)[0]) != 0.0:
                raise FormatError(f"{ckpt.folder}: {name} has a static activation scale; the ONNX export writes "
                                  "dynamic per-token W8A8 only (quantize with activation_scheme: dynamic)")
            codes = t["weight"].reshape(t["weight"].shape[0], -1)
            modules[name] = (codes, t["weight_scale"].float())
            tensors[key] = t["weight_scale"].float()[:, None] * codes.float()
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


def _int8_nodes(h, node, codes_name: str, scales_name: str, opset: int) -> list:
    """The nodes that compute ``node``'s output from its input with int8 codes and per-token activations."""
    x, y, p = node.input[0], node.output[0], node.name.rsplit("/", 1)[0] + "/W8A8"
    reduce = (h.make_node("ReduceMax", [f"{p}/abs", "hfquant_w8a8/axes"], [f"{p}/amax"], keepdims=1, name=f"{p}/ReduceMax")
              if opset >= 18 else
              h.make_node("ReduceMax", [f"{p}/abs"], [f"{p}/amax"], axes=[-1], keepdims=1, name=f"{p}/ReduceMax"))
    return [
        h.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/Abs"), reduce,
        h.make_node("Div", [f"{p}/amax", "hfquant_w8a8/qmax"], [f"{p}/scale0"], name=f"{p}/DivQmax"),
        h.make_node("Max", [f"{p}/scale0", "hfquant_w8a8/eps"], [f"{p}/scale"], name=f"{p}/Max"),
        h.make_node("Div", [x, f"{p}/scale"], [f"{p}/xs"], name=f"{p}/Div"),
        h.make_node("Round", [f"{p}/xs"], [f"{p}/xr"], name=f"{p}/Round"),
        h.make_node("Clip", [f"{p}/xr", "hfquant_w8a8/lo", "hfquant_w8a8/hi"], [f"{p}/xc"], name=f"{p}/Clip"),
        h.make_node("Cast", [f"{p}/xc"], [f"{p}/q"], to=3, name=f"{p}/CastInt8"),  # 3 = INT8
        h.make_node("MatMulInteger", [f"{p}/q", codes_name], [f"{p}/acc"], name=f"{p}/MatMulInteger"),
        h.make_node("Cast", [f"{p}/acc"], [f"{p}/accf"], to=1, name=f"{p}/CastFloat"),  # 1 = FLOAT
        h.make_node("Mul", [f"{p}/accf", f"{p}/scale"], [f"{p}/ys"], name=f"{p}/MulTokenScale"),
        h.make_node("Mul", [f"{p}/ys", scales_name], [y], name=f"{p}/MulWeightScale"),
    ]


def _constants(onnx, h) -> list:
    f = onnx.TensorProto.FLOAT
    return [h.make_tensor("hfquant_w8a8/qmax", f, [], [QMAX]), h.make_tensor("hfquant_w8a8/eps", f, [], [1e-8]),
            h.make_tensor("hfquant_w8a8/lo", f, [], [-QMAX]), h.make_tensor("hfquant_w8a8/hi", f, [], [QMAX]),
            h.make_tensor("hfquant_w8a8/axes", onnx.TensorProto.INT64, [1], [-1])]


def rewrite_int8_matmuls(model_path: Path, modules: dict) -> int:
    """Replace every float ``MatMul`` of a quantized Linear in ``model_path`` (written by the builder from
    ``write_dequantized``'s folder) by the int8 subgraph; returns how many were replaced. The weights file is
    rewritten (the float weights of those MatMuls are dropped)."""
    # optional dependency (the onnx extra), needed only for the W8A8 export
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
        codes = torch.cat([modules[n][0] for n in names]).t().contiguous()  # [in, out] like the MatMul weight
        scales = torch.cat([modules[n][1] for n in names])
        weight = torch.from_numpy(numpy_helper.to_array(inits[node.input[1]]).copy())
        if weight.shape != codes.shape or not torch.equal(weight, scales[None, :] * codes.float()):
            raise FormatError(f"{model_path}: {node.name} does not hold the de-quantized codes of {names}; this "
                              "family's ONNX graph cannot carry hfquant's W8A8 codes")
        stem = node.name.rsplit("/", 1)[0]
        graph.initializer.extend([numpy_helper.from_array(codes.numpy(), f"{stem}/W8A8/codes"),
                                  numpy_helper.from_array(scales.numpy(), f"{stem}/W8A8/scales")])
        nodes += _int8_nodes(h, node, f"{stem}/W8A8/codes", f"{stem}/W8A8/scales", opset)
        dropped.add(node.input[1])
        used.update(names)
    if not used:
        raise FormatError(f"{model_path}: no MatMul of the builder's graph matched a quantized Linear")
    graph.initializer.extend(_constants(onnx, h))
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


__all__ = ["rewrite_int8_matmuls", "write_dequantized"]
