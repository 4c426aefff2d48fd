"""ONNX Runtime export: an hfquant checkpoint as an ONNX model that ``onnxruntime`` and ``onnxruntime-genai`` run,
its quantized Linears as ``com.microsoft.MatMulNBits`` (weight-only) or per-token int8 ``MatMulInteger`` (W8A8)
over hfquant's own codes, scales and zero points.

The graph is not written by hand. onnxruntime-genai's model builder (``python -m onnxruntime_genai.models.builder``)
writes it -- the decoder, its KV cache as ``GroupQueryAttention``, fused q/k/v, ``genai_config.json`` and the
tokenizer files -- from a float32 copy of the checkpoint whose quantized Linears hold their de-quantized weights;
``hfquant.formats.onnx_rewrite`` then swaps each of their ``MatMul`` nodes for the quantized op over the codes,
after checking that the float weight is exactly what the codes de-quantize to. Why that exporter: optimum-onnx
(0.1) requires transformers < 4.58, and ``torch.onnx`` has no operator for a packed 4-bit Linear or a KV-cache
layout ORT's generator reads. Why not the builder's own GPTQ reader (``-i GPTQ -p int4``): it stops on a partial
last group (SmolLM2's 576 inputs in groups of 128) and re-reads scales as float16; the swap carries any static
group size with float32 scales.

Nothing is float in silence: the head and the embeddings stay float as in the hfquant model (the builder is told
not to touch them), every quantized Linear must find its MatMul, and the written graph is read back: a float weight
``MatMul`` other than the head is an error.

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


def build_onnx(src_dir: Path, out_dir: Path, accuracy_level: int = 1) -> None:
    """Run onnxruntime-genai's model builder on ``src_dir`` (a float32 folder, tokenizer files included), writing
    ``out_dir`` in float32; raise ``FormatError`` with the builder's last line when it fails. The head and the
    embeddings are excluded from anything the builder would quantize."""
    _require_builder()
    cache = out_dir.parent / f".{out_dir.name}.builder-cache"
    cmd = [sys.executable, "-m", BUILDER, "-i", str(src_dir), "-m", str(src_dir), "-o", str(out_dir),
           "-p", "fp32", "-e", "cpu", "-c", str(cache), "--extra_options",
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
