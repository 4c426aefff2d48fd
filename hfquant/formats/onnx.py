"""ONNX Runtime export: an hfquant weight-only checkpoint as an ONNX model that ``onnxruntime`` and
``onnxruntime-genai`` run, its quantized Linears as ``com.microsoft.MatMulNBits`` with hfquant's own codes,
scales and zero points.

The graph is not written here. hfquant writes its GPTQ export (``hfquant.formats.gptq``: static groups, so
``g_idx`` is the plain ``i // group_size`` and is dropped) and hands that folder to onnxruntime-genai's model
builder (``python -m onnxruntime_genai.models.builder -i GPTQ``), which reads GPTQ checkpoints, repacks every
quantized Linear into ``MatMulNBits`` without rounding anything again, and writes the decoder with its KV cache
(``GroupQueryAttention``), ``genai_config.json`` and the tokenizer files. Why that exporter: optimum-onnx (0.1)
requires transformers < 4.58, and ``torch.onnx`` has no operator for a packed 4-bit Linear or a KV-cache layout
ORT's generator reads; the builder reads an hfquant GPTQ export as it reads AutoGPTQ's.

The builder quantizes whatever the checkpoint left float unless told not to; hfquant keeps the output head and
the embeddings float (as in the hfquant model) by excluding their nodes, and checks the written graph: every
``MatMul`` with a constant weight other than the head is an error (nothing float in silence), and the number of
``MatMulNBits`` weights must cover every quantized Linear of the checkpoint (fused q/k/v and gate/up count once).

W8A8 (SmoothQuant) checkpoints take the builder's float graph of their de-quantized weights with every quantized
``MatMul`` replaced by per-token int8 activations and ``MatMulInteger`` (``hfquant.formats.onnx_w8a8``).

``accuracy_level`` is MatMulNBits' attribute for the activations' arithmetic: 1 (float32, the default: the ONNX
model computes what the hfquant model computes) or 4 (activations rounded to int8 per block inside the kernel,
faster on CPUs with VNNI, less exact).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from hfquant.core.errors import FormatError

ONNX_FILE = "model.onnx"
BUILDER = "onnxruntime_genai.models.builder"
ACCURACY_LEVELS = (1, 2, 3, 4)
_FLOAT_NODES = ("/lm_head/MatMul", "/model/embed_tokens/Gather")
_HEAD_NODES = ("/lm_head/MatMul",)


def check_onnx_exportable(qconfig, folder: Path, has_experts: bool) -> None:
    """Raise ``FormatError`` (one line) for a checkpoint MatMulNBits or the builder cannot carry as it is."""
    if qconfig.gguf.type is not None:
        raise FormatError(f"{folder}: quantized on GGUF grids (gguf_type {qconfig.gguf.type}); ONNX Runtime does not "
                          "read them; export it with --format gguf, or quantize with bits/group_size for ONNX")
    if has_experts:
        raise FormatError(f"{folder}: quantized Mixture-of-Experts experts; onnxruntime-genai's builder reads experts "
                          "only as float weights it quantizes itself; export as gptq or compressed-tensors instead")


def check_accuracy_level(level) -> int:
    if isinstance(level, bool) or level not in ACCURACY_LEVELS:
        raise FormatError(f"onnx accuracy_level: got {level!r}; expected one of {list(ACCURACY_LEVELS)} "
                          "(1 float32 activations, 4 int8 activations)")
    return level


def _require_builder() -> None:
    try:
        import onnxruntime_genai  # noqa: F401  (optional dependency: only checks that it is installed)
        import onnx  # noqa: F401
        import onnx_ir  # noqa: F401  (the builder imports it but onnxruntime-genai does not declare it)
    except ImportError as exc:
        raise FormatError(f"the ONNX export needs onnxruntime-genai, onnx and onnx-ir ({exc.name} is missing); "
                          "pip install 'hfquant[onnx]'") from None


def build_onnx(src_dir: Path, out_dir: Path, precision: str, accuracy_level: int = 1) -> None:
    """Run onnxruntime-genai's model builder on ``src_dir`` (a GPTQ folder, or a float one with ``precision``
    ``"fp32"``; tokenizer files included), writing ``out_dir``; raise ``FormatError`` with the builder's last
    line when it fails. Nothing the checkpoint left float is quantized by the builder (head and embeddings)."""
    _require_builder()
    cache = out_dir.parent / f".{out_dir.name}.builder-cache"
    cmd = [sys.executable, "-m", BUILDER, "-i", str(src_dir), "-m", str(src_dir), "-o", str(out_dir),
           "-p", precision, "-e", "cpu", "-c", str(cache), "--extra_options",
           f"nodes_to_exclude={','.join(_FLOAT_NODES)}", f"accuracy_level={check_accuracy_level(accuracy_level)}",
           "hf_token=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        raise FormatError(f"{src_dir}: onnxruntime-genai's model builder failed: {lines[-1] if lines else done.returncode}")


def onnx_weights(model_path: Path) -> dict[str, list[str]]:
    """Op type -> names of the nodes of ``model_path`` that hold a weight: ``MatMulNBits``, ``MatMul`` /
    ``Gemm`` with a constant right-hand side, ``Gather`` / ``GatherBlockQuantized`` of a constant table."""
    import onnx  # optional dependency (the onnx extra), needed only here

    graph = onnx.load(str(model_path), load_external_data=False).graph
    consts = {t.name for t in graph.initializer}
    out: dict[str, list[str]] = {}
    for node in graph.node:
        held = node.op_type in ("MatMulNBits", "GatherBlockQuantized", "MatMulInteger") or (
            node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in consts) or (
            node.op_type == "Gather" and node.input and node.input[0] in consts)
        if held:
            out.setdefault(node.op_type, []).append(node.name)
    return out


def check_onnx_graph(model_path: Path, quantized_linears: int) -> dict[str, int]:
    """Nothing float in silence: the only float weight ``MatMul`` is the output head, the embeddings are a float
    ``Gather``, and there are ``MatMulNBits`` (or W8A8's ``MatMulInteger``) nodes for the checkpoint's quantized
    Linears (the builder fuses q/k/v, so there may be fewer nodes, never none, never more). Returns op type ->
    count."""
    found = onnx_weights(model_path)
    stray = [n for op in ("MatMul", "Gemm") for n in found.get(op, []) if n not in _HEAD_NODES]
    if stray:
        raise FormatError(f"{model_path}: {len(stray)} float MatMul weights (e.g. {stray[0]}) where the checkpoint has "
                          "quantized Linears; this model family's ONNX graph does not carry hfquant's codes")
    n = len(found.get("MatMulNBits", [])) + len(found.get("MatMulInteger", []))
    if not 0 < n <= quantized_linears:
        raise FormatError(f"{model_path}: {n} quantized MatMul nodes for {quantized_linears} quantized Linears; expected "
                          "between 1 and that many (fused projections count once)")
    return {op: len(names) for op, names in sorted(found.items())}


__all__ = ["ACCURACY_LEVELS", "ONNX_FILE", "build_onnx", "check_accuracy_level", "check_onnx_exportable",
           "check_onnx_graph", "onnx_weights"]
