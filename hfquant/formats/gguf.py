"""Write a llama.cpp GGUF file from a saved model folder: an hfquant checkpoint quantized with ``gguf_type``
(its ``QuantLinearGGUF`` blocks are copied byte for byte), or a plain float checkpoint (``float_type``: F32,
F16 or BF16, e.g. as the input of llama.cpp's own quantizer).

The container, the metadata keys, the tensor names and the block constants come from the ``gguf`` package
(``GGUFWriter``, ``TensorNameMap``); this module decides what goes in:

* architecture metadata for the Llama family (``llama``, ``mistral`` -> GGUF ``llama``; ``qwen2``);
* tensors in llama.cpp's names; for GGUF ``llama`` the q/k projections' rows are permuted from the HF rotary
  layout to llama.cpp's (as llama.cpp's converter does; transformers' GGUF loader permutes them back);
* the output head and token embeddings in their type (``hfquant.mixed.gguf_types``: Q6_K / Q8_0 as llama.cpp
  chooses, or ``head_type`` / ``embedding_type``): the blocks the checkpoint holds for them (``HELD_BLOCKS``, the
  ones the quantized model de-quantized) copied as they are, else rounded to nearest; norms in F32, float Linears
  the quantizer kept (rows no block fits) in F16;
* the tokenizer from the folder's ``tokenizer.json`` (byte-level BPE: vocabulary, token types, merges, special
  token ids, chat template).
"""

from __future__ import annotations

from collections import Counter
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import safe_open
import torch
import transformers

from hfquant.calibration.graph import is_quantizable, set_submodule
from hfquant.config import GGUF_TENSOR_TYPES, HFQuantConfig
from hfquant.core.errors import FormatError
from hfquant.core.gguf_blocks import BLOCK_TYPES, dequantize_rows, pack_rows
from hfquant.core.gguf_grids import rtn_block_quantize, symmetric
from hfquant.formats.files import CheckpointError, place
from hfquant.mixed import gguf_types
from hfquant.nn.gguf import QuantLinearGGUF

logger = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"
FLOAT_TYPES = ("F32", "F16", "BF16")
_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# tokenizer.ggml.pre: llama.cpp's pre-tokenizer, by model family (llama.cpp tells them by hashing a test string).
_PRE_BY_VOCAB = {("llama", 49152): "smollm", ("llama", 128256): "llama-bpe"}
_PRE_BY_TYPE = {"qwen2": "qwen2"}
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0",
               "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q8_0": "MOSTLY_Q8_0", "Q4_K": "MOSTLY_Q4_K_S",
               "Q4_K_M": "MOSTLY_Q4_K_M", "Q6_K": "MOSTLY_Q6_K"}


def _gguf():
    try:
        import gguf  # optional dependency: needed only to write GGUF files
    except ImportError:
        raise FormatError("writing GGUF needs the gguf package: pip install gguf") from None
    return gguf


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
        if model_type not in _ARCHS:
            raise FormatError(f"{folder}: model_type {model_type!r} has no GGUF writer here; supported: "
                              f"{sorted(_ARCHS)} (the Llama family)")
        self.model_type, self.arch = model_type, _ARCHS[model_type]
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


def _name_map(gguf, arch: str, n_layers: int):
    """The gguf package's HF -> llama.cpp tensor names for GGUF architecture ``arch``."""
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, n_layers)


def _rotary_heads(arch: str, module: str, heads: int, kv_heads: int) -> int | None:
    """The head count whose rotary row order differs between HF and llama.cpp for ``module`` (GGUF ``llama``'s q and
    k projections), else ``None``."""
    if arch != "llama":
        return None
    return heads if module.endswith("q_proj") else kv_heads if module.endswith("k_proj") else None


def _permute_rows(rows: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """HF's rotary row order -> llama.cpp's (``inverse``: back), per head: rows ``(2, half)`` become ``(half, 2)``
    interleaved."""
    shape = rows.shape
    split = (2, shape[0] // n_head // 2)
    return rows.reshape(n_head, *(split[::-1] if inverse else split), *shape[1:]).swapaxes(1, 2).reshape(shape)


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
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=size).add_to_gguf(writer)


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
    gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(tokens)).add_to_gguf(writer)


def _add_metadata(writer, cfg: dict, file_type, name: str) -> None:
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    rope = cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {})
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in ("default", None):
        raise FormatError(f"rope_scaling type {kind!r} is not written by hfquant's GGUF exporter yet; only models "
                          "without rope scaling (e.g. SmolLM2, Llama 2, Mistral 7B, Qwen2 base) are supported")
    theta = cfg.get("rope_theta") or (rope.get("rope_theta") if isinstance(rope, dict) else None) or 10000.0
    writer.add_name(name)
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(cfg.get("head_dim") or hidden // heads)
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)


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
    gguf = _gguf()
    if float_type not in FLOAT_TYPES:
        raise FormatError(f"float type: got {float_type!r}; expected one of {list(FLOAT_TYPES)}")
    src = _Source(Path(src_dir))
    cfg, q = src.config, src.qconfig
    run_type = q["gguf_type"] if q else float_type
    head_type = head_type or (q or {}).get("gguf_head_type")
    embedding_type = embedding_type or (q or {}).get("gguf_embedding_type")
    n_layers = cfg["num_hidden_layers"]
    names = _name_map(gguf, src.arch, n_layers)
    tied = bool(cfg.get("tie_word_embeddings", False))
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    quantized = {k[: -len(".qweight")]: (q.get("module_schemes") or {}).get(k[: -len(".qweight")], {}).get("gguf_type")
                 for k in src.keys() if k.endswith(".qweight")} if q else {}
    writer = gguf.GGUFWriter(str(out_file), src.arch)
    _add_metadata(writer, cfg, getattr(gguf.LlamaFileType, _FILE_TYPES[run_type]),
                  Path(src_dir).resolve().name)
    _add_tokenizer(gguf, writer, src, _tokenizer_folder(src, tokenizer_dir))
    for key in src.keys():
        module, _, leaf = key.rpartition(".")
        if (key == "lm_head.weight" and tied) or leaf == gguf_types.HELD_BLOCKS:  # held blocks: with their weight
            continue
        if leaf == "qweight":
            target = names.get_name(module + ".weight", try_suffixes=(".weight",))
            t = quantized.get(module)
            if t is None:
                raise FormatError(f"{src.folder}: {module} has GGUF blocks but no gguf_type in module_schemes; re-save it")
            data = src.tensor(key)
        else:
            target = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if module in quantized:
                if leaf == "bias" and src.arch == "llama":
                    raise FormatError(f"{key}: GGUF llama has no Linear biases")
            data = src.tensor(key).float()
        if target is None:
            raise FormatError(f"{key}: no llama.cpp tensor name for it in GGUF {src.arch!r}; the exporter cannot place it")
        permute = _rotary_heads(src.arch, module, heads, kv_heads)
        if permute is not None:
            data = _permute_rows(data, permute)
        if leaf == "qweight":
            writer.add_tensor(target, data.contiguous().numpy(), raw_dtype=gguf.GGMLQuantizationType[t])
            continue
        if data.dim() == 1:
            writer.add_tensor(target, data.numpy())
            continue
        cols = data.shape[1]
        held = None  # the type the checkpoint's own config gives the tensor (its held blocks are of that type)
        if key == "lm_head.weight" or (tied and target.startswith("token_embd")):
            kind = gguf_types.head_type(run_type, cols, head_type) if q else (head_type or float_type)
            held = gguf_types.head_type(run_type, cols, q.get("gguf_head_type")) if q else None
        elif target.startswith("token_embd"):
            kind = gguf_types.embedding_type(run_type, cols, embedding_type) if q else (embedding_type or float_type)
            held = gguf_types.embedding_type(run_type, cols, q.get("gguf_embedding_type")) if q else None
        else:
            kind = float_type
        if kind in BLOCK_TYPES:
            blocks = _held_blocks(src, key, kind) if held == kind else None
            if blocks is None:
                blocks = pack_rows(kind, *rtn_block_quantize(kind, data))
            writer.add_tensor(target, blocks.numpy(), raw_dtype=gguf.GGMLQuantizationType[kind])
        elif kind == "BF16":
            writer.add_tensor(target, _float_array(data, kind), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(target, _float_array(data, kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out_file)


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


def read_gguf_header(file: str | os.PathLike) -> dict:
    """What the GGUF ``file`` holds, from its header (no tensor data is read): ``architecture``, ``name``,
    ``types`` (``{tensor type: {"tensors", "elements", "bytes"}}``), ``linears`` (the same totals over the block-type
    weights of the decoder layers: ``stored_bits`` = their bits per weight) and ``bytes`` (the file's size).
    ``CheckpointError`` (one line) when the file is not a readable GGUF file."""
    gguf = _gguf()
    file = Path(file)
    try:
        reader = gguf.GGUFReader(str(file))
        fields = {k: reader.fields[k].contents() for k in ("general.architecture", "general.name")
                  if k in reader.fields}
        rows = [(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in reader.tensors]
    except Exception as exc:  # noqa: BLE001 - the gguf package raises ValueError, IndexError, OSError, ...
        detail = (str(exc).splitlines() or [""])[0][:120] or type(exc).__name__
        raise CheckpointError(f"{str(file)!r}: not a readable GGUF file ({detail}); write it again (`hfquant run`, "
                              "`hfquant export --format gguf`) or re-download it") from None
    types: dict[str, dict] = {}
    linears = {"tensors": 0, "elements": 0, "bytes": 0}
    for name, kind, elements, nbytes in rows:
        for totals in [types.setdefault(kind, {"tensors": 0, "elements": 0, "bytes": 0})] + (
                [linears] if name.startswith("blk.") and kind in BLOCK_TYPES else []):
            totals["tensors"] += 1
            totals["elements"] += elements
            totals["bytes"] += nbytes
    linears["stored_bits"] = linears["bytes"] * 8 / linears["elements"] if linears["elements"] else None
    return {"architecture": fields.get("general.architecture"), "name": fields.get("general.name"), "types": types,
            "linears": linears, "bytes": file.stat().st_size}


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, float_ok: bool = False):
    """Load a GGUF file (``.gguf`` path, or a folder holding one ``.gguf``) into hfquant modules: transformers'
    GGUF loader builds the model (config, tokenizer-free; norms and embeddings de-quantized), then every Linear
    stored as Q8_0, Q4_0, Q5_0, Q4_1, Q4_K or Q6_K becomes a ``QuantLinearGGUF`` holding the file's blocks
    exactly (q/k rows back in the HF rotary layout); the head's and token embeddings' blocks are kept beside their
    de-quantized weights (``gguf_types.HELD_BLOCKS``). ``model.config.quantization_config`` records each tensor's
    type, so the model saves (hfquant layout), reloads and exports back to GGUF byte for byte.

    A file without such a Linear (a float export) raises ``FormatError``, unless ``float_ok``: then the float model
    transformers built is returned as it is (no ``quantization_config``)."""
    gguf = _gguf()
    file = Path(path)
    if file.is_dir():
        found = sorted(file.glob("*.gguf"))
        if len(found) != 1:
            raise FormatError(f"{file}: expected exactly one .gguf file, found {len(found)}; pass the file's path")
        file = found[0]
    if not file.is_file():
        raise FormatError(f"{file}: no such GGUF file")
    reader = gguf.GGUFReader(str(file))
    model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype)
    if getattr(model, "hf_quantizer", None) is not None:  # transformers' GGUF loader: its weights are float now
        model.hf_quantizer.remove_quantization_config(model)
    cfg = model.config
    arch = _ARCHS.get(cfg.model_type)
    if arch is None:
        raise FormatError(f"{file}: model_type {cfg.model_type!r}; load_gguf handles {sorted(_ARCHS)}")
    names = _name_map(gguf, arch, cfg.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    schemes = {}
    for name, module in list(model.named_modules()):
        if not name or not is_quantizable(module) or module is model.get_output_embeddings():
            continue
        target = names.get_name(name + ".weight", try_suffixes=(".weight",))
        t = tensors.get(target) if target else None
        if t is None or t.tensor_type.name not in BLOCK_TYPES:
            continue
        data = torch.from_numpy(t.data.copy()).reshape(module.out_features, -1)
        n = _rotary_heads(arch, name, heads, kv_heads)
        if n is not None:  # llama.cpp's rotary row order -> HF's
            data = _permute_rows(data, n, inverse=True)
        kind = t.tensor_type.name
        set_submodule(model, name, QuantLinearGGUF.from_blocks(module, data, kind, dtype))
        bt = BLOCK_TYPES[kind]
        schemes[name] = {"bits": bt.bits, "group_size": bt.group_size, "sym": symmetric(kind), "method": "rtn",
                         "gguf_type": kind}
    if not schemes:
        if float_ok:
            return model
        raise FormatError(f"{file}: no Linear stored in a block type hfquant reads ({sorted(BLOCK_TYPES)})")
    main = Counter(s["gguf_type"] for s in schemes.values()).most_common(1)[0][0]
    types = _hold_embedding_blocks(model, tensors)
    cfg.quantization_config = HFQuantConfig(gguf_type=main, method="rtn", module_schemes=schemes,
                                            gguf_head_type=types.get("output"),
                                            gguf_embedding_type=types.get("token_embd"))
    return model


def _hold_embedding_blocks(model, tensors: dict) -> dict[str, str]:
    """Keep the file's token-embedding (``token_embd``) and head (``output``) blocks in the modules'
    ``HELD_BLOCKS`` buffers, so a save and export writes them unchanged. Returns the types ``HFQuantConfig`` can
    state: ``{"output": the head's type (token_embd's when tied), "token_embd": untied embeddings' type}``."""
    tied = "output.weight" not in tensors
    pairs = [("token_embd", model.get_input_embeddings())]
    if not tied:
        pairs.append(("output", model.get_output_embeddings()))
    types = {}
    for gguf_name, module in pairs:
        t, weight = tensors.get(f"{gguf_name}.weight"), getattr(module, "weight", None)
        if t is None or weight is None:
            continue
        kind = t.tensor_type.name
        if kind in GGUF_TENSOR_TYPES:
            types["output" if tied else gguf_name] = kind
        if kind in BLOCK_TYPES:
            module.register_buffer(gguf_types.HELD_BLOCKS, torch.from_numpy(t.data.copy()).reshape(weight.shape[0], -1))
    return types
