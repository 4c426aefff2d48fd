"""The sections of ``HFQuantConfig``: small dataclasses, each checking its own fields.

Every field says, once, which methods read it and its flat name (``read_by``): ``HFQuantConfig``'s field table
(``hfquant.config.fields``) is built from these declarations, and from it ``METHOD_FIELDS``, ``DEFAULTS`` and the
recipe's keys. A section built by hand checks itself on construction and remembers which fields it was given
(``_given``: ``quality`` and ``gguf_type`` fill in only what was not chosen). The rules between sections (a field
of another method, ``quality``, ``gguf_type`` against the grid, ``bits: auto``) are ``HFQuantConfig.post_init``'s.
Errors name the flat field: ``HFQuantConfig.bits: got 5; expected ...``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import field
from typing import Any

from hfquant.config.constants import (
    _is_int, _is_number, ACTIVATION_SCHEMES, AUTO, GGUF_TENSOR_TYPES, GGUF_TYPES, LM_HEAD_BITS, reject, SEED_MAX,
    WEIGHT_METHODS,
)
from hfquant.core.grids import OBSERVERS
from hfquant.core.packing import SUPPORTED_BITS
from hfquant.core.schemes import validate_overrides
from hfquant.core.weight_format import scheme_entry_ok


def read_by(*methods: str, flat: str | None = None, every_method: bool = False) -> dict[str, Any]:
    """A field's entry in the field table: the methods that read it (they accept it, ``METHOD_FIELDS``; given for
    another method it is refused), its flat name (``config.json``, ``HFQuantConfig(**kwargs)``, the recipe's
    ``quantization`` keys) when that is not its own, and whether every method reads it whatever ``methods`` says."""
    return {"methods": methods, "flat": flat, "every_method": every_method}


class Section:
    """Base of the sections: checks itself after ``__init__`` (``validate``); errors name the flat field."""

    _given: frozenset = frozenset()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - every section defines it
        raise NotImplementedError

    @classmethod
    def flat_name(cls, name: str) -> str:
        return cls.__dataclass_fields__[name].metadata.get("flat") or name

    def _bad(self, name: str, expected: str):
        reject(self.flat_name(name), getattr(self, name), expected)


def section(cls):
    """``dataclass`` that records which fields the caller gave (``_given``, positional or keyword)."""
    cls = dataclasses.dataclass(cls)
    generated = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(generated)
    def __init__(self, *args, **kwargs):
        self._given = frozenset(names[:len(args)]) | frozenset(kwargs)
        generated(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def unchecked(cls, values: dict[str, Any], given=()) -> Section:
    """A section holding ``values`` (every field), not checked yet: ``HFQuantConfig.post_init`` checks it once the
    rules across sections (``quality``, ``gguf_type``) have filled it in."""
    obj = object.__new__(cls)
    obj.__dict__.update(values)
    obj._given = frozenset(given)
    return obj


@section
class GPTQArgs(Section):
    """The weight grid and the GPTQ solver (RTN reads the grid fields; SmoothQuant's ``weight_method: gptq`` reads
    ``damp_percent`` and ``block_size``).

    Args:
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
        lm_head_bits: ``None`` (the output head stays float, the default, as in GPTQ tools) or ``8``: the head
            is rounded to nearest to 8-bit codes, one scale and zero per output channel (methods gptq/rtn,
            fixed bits, ``save_format: hfquant``). A head tied to the input embeddings is untied: the
            embeddings stay float. For small models the head is a large share of the weights read per
            token (SmolLM2-135M: 28 M of 135 M), see BENCHMARKS.md for its speed and accuracy.
    """

    bits: Any = field(default=4, metadata=read_by("gptq", "rtn"))
    group_size: int = field(default=128, metadata=read_by("gptq", "rtn"))
    sym: bool = field(default=True, metadata=read_by("gptq", "rtn"))
    desc_act: bool = field(default=True, metadata=read_by("gptq"))
    static_groups: bool = field(default=True, metadata=read_by("gptq"))
    true_sequential: bool = field(default=True, metadata=read_by("gptq"))
    damp_percent: float = field(default=0.01, metadata=read_by("gptq", "smoothquant"))
    block_size: int = field(default=128, metadata=read_by("gptq", "smoothquant"))
    observer: str = field(default="hessian", metadata=read_by("gptq", "rtn"))  # what quality "default" chooses
    gptaq: bool = field(default=False, metadata=read_by("gptq"))
    gptaq_alpha: float = field(default=0.25, metadata=read_by("gptq"))
    reconstruct_steps: int = field(default=0, metadata=read_by("gptq"))
    lm_head_bits: int | None = field(default=None, metadata=read_by("gptq", "rtn"))

    def validate(self, gguf: bool = False) -> None:
        self.check_grid(gguf)
        self.check_head()

    def check_grid(self, gguf: bool = False) -> None:
        """Every field but ``lm_head_bits``. ``gguf``: ``gguf_type`` has set ``bits`` (5 and 6 included), so they
        are not checked here."""
        if not gguf and self.bits != AUTO and (not _is_int(self.bits) or self.bits not in SUPPORTED_BITS):
            self._bad("bits", f"one of {list(SUPPORTED_BITS)} or \"auto\"")
        if not _is_int(self.group_size) or not (self.group_size == -1 or self.group_size > 0):
            self._bad("group_size", "-1 (one group per output channel) or a positive integer such as 128")
        for flag in ("sym", "desc_act", "static_groups", "true_sequential"):
            if not isinstance(getattr(self, flag), bool):
                self._bad(flag, "true or false")
        if not _is_number(self.damp_percent) or not 0 <= self.damp_percent <= 1:
            self._bad("damp_percent", "a number in [0, 1], e.g. 0.01")
        if not _is_int(self.block_size) or self.block_size <= 0:
            self._bad("block_size", "a positive integer, e.g. 128")
        if self.observer not in OBSERVERS:
            self._bad("observer", f"one of {list(OBSERVERS)}")
        if not isinstance(self.gptaq, bool):
            self._bad("gptaq", "true or false")
        if not _is_number(self.gptaq_alpha) or not 0 < self.gptaq_alpha <= 1:
            self._bad("gptaq_alpha", "a number in (0, 1], e.g. 0.25")
        if not _is_int(self.reconstruct_steps) or self.reconstruct_steps < 0:
            self._bad("reconstruct_steps", "a number of steps >= 0 (0: no block reconstruction), e.g. 32")

    def check_head(self) -> None:
        if self.lm_head_bits is not None and (not _is_int(self.lm_head_bits) or self.lm_head_bits not in LM_HEAD_BITS):
            self._bad("lm_head_bits", f"null (float head) or one of {list(LM_HEAD_BITS)}")


@section
class SmoothQuantArgs(Section):
    """SmoothQuant W8A8.

    Args:
        alpha: migration strength in [0, 1], ``"auto"`` (per-group search over a grid, keeping the smallest W8A8
            output error on calibration data) or ``None`` (no smoothing: plain W8A8).
        weight_method: int8 weights by ``"rtn"`` (per channel) or ``"gptq"``.
        activation_scheme: int8 activations ``"dynamic"`` (per token, at run time) or ``"static"`` (one per-tensor
            scale from calibration).
    """

    alpha: Any = field(default="auto", metadata=read_by("smoothquant"))
    weight_method: str = field(default="rtn", metadata=read_by("smoothquant"))
    activation_scheme: str = field(default="dynamic", metadata=read_by("smoothquant"))

    def validate(self) -> None:
        if not (self.alpha is None or self.alpha == "auto" or (_is_number(self.alpha) and 0 <= self.alpha <= 1)):
            self._bad("alpha", 'a number in [0, 1], "auto", or null (no smoothing)')
        if self.weight_method not in WEIGHT_METHODS:
            self._bad("weight_method", f"one of {list(WEIGHT_METHODS)}")
        if self.activation_scheme not in ACTIVATION_SCHEMES:
            self._bad("activation_scheme", f"one of {list(ACTIVATION_SCHEMES)}")


@section
class CalibrationArgs(Section):
    """The calibration text and windows (GPTQ, SmoothQuant); named as a recipe's ``calibration`` keys.

    Args:
        dataset: ``None`` (bundled WikiText-2 valid), a list of strings, a local .txt/.json/.jsonl/.csv/.parquet
            path, or a Hub dataset id. An in-memory list is not saved in ``config.json``.
        config / split / column: for Hub ids and files with several columns (flat: ``dataset_config``,
            ``dataset_split``, ``dataset_column``).
        num_samples: calibration windows.
        seq_len: tokens per window.
        seed: seed of the window sampler.
        batch_size: windows per forward pass during calibration (flat: ``calibration_batch_size``).
        tokenizer: tokenizer name/path (or object, not saved); defaults to the model's own.
        expert_tokens: Mixture-of-Experts models: the tokens each expert's statistics come from: ``"routed"`` (the
            tokens the router sends to it, weighted by their routing weights) or ``"all"`` (every token, unweighted,
            for experts the calibration text rarely reaches; the block's output still uses the routed ones).
        expert_min_tokens: an expert whose projection sees fewer routed tokens than this is rounded to nearest on
            its format's grid instead (one report line each).
    """

    dataset: Any = field(default=None, metadata=read_by())
    config: str | None = field(default=None, metadata=read_by(flat="dataset_config"))
    split: str | None = field(default=None, metadata=read_by(flat="dataset_split"))
    column: str | None = field(default=None, metadata=read_by(flat="dataset_column"))
    num_samples: int = field(default=128, metadata=read_by())
    seq_len: int = field(default=512, metadata=read_by())
    seed: int = field(default=0, metadata=read_by())
    batch_size: int = field(default=8, metadata=read_by(flat="calibration_batch_size"))
    tokenizer: Any = field(default=None, metadata=read_by())
    expert_tokens: str = field(default="routed", metadata=read_by())
    expert_min_tokens: int = field(default=16, metadata=read_by())

    def validate(self) -> None:
        if self.expert_tokens not in ("routed", "all"):
            self._bad("expert_tokens", "'routed' (the tokens the router sends to each expert) or 'all'")
        if not _is_int(self.expert_min_tokens) or self.expert_min_tokens < 0:
            self._bad("expert_min_tokens", "an integer >= 0 (0: every expert with a token gets GPTQ), e.g. 16")
        for name in ("num_samples", "seq_len", "batch_size"):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                self._bad(name, "a positive integer")
        if not _is_int(self.seed) or not 0 <= self.seed <= SEED_MAX:
            self._bad("seed", f"an integer in [0, 2**63 - 1] ({SEED_MAX}), e.g. 0")
        t = self.tokenizer
        if t is not None and not (isinstance(t, str) and t.strip()) and not (callable(t) and hasattr(t, "encode")):
            self._bad("tokenizer", "null (the model's own), a tokenizer name or folder (a non-empty string), or a "
                                   "loaded tokenizer object (e.g. from AutoTokenizer.from_pretrained)")
        d = self.dataset
        if d is not None and (not isinstance(d, (str, list, tuple)) or (isinstance(d, str) and not d.strip())):
            self._bad("dataset", "null (the bundled WikiText-2), a list of strings, a local file path or a Hub "
                                 "dataset id")
        for name in ("config", "split", "column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                self._bad(name, "a non-empty string or null")


@section
class GGUFArgs(Section):
    """Quantize (GPTQ or RTN) onto llama.cpp's GGUF grids.

    Args:
        type: a block type (``"Q8_0"``, ``"Q4_0"``, ``"Q5_0"``, ``"Q4_1"``, ``"Q5_1"``, ``"Q3_K"``, ``"Q4_K"``,
            ``"Q5_K"``, ``"Q6_K"``) or one of llama.cpp's mixes: ``"Q4_K_M"`` (Q4_K, with Q6_K for some layers'
            attn_v and ffn_down), ``"Q3_K_M"`` (Q3_K, with Q4_K / Q5_K for attn_v, ffn_down and attn_output),
            ``"Q3_K_S"`` (Q3_K) (flat: ``gguf_type``; rules: ``hfquant.core.gguf_types``). It sets bits, group
            size and grid (given ``bits``/``group_size``/``sym`` must agree); tensors whose row length the type
            cannot hold fall back as llama.cpp does (Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0). The
            modules hold the GGUF blocks (``QuantLinearGGUF``); ``save_format: gguf`` or ``hfquant export --format
            gguf`` writes the ``.gguf`` file.
        head_type / embedding_type: the output head's and token embeddings' type in the GGUF file (rounded to
            nearest at export); ``None`` follows llama.cpp (head Q6_K, or Q8_0 when its rows are not a multiple of
            256; untied embeddings in ``type``'s type) (flat: ``gguf_head_type``, ``gguf_embedding_type``).
    """

    type: str | None = field(default=None, metadata=read_by("gptq", "rtn", flat="gguf_type"))
    head_type: str | None = field(default=None, metadata=read_by("gptq", "rtn", flat="gguf_head_type"))
    embedding_type: str | None = field(default=None, metadata=read_by("gptq", "rtn", flat="gguf_embedding_type"))

    def validate(self) -> None:
        self.check_type()
        for name in ("head_type", "embedding_type"):
            if getattr(self, name) is not None and getattr(self, name) not in GGUF_TENSOR_TYPES:
                self._bad(name, f"null (llama.cpp's choice) or one of {list(GGUF_TENSOR_TYPES)}")

    def check_type(self) -> None:
        if self.type is not None and self.type not in GGUF_TYPES:
            self._bad("type", f"one of {list(GGUF_TYPES)} or null")


@section
class MixedArgs(Section):
    """Per-module schemes: overrides, and ``bits: "auto"``'s budgeted choice.

    Args:
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
        bits_per_weight: written by the run: the checkpoint's stored bits per weight over every linear-algebra
            weight, quantized or left float (experts, routers and the output head included; embeddings and norms
            not), as ``hfquant.quantize.coverage`` counts them.
    """

    overrides: dict | None = field(default=None, metadata=read_by("gptq", "rtn", "smoothquant"))
    target_avg_bits: float | None = field(default=None, metadata=read_by("gptq"))
    max_ppl_increase: float | None = field(default=None, metadata=read_by("gptq"))
    candidates: list | None = field(default=None, metadata=read_by("gptq"))
    fisher_windows: int = field(default=16, metadata=read_by("gptq"))
    module_schemes: dict | None = field(default=None, metadata=read_by())
    bits_per_weight: float | None = field(default=None, metadata=read_by())

    def validate(self) -> None:
        self.check_patterns()
        self.check_budget()
        self.check_schemes()

    def check_patterns(self) -> None:
        validate_overrides(self.overrides)

    def check_schemes(self) -> None:
        if self.module_schemes is not None and not _valid_schemes(self.module_schemes):
            self._bad("module_schemes", "a mapping module name -> {bits, group_size, sym, method}")

    def check_budget(self) -> None:
        """``bits: "auto"``'s fields (each on its own; whether ``bits`` is ``"auto"`` is the config's rule)."""
        t = self.target_avg_bits
        if t is not None and (not _is_number(t) or not 1 < t <= 16):
            self._bad("target_avg_bits", "a number of stored bits per weight in (1, 16], e.g. 3.5")
        m = self.max_ppl_increase
        if m is not None and (not _is_number(m) or not 0 < m <= 10):
            self._bad("max_ppl_increase", "a relative increase in (0, 10], e.g. 0.05 for 5%")
        if not _is_int(self.fisher_windows) or self.fisher_windows < 0:
            self._bad("fisher_windows", "a number of calibration windows >= 0 (0: no loss-gradient weighting), "
                                        "e.g. 16")
        self._check_candidates()

    def _check_candidates(self) -> None:
        c = self.candidates
        if c is None:
            return
        if not isinstance(c, (list, tuple)) or not c:
            self._bad("candidates", "a non-empty list of {bits, group_size}")
        for item in c:
            if (not isinstance(item, dict) or set(item) != {"bits", "group_size"} or not _is_int(item["bits"])
                    or item["bits"] not in SUPPORTED_BITS or not _is_int(item["group_size"])
                    or not (item["group_size"] == -1 or item["group_size"] > 0)):
                self._bad("candidates", f"a list of {{bits: one of {list(SUPPORTED_BITS)}, group_size: -1 or > 0}}")


def _valid_schemes(ms) -> bool:
    """A mapping module name -> a valid entry of a registered weight format (``scheme_entry_ok``)."""
    return isinstance(ms, dict) and all(isinstance(k, str) and scheme_entry_ok(v) for k, v in ms.items())
