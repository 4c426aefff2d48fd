"""``HFQuantConfig``: the quantization config transformers stores in ``config.json``.

Registered with transformers under ``quant_method: "hfquant"`` (see ``hfquant.integrations.transformers``).
It validates itself on construction, rejects unknown keys with the list of valid ones, round-trips
through ``to_dict``/``from_dict``, and keeps runtime-only objects (in-memory datasets, tokenizer objects)
out of ``config.json``.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from hfquant.core.errors import ConfigError
from hfquant.core.gguf_blocks import BLOCK_TYPES
from hfquant.core.gguf_grids import symmetric
from hfquant.core.grids import OBSERVERS
from hfquant.core.packing import SUPPORTED_BITS
from hfquant.core.schemes import MODULE_METHODS, validate_overrides

QUANT_METHOD = "hfquant"
METHODS = ("gptq", "rtn", "smoothquant")
WEIGHT_METHODS = ("rtn", "gptq")
ACTIVATION_SCHEMES = ("dynamic", "static")
SAVE_FORMATS = ("hfquant", "gptq", "compressed-tensors", "gguf")
# gguf_type values: a block type, or "Q4_K_M" (llama.cpp's mix around Q4_K; hfquant.mixed.gguf_types).
GGUF_TYPES = (*BLOCK_TYPES, "Q4_K_M")
# gguf_head_type / gguf_embedding_type values (export only: the head and embeddings are rounded to nearest).
GGUF_TENSOR_TYPES = (*BLOCK_TYPES, "F16", "BF16", "F32")
CHECKPOINT_FORMATS = ("hfquant", "gptq", "gptq_v2")
LM_HEAD_BITS = (8,)
# quality -> the fields it sets when they are not given (GPTQ and RTN; SmoothQuant accepts only "default").
# Chosen by measurement on SmolLM2, reported on two texts (and how the choice was made): BENCHMARKS.md
# "Accuracy beyond GPTQ".
QUALITY: dict[str, dict[str, Any]] = {
    "default": {"observer": "hessian"},
    "best": {"observer": "hessian", "gptaq": True, "reconstruct_steps": 16},
}

# name -> default; the order is the order of to_dict().
DEFAULTS: dict[str, Any] = {
    "method": "gptq",
    "quality": "default",
    "bits": 4,
    "group_size": 128,
    "sym": True,
    "desc_act": True,
    "static_groups": True,
    "true_sequential": True,
    "damp_percent": 0.01,
    "block_size": 128,
    "observer": "hessian",  # what quality "default" chooses
    "gptaq": False,
    "gptaq_alpha": 0.25,
    "reconstruct_steps": 0,
    "dataset": None,
    "dataset_config": None,
    "dataset_split": None,
    "dataset_column": None,
    "num_samples": 128,
    "seq_len": 512,
    "seed": 0,
    "calibration_batch_size": 8,
    "tokenizer": None,
    "modules_to_not_convert": None,
    "lm_head_bits": None,
    "alpha": "auto",
    "weight_method": "rtn",
    "activation_scheme": "dynamic",
    "save_format": "hfquant",
    "checkpoint_format": "hfquant",
    "overrides": None,
    "target_avg_bits": None,
    "max_ppl_increase": None,
    "candidates": None,
    "fisher_windows": 16,
    "module_schemes": None,
    "gguf_type": None,
    "gguf_head_type": None,
    "gguf_embedding_type": None,
}
# The GGUF fields of the weight-only methods.
GGUF_FIELDS = ("gguf_type", "gguf_head_type", "gguf_embedding_type")
# The quantization fields each method reads. A field another method reads, given for this one, would be ignored, so
# it is refused (``HFQuantConfig.post_init``); the recipe schema's ``quantization`` keys are these lists.
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "gptq": ("quality", "bits", "group_size", "sym", "desc_act", "static_groups", "true_sequential", "damp_percent",
             "block_size", "observer", "gptaq", "gptaq_alpha", "reconstruct_steps", "modules_to_not_convert",
             "overrides", "target_avg_bits", "max_ppl_increase", "candidates", "fisher_windows", "lm_head_bits",
             *GGUF_FIELDS, "save_format"),
    "rtn": ("quality", "bits", "group_size", "sym", "observer", "modules_to_not_convert", "overrides", "lm_head_bits",
            *GGUF_FIELDS, "save_format"),
    "smoothquant": ("alpha", "weight_method", "activation_scheme", "damp_percent", "block_size",
                    "modules_to_not_convert", "overrides"),
}
# Read by every method, whatever the lists above say (smoothquant also saves as compressed-tensors from Python).
_SHARED_FIELDS = ("save_format",)
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes up to 2**64 - 1; int64 everywhere else

# ``bits: auto`` chooses per module among these (bits, group_size) unless ``candidates`` says otherwise.
DEFAULT_CANDIDATES: tuple[dict, ...] = (
    {"bits": 2, "group_size": 64},
    {"bits": 3, "group_size": 128},
    {"bits": 4, "group_size": 128},
    {"bits": 8, "group_size": 128},
)
AUTO = "auto"


def _unread_fields(method: str) -> tuple[str, ...]:
    """The quantization fields other methods read and ``method`` does not."""
    every = {f for fields in METHOD_FIELDS.values() for f in fields}
    return tuple(sorted(every - set(METHOD_FIELDS[method]) - set(_SHARED_FIELDS)))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class HFQuantConfig(QuantizationConfigMixin):
    """Configuration of an hfquant quantization run, also stored with the quantized checkpoint.

    Args:
        method: ``"gptq"`` (calibrated, W4A16 and friends) or ``"rtn"`` (round-to-nearest, no data).
        quality: ``"default"`` or ``"best"``: which accuracy methods a GPTQ/RTN run uses unless their own fields
            are given (``QUALITY``). ``"default"``: the Hessian-weighted grid search (``observer: hessian``);
            ``"best"`` adds asymmetric calibration (``gptaq: true``) and 16 steps of block reconstruction
            (``reconstruct_steps: 16``): 4.4x the time of plain GPTQ on SmolLM2 (W4 g128 asym, measured). With ``gguf_type`` the grids
            are GGUF's own, so ``quality`` sets only ``gptaq``. SmoothQuant takes only ``"default"``.
            BENCHMARKS.md shows what each costs and gains.
        bits: weight bits, one of 2, 3, 4, 8, or ``"auto"`` (GPTQ only): choose a scheme per module from
            ``candidates`` to meet ``target_avg_bits`` or ``max_ppl_increase`` (see ``hfquant.mixed.budget``).
        group_size: input columns sharing one scale/zero; ``-1`` for one per output channel. Need not
            divide ``in_features``: the last group is then partial.
        sym: symmetric grid (zero point fixed at ``2**(bits-1)``) or asymmetric (zero point fitted).
        desc_act: GPTQ act-order: quantize columns by decreasing Hessian diagonal.
        static_groups: fit every group's grid before GPTQ updates (keeps ``g_idx`` monotone with act-order).
        true_sequential: inside a block, quantize q/k/v, then o, then gate/up, then down, each seeing the
            quantized outputs of the ones before.
        damp_percent: GPTQ dampening, a fraction of the mean Hessian diagonal; raised 10x on failure.
        block_size: GPTQ lazy-update block width.
        observer: ``"minmax"`` (reference grid), ``"mse"`` (range shrink search minimising ``|w - q|^2.4``) or
            ``"hessian"`` (per group, the grid with the smallest error weighted by each input column's importance:
            GPTQ's per-column loss weight; symmetric grids may take a negative scale so the largest weight lands on
            the longer half of the code range; see ``hfquant.core.grids``).
        gptaq: GPTQ with asymmetric calibration (GPTAQ): each layer is solved to match the *float* model's outputs
            (its input in the float model is carried alongside; about one more forward pass per block), not the
            float layer applied to the already-quantized model's inputs. ``gptaq_alpha`` in (0, 1] scales the
            correction (0.25 as in the paper's code). See ``hfquant.core.gptq.asymmetric_target``.
        reconstruct_steps: block-wise output reconstruction after each decoder block's GPTQ solves (AutoRound's
            idea, started from GPTQ's result): that many signed-gradient steps (one calibration batch each) tune
            each weight's rounding (at most one code step) and each group's scale so the block's outputs match the
            float model's; kept only where it lowers the block's output error. 0: off. Costs about two forward
            passes per step; see ``hfquant.calibration.reconstruct``.
        dataset: calibration text: ``None`` (bundled WikiText-2 valid), a list of strings, a local
            .txt/.json/.jsonl/.csv/.parquet path, or a Hub dataset id.
        dataset_config / dataset_split / dataset_column: for Hub ids and files with several columns.
        num_samples: calibration windows.
        seq_len: tokens per window.
        seed: seed of the window sampler.
        calibration_batch_size: windows per forward pass during calibration.
        tokenizer: tokenizer name/path (or object, not saved); defaults to the model's own.
        modules_to_not_convert: module names (or transformers skip patterns) to keep float; ``lm_head``
            and tied embeddings are kept float unless ``lm_head_bits`` is set.
        lm_head_bits: ``None`` (the output head stays float, the default, as in GPTQ tools) or ``8``: the head
            is rounded to nearest to 8-bit codes, one scale and zero per output channel (methods gptq/rtn,
            fixed bits, ``save_format: hfquant``). A head tied to the input embeddings is untied: the
            embeddings stay float. For small models the head is a large share of the weights read per
            token (SmolLM2-135M: 28 M of 135 M), see BENCHMARKS.md for its speed and accuracy.
        alpha: SmoothQuant migration strength in [0, 1], ``"auto"`` (per-group search over a grid, keeping
            the smallest W8A8 output error on calibration data) or ``None`` (no smoothing: plain W8A8).
        weight_method: SmoothQuant int8 weights by ``"rtn"`` (per channel) or ``"gptq"``.
        activation_scheme: SmoothQuant int8 activations ``"dynamic"`` (per token, at run time) or
            ``"static"`` (one per-tensor scale from calibration).
        save_format: layout ``save_pretrained`` writes: ``"hfquant"`` (reloads with ``import hfquant``),
            ``"gptq"`` (GPTQ v1 ``qweight``/``qzeros``/``scales``/``g_idx``, read by transformers+gptqmodel,
            vLLM, TGI) or ``"compressed-tensors"`` (``pack-quantized`` W4A16, ``int-quantized`` W8A8). See
            ``hfquant.formats``.
        checkpoint_format: layout of the pre-quantized weights being loaded: ``"hfquant"``, or ``"gptq"`` /
            ``"gptq_v2"`` when importing a GPTQ checkpoint (set by ``hfquant.formats.gptq_config``; it is
            reset to ``"hfquant"`` once the modules are converted).
        overrides: per-module schemes, ``{pattern: {bits?, group_size?, method?, sym?, skip?}}``; a pattern
            is an exact module name, a glob, or ``"re:<regex>"``; the most specific pattern wins (rule in
            ``hfquant.core.schemes``). ``method`` per module is ``"gptq"`` (GPTQ runs only) or ``"rtn"``;
            ``skip: true`` keeps the module float. SmoothQuant runs accept ``skip`` only.
        target_avg_bits: with ``bits="auto"``: the stored bits per quantized weight to stay within
            (codes + scales + zeros + g_idx, as saved), e.g. 3.5.
        max_ppl_increase: with ``bits="auto"``: the largest relative perplexity increase allowed on held-out
            WikiText-2 *valid* windows, e.g. 0.05 for 5%.
        candidates: with ``bits="auto"``: the ``{bits, group_size}`` schemes to choose from (default
            ``DEFAULT_CANDIDATES``).
        fisher_windows: with ``bits="auto"`` (and ``hfquant sensitivity``): calibration windows whose
            next-token-loss gradients weight each module's output error (``hfquant.mixed.sensitivity``), so the
            allocation minimises an estimate of the model's loss increase; 0 minimises the unweighted
            relative proxy loss instead.
        module_schemes: written by the run: the resolved ``{module: {bits, group_size, sym, method}}`` of
            every quantized module when overrides or ``bits="auto"`` were used; reload builds each module
            from it. Given at quantization time, it is used as is (exact names, no patterns).
        gguf_type: quantize (GPTQ or RTN) onto a llama.cpp GGUF grid: ``"Q8_0"``, ``"Q4_0"``, ``"Q5_0"``,
            ``"Q4_1"``, ``"Q4_K"``, ``"Q6_K"``, or ``"Q4_K_M"`` (llama.cpp's mix: Q4_K, with Q6_K for some
            layers' attn_v and ffn_down). It sets bits, group size and grid (given ``bits``/``group_size``/``sym``
            must agree); tensors whose row length the type cannot hold fall back as llama.cpp does (Q4_K -> Q5_0,
            Q6_K -> Q8_0). The modules hold the GGUF blocks (``QuantLinearGGUF``); ``save_format: gguf`` or
            ``hfquant export --format gguf`` writes the ``.gguf`` file.
        gguf_head_type / gguf_embedding_type: the output head's and token embeddings' type in the GGUF file
            (rounded to nearest at export); ``None`` follows llama.cpp (head Q6_K, or Q8_0 when its rows are not
            a multiple of 256; untied embeddings in ``gguf_type``'s type).
    """

    def __init__(self, **kwargs):
        kwargs.pop("quant_method", None)
        unknown = sorted(set(kwargs) - set(DEFAULTS))
        if unknown:
            raise ConfigError(
                f"HFQuantConfig: unknown key(s) {unknown}; valid keys are {sorted(DEFAULTS)}"
            )
        self.quant_method = QUANT_METHOD
        for key, default in DEFAULTS.items():
            setattr(self, key, copy.deepcopy(kwargs.get(key, default)))
        self._given = frozenset(kwargs)
        self.post_init()

    # transformers calls cls(**dict) in from_dict; keep that behaviour and our validation. A saved config holds every
    # field (``to_dict``), also those its method does not read (at their defaults): they are dropped here, so a
    # checkpoint loads whatever they say, while a config built by hand refuses them (``_check_method_fields``).
    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        merged = {**config_dict, **kwargs}
        method = merged.get("method", DEFAULTS["method"])
        unread = _unread_fields(method) if method in METHOD_FIELDS else ()
        config = cls(**{k: v for k, v in merged.items() if k not in unread})
        return (config, {}) if return_unused_kwargs else config

    def post_init(self) -> None:
        """Validate every field; raise ``ConfigError`` naming the field, the value and what is accepted."""
        def bad(field, expected):
            raise ConfigError(f"HFQuantConfig.{field}: got {getattr(self, field)!r}; expected {expected}")

        if self.method not in METHODS:
            bad("method", f"one of {list(METHODS)}")
        self._apply_quality(bad)
        if self.gguf_type is not None:
            self._apply_gguf_type(bad)
        elif self.bits != AUTO and (not _is_int(self.bits) or self.bits not in SUPPORTED_BITS):
            bad("bits", f"one of {list(SUPPORTED_BITS)} or \"auto\"")
        if not _is_int(self.group_size) or not (self.group_size == -1 or self.group_size > 0):
            bad("group_size", "-1 (one group per output channel) or a positive integer such as 128")
        for flag in ("sym", "desc_act", "static_groups", "true_sequential"):
            if not isinstance(getattr(self, flag), bool):
                bad(flag, "true or false")
        if isinstance(self.damp_percent, bool) or not isinstance(self.damp_percent, (int, float)) or not 0 <= self.damp_percent <= 1:
            bad("damp_percent", "a number in [0, 1], e.g. 0.01")
        if not _is_int(self.block_size) or self.block_size <= 0:
            bad("block_size", "a positive integer, e.g. 128")
        if self.observer not in OBSERVERS:
            bad("observer", f"one of {list(OBSERVERS)}")
        if not isinstance(self.gptaq, bool):
            bad("gptaq", "true or false")
        a = self.gptaq_alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a <= 1:
            bad("gptaq_alpha", "a number in (0, 1], e.g. 0.25")
        if self.gptaq and self.method != "gptq":
            bad("gptaq", f"false for method {self.method!r} (asymmetric calibration is a GPTQ option)")
        r = self.reconstruct_steps
        if not _is_int(r) or r < 0:
            bad("reconstruct_steps", "a number of steps >= 0 (0: no block reconstruction), e.g. 32")
        if r and self.method != "gptq":
            bad("reconstruct_steps", f"0 for method {self.method!r} (block reconstruction follows GPTQ's solves)")
        if r and self.gguf_type is not None:
            bad("reconstruct_steps", "0 with gguf_type (GGUF blocks keep llama.cpp's fitted grids)")
        for field in ("num_samples", "seq_len", "calibration_batch_size"):
            if not _is_int(getattr(self, field)) or getattr(self, field) <= 0:
                bad(field, "a positive integer")
        if not _is_int(self.seed) or not 0 <= self.seed <= SEED_MAX:
            bad("seed", f"an integer in [0, 2**63 - 1] ({SEED_MAX}), e.g. 0")
        t = self.tokenizer
        if t is not None and not (isinstance(t, str) and t.strip()) and not (callable(t) and hasattr(t, "encode")):
            bad("tokenizer", "null (the model's own), a tokenizer name or folder (a non-empty string), or a loaded "
                             "tokenizer object (e.g. from AutoTokenizer.from_pretrained)")
        d = self.dataset
        if d is not None and (not isinstance(d, (str, list, tuple)) or (isinstance(d, str) and not d.strip())):
            bad("dataset", "null (the bundled WikiText-2), a list of strings, a local file path or a Hub dataset id")
        for field in ("dataset_config", "dataset_split", "dataset_column"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                bad(field, "a non-empty string or null")
        if not (self.alpha is None or self.alpha == "auto" or (
                isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and 0 <= self.alpha <= 1)):
            bad("alpha", 'a number in [0, 1], "auto", or null (no smoothing)')
        if self.weight_method not in WEIGHT_METHODS:
            bad("weight_method", f"one of {list(WEIGHT_METHODS)}")
        if self.activation_scheme not in ACTIVATION_SCHEMES:
            bad("activation_scheme", f"one of {list(ACTIVATION_SCHEMES)}")
        if self.save_format not in SAVE_FORMATS:
            bad("save_format", f"one of {list(SAVE_FORMATS)}")
        if self.save_format == "gguf" and self.gguf_type is None:
            bad("save_format", "gguf only with gguf_type set (e.g. gguf_type: Q4_K_M), or another save_format")
        for field in ("gguf_head_type", "gguf_embedding_type"):
            if getattr(self, field) is not None and getattr(self, field) not in GGUF_TENSOR_TYPES:
                bad(field, f"null (llama.cpp's choice) or one of {list(GGUF_TENSOR_TYPES)}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            bad("checkpoint_format", f"one of {list(CHECKPOINT_FORMATS)}")
        m = self.modules_to_not_convert
        if m is not None and (not isinstance(m, (list, tuple)) or not all(isinstance(x, str) for x in m)):
            bad("modules_to_not_convert", "a list of module names")
        if self.lm_head_bits is not None:
            if not _is_int(self.lm_head_bits) or self.lm_head_bits not in LM_HEAD_BITS:
                bad("lm_head_bits", f"null (float head) or one of {list(LM_HEAD_BITS)}")
            if self.method == "smoothquant" or self.bits == AUTO:
                bad("lm_head_bits", f"null for method {self.method!r} with bits {self.bits!r}; an 8-bit head needs "
                                    "method gptq or rtn with fixed bits")
            if self.save_format != "hfquant":
                bad("lm_head_bits", f"null with save_format {self.save_format!r} (GPTQ and compressed-tensors "
                                    "checkpoints are written with a float head); use save_format hfquant")
        self._check_mixed(bad)
        self._check_method_fields()

    def _check_method_fields(self) -> None:
        """A field only other methods read (``METHOD_FIELDS``), given for this one, would be silently ignored."""
        for key in sorted(set(getattr(self, "_given", ())) & set(_unread_fields(self.method))):
            users = [m for m, fields in METHOD_FIELDS.items() if key in fields]
            raise ConfigError(f"HFQuantConfig.{key}: got {getattr(self, key)!r}, but method {self.method!r} does not "
                              f"use {key} (methods {users} do); remove it, or choose one of those methods")

    def _apply_quality(self, bad) -> None:
        """Set the fields ``quality`` chooses that were not given (``QUALITY``), where they apply to the method."""
        if self.quality not in QUALITY:
            bad("quality", f"one of {list(QUALITY)}")
        if self.method == "smoothquant":
            if self.quality != "default":
                bad("quality", '"default" for method smoothquant (the quality settings are weight-only GPTQ/RTN '
                               "methods; SmoothQuant's own are alpha and weight_method)")
            return
        given = getattr(self, "_given", frozenset())
        for key, value in QUALITY[self.quality].items():
            if key in given or (key in ("gptaq", "reconstruct_steps") and self.method != "gptq"):
                continue
            if key == "reconstruct_steps" and self.gguf_type is not None:
                continue  # GGUF blocks keep llama.cpp's fitted grids
            setattr(self, key, value)
        if self.gguf_type is not None and "observer" not in given:
            self.observer = "minmax"  # GGUF grids are fitted as llama.cpp fits them

    def _apply_gguf_type(self, bad) -> None:
        """Check ``gguf_type`` against the fields it fixes, then set them from the type."""
        if self.gguf_type not in GGUF_TYPES:
            bad("gguf_type", f"one of {list(GGUF_TYPES)} or null")
        bt = BLOCK_TYPES["Q4_K" if self.gguf_type == "Q4_K_M" else self.gguf_type]
        fixed = {"bits": bt.bits, "group_size": bt.group_size, "sym": symmetric(bt.name)}
        for key, value in fixed.items():
            if key in getattr(self, "_given", ()) and getattr(self, key) != value:
                raise ConfigError(f"HFQuantConfig.{key}: got {getattr(self, key)!r}, but gguf_type {self.gguf_type!r} "
                                  f"stores {key} {value!r}; drop {key} (gguf_type sets it) or choose another gguf_type")
            setattr(self, key, value)
        if self.method not in WEIGHT_METHODS:
            bad("method", f"gptq or rtn with gguf_type (GGUF files hold weight-only grids); got {self.method!r}")
        if self.desc_act and not self.static_groups:
            bad("static_groups", "true with gguf_type and desc_act (a GGUF block holds consecutive columns, so "
                                 "act-order needs static groups), or set desc_act false")
        if self.lm_head_bits is not None:
            bad("lm_head_bits", "null with gguf_type (the GGUF head type is gguf_head_type)")
        if self.observer != "minmax":
            bad("observer", "minmax with gguf_type (GGUF grids are fitted as llama.cpp fits them)")
        for pattern, fields in (self.overrides or {}).items():
            if set(fields) - {"skip", "method", "gguf_type"}:
                raise ConfigError(f"HFQuantConfig.overrides[{pattern!r}]: with gguf_type only skip, method and gguf_type "
                                  f"can be overridden, got {sorted(set(fields) - {'skip', 'method', 'gguf_type'})}")

    def _check_mixed(self, bad) -> None:
        validate_overrides(self.overrides)
        auto = self.bits == AUTO
        if auto and self.method != "gptq":
            bad("bits", f'an integer for method {self.method!r}; "auto" needs method "gptq"')
        for field in ("target_avg_bits", "max_ppl_increase", "candidates"):
            if getattr(self, field) is not None and not auto:
                bad(field, 'null unless bits is "auto"')
        if auto and (self.target_avg_bits is None) == (self.max_ppl_increase is None):
            bad("bits", '"auto" with exactly one of target_avg_bits (e.g. 3.5) or max_ppl_increase (e.g. 0.05)')
        t = self.target_avg_bits
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 1 < t <= 16):
            bad("target_avg_bits", "a number of stored bits per weight in (1, 16], e.g. 3.5")
        m = self.max_ppl_increase
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= 10):
            bad("max_ppl_increase", "a relative increase in (0, 10], e.g. 0.05 for 5%")
        f = self.fisher_windows
        if not _is_int(f) or f < 0:
            bad("fisher_windows", "a number of calibration windows >= 0 (0: no loss-gradient weighting), e.g. 16")
        c = self.candidates
        if c is not None:
            if not isinstance(c, (list, tuple)) or not c:
                bad("candidates", "a non-empty list of {bits, group_size}")
            for item in c:
                if (not isinstance(item, dict) or set(item) != {"bits", "group_size"} or not _is_int(item["bits"])
                        or item["bits"] not in SUPPORTED_BITS or not _is_int(item["group_size"])
                        or not (item["group_size"] == -1 or item["group_size"] > 0)):
                    bad("candidates", f"a list of {{bits: one of {list(SUPPORTED_BITS)}, group_size: -1 or > 0}}")
        if self.overrides and self.gguf_type is None and any("gguf_type" in f for f in self.overrides.values()):
            raise ConfigError("HFQuantConfig.overrides: gguf_type overrides need the run's gguf_type set (e.g. gguf_type: Q4_K)")
        if auto and self.gguf_type is not None:
            bad("bits", 'an integer with gguf_type ("auto" does not choose GGUF types; Q4_K_M is llama.cpp\'s mix)')
        if self.overrides and (self.method == "smoothquant" or auto):
            for pattern, fields in self.overrides.items():
                if set(fields) - {"skip"}:
                    what = "SmoothQuant" if self.method == "smoothquant" else 'bits "auto"'
                    raise ConfigError(f"HFQuantConfig.overrides[{pattern!r}]: {what} supports only skip overrides, "
                                      f"got {sorted(set(fields) - {'skip'})}; remove them or use method gptq/rtn with fixed bits")
        if self.overrides and self.method == "rtn":
            for pattern, fields in self.overrides.items():
                if fields.get("method") == "gptq":
                    raise ConfigError(f"HFQuantConfig.overrides[{pattern!r}].method: gptq needs calibration data; "
                                      "use method gptq for the run (modules can then be rtn per override)")
        ms = self.module_schemes
        if ms is not None:
            ok = isinstance(ms, dict) and all(
                isinstance(k, str) and isinstance(v, dict)
                and set(v) - {"gguf_type"} == {"bits", "group_size", "sym", "method"}
                and v.get("gguf_type", None) in (None, *BLOCK_TYPES)
                and (v["bits"] in SUPPORTED_BITS or "gguf_type" in v) and _is_int(v["group_size"])
                and isinstance(v["sym"], bool) and v["method"] in MODULE_METHODS for k, v in ms.items())
            if not ok:
                bad("module_schemes", "a mapping module name -> {bits, group_size, sym, method}")

    def to_dict(self) -> dict[str, Any]:
        """Serializable fields only: in-memory datasets and tokenizer objects become ``None``."""
        out = {"quant_method": self.quant_method}
        for key in DEFAULTS:
            value = getattr(self, key)
            if key == "dataset" and not isinstance(value, str):
                value = None
            if key == "tokenizer" and not isinstance(value, str):
                value = None
            if isinstance(value, tuple):
                value = list(value)
            out[key] = copy.deepcopy(value)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """Fields that differ from the defaults (plus ``quant_method``)."""
        full = self.to_dict()
        return {k: v for k, v in full.items() if k == "quant_method" or v != DEFAULTS.get(k)}

    def __eq__(self, other) -> bool:
        return isinstance(other, HFQuantConfig) and self.to_dict() == other.to_dict()

    # Unhashable on purpose: equality compares the fields, and the fields are mutable (a quantizer fills in
    # module_schemes, users set save_format), so a hash would change under a set or dict key that holds it.
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_diff_dict().items() if k != "quant_method")
        return f"HFQuantConfig({fields})"
