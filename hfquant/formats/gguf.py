"""Write a llama.cpp GGUF file from a saved model folder: an hfquant checkpoint quantized with ``gguf_type``
(its ``QuantLinearGGUF`` blocks are copied byte for byte), or a plain float checkpoint (``float_type``: F32,
F16 or BF16, e.g. as the input of llama.cpp's own quantizer).

The container, the metadata keys, the tensor names and the block constants come from the ``gguf`` package
(``GGUFWriter``, ``TensorNameMap``); this module decides what goes in:

* architecture metadata (``hfquant.formats.gguf_arch``) for the families of ``gguf_layout.ARCHS``: Llama,
  Mistral and Mixtral (GGUF ``llama``), Granite, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE, Gemma 3 (text) and Phi-3;
* tensors in llama.cpp's names; for GGUF ``llama`` and ``granite`` the q/k projections' rows are permuted from the
  HF rotary layout to llama.cpp's, Gemma 3's RMSNorm weights are stored as ``w + 1`` (as llama.cpp's converter
  does; transformers' GGUF loader undoes both); fused MoE experts become llama.cpp's 3-D expert tensors
  (``hfquant.formats.gguf_experts``), routers stay F32;
* the output head and token embeddings in their type (``hfquant.core.gguf_types``: Q6_K / Q8_0 as llama.cpp
  chooses, or ``head_type`` / ``embedding_type``): the blocks the checkpoint holds for them (``HELD_BLOCKS``, the
  ones the quantized model de-quantized) copied as they are, else rounded to nearest; norms in F32, float Linears
  the quantizer kept (rows no block fits) in F16;
* the tokenizer from the folder's ``tokenizer.json`` (byte-level BPE: vocabulary, token types, merges, special
  token ids, chat template).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import safe_open
import torch

from hfquant.core import gguf_types
from hfquant.core.errors import FormatError
from hfquant.core.gguf_blocks import BLOCK_TYPES, dequantize_rows, pack_rows
from hfquant.core.gguf_grids import rtn_block_quantize
from hfquant.formats.files import place
from hfquant.formats.gguf_arch import add_metadata, check_config, rope_tensors
from hfquant.formats.gguf_experts import expert_tensors, expert_type, stack_expert_blocks, take_part
from hfquant.formats.gguf_layout import ARCHS, gguf_package, name_map, NORM_SHIFTED, permute_rows, rotary_heads
# The reader, imported from here by its users (hfquant.formats, hfquant.app).
from hfquant.formats.gguf_read import load_gguf, read_gguf_header

__all__ = ["FLOAT_TYPES", "GGUF_FILE", "export_gguf", "load_gguf", "read_gguf_header", "run_label", "write_gguf"]

logger = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"
FLOAT_TYPES = ("F32", "F16", "BF16")
# tokenizer.ggml.pre: llama.cpp's pre-tokenizer, by model family (llama.cpp tells them by hashing a test string).
_PRE_BY_VOCAB = {("llama", 49152): "smollm", ("llama", 128256): "llama-bpe"}
_PRE_BY_TYPE = {"qwen2": "qwen2", "qwen3": "qwen2", "qwen2_moe": "qwen2", "qwen3_moe": "qwen2"}
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0",
               "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0",
               "Q3_K": "MOSTLY_Q3_K_S", "Q3_K_S": "MOSTLY_Q3_K_S", "Q3_K_M": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_S",
               "Q4_K_M": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K"}


def run_label(config: dict) -> str:
    """The GGUF part of a saved config's one-line description (``hfquant inspect`` of a ``.gguf`` file)."""
    return f"gguf_type {config.get('gguf_type')}"


class _Source:
    """The folder being exported: config, quantization config, tensors by name."""

    def __init__(self, folder: Path):
        self.folder = folder
        cfg = folder / "config.json"
        if not cfg.is_file():
            raise FormatError(f"{folder}: no config.json; expected a model folder written by save_pretrained")
        self.config = json.loads(cfg.read_text())
        self.qconfig = self.config.get("quantization_config") or None
        if self.qconfig is not None and (self.qconfig.get("quant_method") != "hfquant" or not self.qconfig.get("gguf_type")):
            raise FormatError(f"{folder}: its weights are quantized ({self.qconfig.get('quant_method')}, "
                              f"gguf_type {self.qconfig.get('gguf_type')!r}), not on a GGUF grid; quantize with "
                              "HFQuantConfig(gguf_type=...) (e.g. Q4_K_M) or export the float model")
        model_type = self.config.get("model_type")
        if model_type not in ARCHS:
            raise FormatError(f"{folder}: model_type {model_type!r} has no GGUF writer here; supported: "
                              f"{sorted(ARCHS)}")
        self.model_type, self.arch = model_type, ARCHS[model_type]
        check_config(self.config, self.arch, folder)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FormatError(f"{folder}: no .safetensors files (hfquant reads safetensors only)")
        self._handles = {f: safe_open(f, "pt") for f in files}  # opened once: listing and reading
        self._where = {k: f for f, h in self._handles.items() for k in h.keys()}

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def tensor(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)


def _tokenizer_folder(src: _Source, tokenizer_dir) -> Path:
    for folder in [src.folder] + ([Path(tokenizer_dir)] if tokenizer_dir else []):
        if (folder / "tokenizer.json").is_file():
            return folder
    raise FormatError(f"{src.folder}: no tokenizer.json (a GGUF file carries the tokenizer); save the tokenizer "
                      "into the folder (tokenizer.save_pretrained) or pass the folder that has it")


def _add_tokenizer(gguf, writer, src: _Source, folder: Path) -> None:
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    decoder = (tok.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and model.get("byte_fallback") and decoder == "Sequence":
        _add_llama_tokenizer(gguf, writer, src, folder)
        return
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise FormatError(f"{folder}/tokenizer.json: a {model.get('type')} tokenizer with decoder {decoder}; the GGUF "
                          "writer handles byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens") or []}
    for text, a in added.items():
        vocab.setdefault(text, a["id"])
    size = max(src.config.get("vocab_size") or 0, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        a = added.get(text)
        types[i] = (gguf.TokenType.NORMAL if a is None else
                    gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    key = (src.model_type, size)
    pre = _PRE_BY_VOCAB.get(key) or _PRE_BY_TYPE.get(src.model_type)
    if pre is None:
        logger.warning("GGUF: no known llama.cpp pre-tokenizer for %s with %d tokens; writing 'default'", *key)
        pre = "default"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    _add_special_tokens(gguf, writer, src, folder, size, merges=True)


def _add_llama_tokenizer(gguf, writer, src: _Source, folder: Path) -> None:
    """A SentencePiece-style BPE with byte fallback in ``tokenizer.json`` (Llama 2, Mistral): llama.cpp's ``llama``
    tokenizer model, read by the gguf package's ``LlamaHfVocab`` (as llama.cpp's converter does without a
    ``tokenizer.model``), padded to the model's vocabulary size."""
    vocab = gguf.vocab.LlamaHfVocab(folder)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for i in range(len(tokens), src.config.get("vocab_size") or len(tokens)):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    _add_special_tokens(gguf, writer, src, folder, len(tokens), merges=False)


def _add_special_tokens(gguf, writer, src: _Source, folder: Path, n_vocab: int, merges: bool) -> None:
    """The special token ids, merges and chat template of the tokenizer files; the config's ``pad_token_id`` when
    the tokenizer names no padding token (transformers' GGUF loader takes the model's padding index from it)."""
    special = gguf.SpecialVocab(folder, load_merges=merges, n_vocab=n_vocab)
    pad = src.config.get("pad_token_id")
    if special.special_token_ids.get("pad") is None and isinstance(pad, int) and 0 <= pad < n_vocab:
        special.special_token_ids["pad"] = pad
    special.add_to_gguf(writer)


def _float_array(t: torch.Tensor, kind: str):
    if kind == "BF16":
        return t.to(torch.bfloat16).view(torch.int16).numpy()
    return t.to(torch.float16 if kind == "F16" else torch.float32).numpy()


def write_gguf(src_dir: str | os.PathLike, out_file: str | os.PathLike, *, float_type: str = "F16",
               head_type: str | None = None, embedding_type: str | None = None, tokenizer_dir=None) -> Path:
    """Write the GGUF file ``out_file`` from the model folder ``src_dir`` (see the module docstring).

    ``float_type``: the type of 2-D float weights in a float checkpoint (``F32``, ``F16``, ``BF16``) and of
    float Linears left in a quantized one. ``head_type`` / ``embedding_type``: override llama.cpp's choice (a
    block type or a float type; default from the checkpoint's ``gguf_head_type`` / ``gguf_embedding_type``)."""
    gguf = gguf_package()
    if float_type not in FLOAT_TYPES:
        raise FormatError(f"float type: got {float_type!r}; expected one of {list(FLOAT_TYPES)}")
    src = _Source(Path(src_dir))
    tensors = _Tensors(gguf, src, float_type, head_type, embedding_type)
    writer = gguf.GGUFWriter(str(out_file), src.arch)
    add_metadata(gguf, writer, src.config, src.arch, Path(src_dir).resolve().name)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[tensors.run_type]))
    writer.add_quantization_version(2)
    _add_tokenizer(gguf, writer, src, _tokenizer_folder(src, tokenizer_dir))
    for name, data in rope_tensors(src.config, src.arch).items():
        writer.add_tensor(name, data.numpy())
    for key in src.keys():
        tensors.add(writer, key)
    tensors.add_experts(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out_file)


class _Tensors:
    """The folder's tensors as the file holds them: llama.cpp's name, the q/k rows in llama.cpp's rotary order (and
    the rest of its conventions: ``gguf_layout``), and the type (a quantized Linear's GGUF blocks as they are; the
    head, the token embeddings and float weights in the type of ``_matrix_type``; experts: ``add_experts``)."""

    def __init__(self, gguf, src: _Source, float_type: str, head_type: str | None, embedding_type: str | None):
        cfg, q = src.config, src.qconfig
        self.gguf, self.src, self.q, self.float_type = gguf, src, q, float_type
        self.run_type = q["gguf_type"] if q else float_type
        self.head_type = head_type or (q or {}).get("gguf_head_type")
        self.embedding_type = embedding_type or (q or {}).get("gguf_embedding_type")
        self.names = name_map(gguf, src.arch, cfg["num_hidden_layers"])
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        self.schemes = (q.get("module_schemes") or {}) if q else {}
        self.experts = expert_tensors(gguf, src.arch, src.keys())
        self.expert_keys = {k for t in self.experts.values() for k in t.keys}
        # {quantized Linear: its GGUF type (module_schemes), None when the config does not state it}
        linears = [k[: -len(".qweight")] for k in src.keys() if k.endswith(".qweight") and k not in self.expert_keys]
        self.quantized = {m: self.schemes.get(m, {}).get("gguf_type") for m in linears}

    def add(self, writer, key: str) -> None:
        """Add the folder's tensor ``key`` to ``writer`` (a tied head and held blocks are not tensors of their own;
        experts: ``add_experts``)."""
        module, _, leaf = key.rpartition(".")
        if (key == "lm_head.weight" and self.tied) or leaf == gguf_types.HELD_BLOCKS or key in self.expert_keys:
            return  # held blocks: with their weight
        target, data = self._read(key, module, leaf)
        if target is None:
            raise FormatError(f"{key}: no llama.cpp tensor name for it in GGUF {self.src.arch!r}; the exporter cannot place it")
        permute = rotary_heads(self.src.arch, module, self.heads, self.kv_heads)
        if permute is not None:
            data = permute_rows(data, permute)
        if self.src.arch in NORM_SHIFTED and target.endswith("norm.weight"):
            data = data + 1
        if ".ffn_gate_inp_shexp." in target:  # the shared expert's gate: [1, hidden] in HF, a vector in llama.cpp
            data = data.reshape(-1)
        if leaf == "qweight":
            writer.add_tensor(target, data.contiguous().numpy(),
                              raw_dtype=self.gguf.GGMLQuantizationType[self.quantized[module]])
        elif data.dim() == 1:
            writer.add_tensor(target, data.numpy())
        else:
            self._add_matrix(writer, key, target, data)

    def _read(self, key: str, module: str, leaf: str) -> tuple[str | None, torch.Tensor]:
        """``(llama.cpp name or None, tensor)``: a quantized Linear's GGUF blocks as stored, the rest in float32."""
        if leaf == "qweight":
            target = self.names.get_name(module + ".weight", try_suffixes=(".weight",))
            if self.quantized.get(module) is None:
                raise FormatError(f"{self.src.folder}: {module} has GGUF blocks but no gguf_type in module_schemes; re-save it")
            return target, self.src.tensor(key)
        target = self.names.get_name(key, try_suffixes=(".weight", ".bias"))
        if module in self.quantized and leaf == "bias" and self.src.arch == "llama":
            raise FormatError(f"{key}: GGUF llama has no Linear biases")
        return target, self.src.tensor(key).float()

    def _matrix_type(self, key: str, target: str, cols: int) -> tuple[str, str | None]:
        """``(type, held)`` of a 2-D float tensor: the type it is written in, and the type the checkpoint's own config
        gives it (its held blocks are of that type; ``None`` for a float checkpoint and other tensors)."""
        q, run = self.q, self.run_type
        if key == "lm_head.weight" or (self.tied and target.startswith("token_embd")):
            kind = gguf_types.head_type(run, cols, self.head_type) if q else (self.head_type or self.float_type)
            return kind, gguf_types.head_type(run, cols, q.get("gguf_head_type")) if q else None
        if target.startswith("token_embd"):
            kind = (gguf_types.embedding_type(run, cols, self.embedding_type) if q
                    else (self.embedding_type or self.float_type))
            return kind, gguf_types.embedding_type(run, cols, q.get("gguf_embedding_type")) if q else None
        if ".ffn_gate_inp." in target:  # a MoE router: llama.cpp keeps it in F32
            return "F32", None
        return self.float_type, None

    def _add_matrix(self, writer, key: str, target: str, data: torch.Tensor) -> None:
        """A 2-D float tensor in its type: GGUF blocks (the checkpoint's held ones, else rounded) or float."""
        kind, held = self._matrix_type(key, target, data.shape[1])
        if kind in BLOCK_TYPES:
            blocks = _held_blocks(self.src, key, kind) if held == kind else None
            if blocks is None:
                blocks = pack_rows(kind, *rtn_block_quantize(kind, data))
            writer.add_tensor(target, blocks.numpy(), raw_dtype=self.gguf.GGMLQuantizationType[kind])
        else:
            self._add_float(writer, target, data, kind)

    def _add_float(self, writer, target: str, data: torch.Tensor, kind: str) -> None:
        if kind == "BF16":
            writer.add_tensor(target, _float_array(data, kind), raw_dtype=self.gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(target, _float_array(data, kind))

    def add_experts(self, writer) -> None:
        """The folder's experts (``gguf_experts``) as llama.cpp's 3-D expert tensors: float weights in ``float_type``;
        quantized experts' GGUF blocks as they are (``stack_expert_blocks``), in the checkpoint's type."""
        for name, t in self.experts.items():
            parts = [self.src.tensor(k) for k in t.keys]
            if t.leaf == "qweight":
                blocks = take_part(t, stack_expert_blocks(parts[0] if t.stacked else parts))
                kind = expert_type(self.schemes, t, blocks.shape[0])
                writer.add_tensor(name, blocks.numpy(), raw_dtype=self.gguf.GGMLQuantizationType[kind])
            else:
                weights = parts[0] if t.stacked else torch.stack(parts)
                self._add_float(writer, name, take_part(t, weights.float()), self.float_type)


def _held_blocks(src: _Source, key: str, kind: str) -> torch.Tensor | None:
    """The ``kind`` blocks the checkpoint holds for the weight ``key`` (``round_gguf_embeddings_`` kept the ones the
    quantized model de-quantized), or ``None`` when it has none or they no longer de-quantize to the saved weight
    (then the weight is rounded again, with a warning)."""
    blocks_key = f"{key.rpartition('.')[0]}.{gguf_types.HELD_BLOCKS}"
    if blocks_key not in src:
        return None
    weight, blocks = src.tensor(key), src.tensor(blocks_key)
    try:
        values = dequantize_rows(kind, blocks, weight.shape[1])
    except ValueError:  # not the shape of kind's rows
        values = None
    if values is None or values.shape != weight.shape or not torch.equal(values.to(weight.dtype), weight):
        logger.warning("GGUF: %s: the %s blocks saved with it do not de-quantize to it (was it changed after "
                       "quantization?); rounding it to %s again", key, kind, kind)
        return None
    return blocks


def export_gguf(src_dir: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> Path:
    """``write_gguf`` into ``out_dir/model.gguf``: ``out_dir`` must not exist or be empty; the file is written in a
    temporary folder beside it and moved into place, so a failure leaves nothing behind. Returns the file."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FormatError(f"{out}: already exists and is not an empty folder; choose a new output folder (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_gguf(src_dir, tmp / GGUF_FILE, **kwargs)
        place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / GGUF_FILE
