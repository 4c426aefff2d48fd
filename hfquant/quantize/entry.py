"""The one entry that quantizes a loaded float model according to an ``HFQuantConfig`` (calibration data
included): ``quantize_loaded_model_``. The public ``hfquant.quantize_`` and ``hfquant.quantize_layerwise`` go
through the transformers quantizer (``hfquant.integrations.transformers``), which calls it.

The config is only read: what the run resolves (the per-module schemes) comes back in ``Quantized`` and the
quantizer records it in its own copy of the config."""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import AutoTokenizer

from hfquant.calibration import distributed
from hfquant.calibration.data import fingerprint, max_positions, windows_for
from hfquant.calibration.spill import ACTIVATIONS, make_store
from hfquant.core.errors import CalibrationError, ConfigError
from hfquant.core.int_grid import IntGrid
from hfquant.core.weight_format import format_from_config, Scheme
from hfquant.mixed import resolve
from hfquant.nn.experts import (experts_layout, find_experts, fuse_experts_, fused_weights, router_names,
                                RoutedExperts, unfuse_experts_, unknown_layout_error)
from hfquant.nn.graph import is_quantizable, output_head_name
from hfquant.quantize.coverage import coverage, unexplained_float
from hfquant.quantize.w8a8 import quantize_w8a8_, SmoothQuantSettings, W8A8RunOptions
from hfquant.quantize.weight_only import quantize_gptq_, quantize_rtn_, reports_as_dicts, RunOptions

logger = logging.getLogger(__name__)


def _tokenizer_for(model, config):
    tok = config.tokenizer
    if tok is not None and not isinstance(tok, str):
        return tok

    source = tok or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not source:
        raise CalibrationError("hfquant: no tokenizer for calibration; pass HFQuantConfig(tokenizer=...)")
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise CalibrationError(f"hfquant: cannot load a tokenizer from {source!r} ({type(exc).__name__}); pass HFQuantConfig(tokenizer=...)") from None


def _check_seq_len(model, seq_len: int) -> None:
    limit = max_positions(model.config)
    if limit is not None and seq_len > limit:
        raise CalibrationError(f"hfquant: seq_len={seq_len} exceeds the model's maximum of {limit} positions; lower seq_len")


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OOM_HINT = ("to use less memory: calibration.layerwise: true (quantize_layerwise), calibration.activations: cpu or "
            "disk, or a smaller calibration.batch_size; with --resume (single process, not layer-wise) a rerun starts "
            "after the last finished block")


class Quantized(NamedTuple):
    """What ``quantize_loaded_model_`` returns."""

    report: dict
    """Per-module results, calibration fingerprint, timings (``model.hfquant_report``)."""
    module_schemes: dict | None
    """The resolved ``{module: {bits, group_size, sym, method}}`` of every quantized module when the run used
    overrides, ``bits="auto"`` or given ``module_schemes`` (weight-only methods); ``None`` otherwise. The
    caller stores it as the saved config's ``module_schemes``, from which reload builds each module."""


def check_model_for_config(model, config, keep: Callable[[str], bool]) -> None:
    """What the architecture alone must allow for ``config`` (works on a meta-device skeleton, before any weight is
    read): every module to quantize can take the run's weight format (``WeightFormat.module_error``; GGUF blocks are
    rows of an ``nn.Linear`` weight, GPT-2's ``Conv1D`` stores its weight transposed). Raises ``ConfigError``."""
    for name, module in find_experts(model).items():
        if experts_layout(module) is None and any(keep(f"{name}.{p}") for p in fused_weights(module)):
            raise ConfigError(unknown_layout_error(name, module))
    error = unexplained_float(model, keep, head_quantized=config.lm_head_bits is not None)
    if error is not None:
        raise ConfigError(error)
    fmt = format_from_config(config)
    if fmt is None:
        return
    for name, module in model.named_modules():
        if name and is_quantizable(module) and keep(name):
            error = fmt.module_error(name, module)
            if error is not None:
                raise ConfigError(error)


@dataclass
class RunRequest:
    """How ``quantize_loaded_model_`` runs (its keyword arguments): ``windows`` (calibration windows, default: from
    the config), ``progress``, ``store`` (a ``hfquant.quantize.resume.ResumeStore``, GPTQ only: saves progress per
    block and resumes from it), ``onload`` (a ``hfquant.calibration.onload.LayerLoader``: the model is a meta
    skeleton whose blocks load one at a time), ``activations`` (``"device"``, ``"cpu"``, ``"disk"`` under
    ``offload_folder``: where the calibration hidden states live between blocks), ``dist``
    (``hfquant.calibration.distributed.Dist``, default: the initialised ``torch.distributed`` group, if any: splits
    the calibration batches across processes and reduces the statistics exactly)."""

    windows: torch.Tensor | None = None
    progress: bool = True
    store: object = None
    onload: object = None
    activations: str = "device"
    offload_folder: object = None
    dist: object = None


def quantize_loaded_model_(model, config, keep: Callable[[str], bool], *args, **kwargs) -> Quantized:
    """Quantize ``model`` in place; returns the report (per-module results, calibration fingerprint, timings) and
    the resolved per-module schemes (``Quantized``). ``args``/``kwargs``: ``RunRequest``'s fields. A device out of
    memory becomes one line that names what to change. ``config`` is not modified."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    bad = sorted(str(d) for d in dtypes - set(SUPPORTED_DTYPES))
    if bad:
        raise ConfigError(f"hfquant: the model's weights are {', '.join(bad)}; quantization supports float32, bfloat16 "
                          "and float16 weights: load the model with dtype=torch.float32 (or bfloat16/float16)")
    try:
        return _Run(model, config, keep, RunRequest(*args, **kwargs)).run()
    except torch.OutOfMemoryError as exc:
        where = (str(exc).splitlines() or [""])[0][:160]
        raise torch.OutOfMemoryError(f"the device ran out of memory while quantizing ({where}); {OOM_HINT}") from None


class _Run:
    """One ``quantize_loaded_model_`` run: checks, the per-module schemes, then the method's pass."""

    def __init__(self, model, config, keep: Callable[[str], bool], request: RunRequest):
        self.model, self.config, self.keep, self.request = model, config, keep, request
        self.dist = request.dist or distributed.current()
        self.report: dict = {"method": config.method, "torch": torch.__version__, "machine": platform.machine()}
        self.schemes = None

    def prepare_experts(self) -> None:
        """MoE models: routers stay float; every experts module to quantize is run as one Linear per expert and
        projection (``hfquant.nn.experts``), with ``calibration.expert_tokens``'s choice of tokens."""
        model, config = self.model, self.config
        routers = router_names(model)
        if routers:
            self.report["routers"] = routers
            self.keep = (lambda n, _keep=self.keep, _r=frozenset(routers): _keep(n) and n not in _r)
        try:
            unfused = unfuse_experts_(model, self.keep)
        except ValueError as exc:  # an experts layout hfquant does not know: one line, before anything
            raise ConfigError(str(exc)) from None
        for name in unfused:
            model.get_submodule(name).all_tokens = config.expert_tokens == "all"

    def check_expert_schemes(self) -> None:
        """Every expert of one projection has one scheme (they are stored stacked): checked before calibration."""
        for name, module in self.model.named_modules():
            if not isinstance(module, RoutedExperts):
                continue
            for proj in module.layout.projections:
                names = [f"{name}.{e}.{proj}" for e in range(module.layout.num_experts)]
                kinds = {(self.keep(n), repr((self.schemes or {}).get(n))) for n in names}
                if len(kinds) > 1:
                    raise ConfigError(f"hfquant: overrides or modules_to_not_convert give the experts of {name}.{proj} "
                                      "different schemes; its experts are stored stacked and must share one: write "
                                      f"the pattern for the whole module (e.g. '{name}.*')")

    def finish_experts(self) -> None:
        """Put every experts module back in one piece (``QuantExperts``), then count what the model holds."""
        problems = fuse_experts_(self.model)
        if problems:
            name, problem = next(iter(problems.items()))
            raise ConfigError(f"hfquant: {name}: {problem} (its experts are stored stacked and must share one "
                              "scheme)")
        for m in self.model.modules():
            if isinstance(m, RoutedExperts):
                m.all_tokens = False
        self.report["weights"] = coverage(self.model, self.keep, head_quantized=self.config.lm_head_bits is not None)

    def check(self) -> None:
        config, request = self.config, self.request
        if config.method == "smoothquant" and request.activations != "device":
            raise ConfigError(f"hfquant: activations={request.activations!r} is supported for gptq only; SmoothQuant "
                              "keeps its activations on the device (use activations: device)")
        if config.bits == "auto" and (request.onload is not None or self.dist.active):
            raise ConfigError("hfquant: bits: auto runs its sensitivity pass on the whole model in one process; "
                              "it cannot be combined with layerwise: true or several processes (use fixed bits there)")
        check_model_for_config(self.model, config, self.keep)

    def run(self) -> Quantized:
        self.prepare_experts()
        self.check()
        config, model = self.config, self.model
        head = _lm_head_to_quantize(model, config)  # checked before the run, not after a long calibration
        if resolve.is_mixed(config):
            self.schemes, skipped, conflicts = resolve.resolve_for_model(model, config, self.keep)
            self.report.update(skipped=skipped, override_conflicts=conflicts)
            self.keep = (lambda n, _keep=self.keep, _skip=frozenset(skipped): _keep(n) and n not in _skip)
            self.check_expert_schemes()
        model.eval()
        if config.method == "rtn":
            modules = reports_as_dicts(self.rtn())
        else:
            batches = self.batches()
            modules = self.smoothquant(batches) if config.method == "smoothquant" else self.gptq(batches)
        if self.request.store is not None:
            self.report["resumed_from_block"] = self.request.store.resumed_from
        self.report["modules"] = modules
        module_schemes = self.module_schemes(modules)
        if head is not None:
            modules += reports_as_dicts(_quantize_lm_head_(model, config, head))
        fmt = format_from_config(config)
        extra = fmt.finish_model_(model, config) if fmt is not None else None
        if extra is not None:
            self.report[fmt.kind] = extra
        self.finish_experts()
        self.report["damp_retries"] = sum(m.get("damp_retries", 0) for m in modules)
        return Quantized(self.report, module_schemes)

    def rtn(self) -> list:
        onload, scheme = self.request.onload, resolve.default_scheme(self.config)
        if onload is None:
            return quantize_rtn_(self.model, self.keep, scheme, self.schemes)
        return _rtn_layerwise(self.model, self.keep, scheme, onload, self.schemes)

    def batches(self) -> list[torch.Tensor]:
        """The calibration windows in batches (this process's share of them)."""
        model, config, windows = self.model, self.config, self.request.windows
        _check_seq_len(model, config.seq_len)
        t0 = time.perf_counter()
        if windows is None:
            windows = windows_for(config, _tokenizer_for(model, config))
        self.report["calibration"] = {"fingerprint": fingerprint(windows), "shape": list(windows.shape),
                                      "seconds": time.perf_counter() - t0}
        batches = list(windows.split(config.calibration_batch_size))
        if self.dist.active:
            share = self.dist.batch_range(len(batches))
            self.report["calibration"]["processes"] = self.dist.world
            batches = batches[share.start:share.stop]
        return batches

    def smoothquant(self, batches: list[torch.Tensor]) -> list:
        request = self.request
        return quantize_w8a8_(self.model, batches, self.keep, SmoothQuantSettings.from_config(self.config),
                              W8A8RunOptions(progress=request.progress, dist=self.dist, onload=request.onload))

    def gptq(self, batches: list[torch.Tensor]) -> list:
        model, config, request = self.model, self.config, self.request
        if config.bits == "auto":
            t1 = time.perf_counter()
            self.schemes, self.report["auto"] = resolve.auto_schemes(model, config, self.keep, batches,
                                                                     lambda: _tokenizer_for(model, config),
                                                                     request.progress)
            self.report["auto"]["seconds"] = time.perf_counter() - t1
        if request.activations not in ACTIVATIONS:
            raise ConfigError(f"hfquant: activations must be one of {list(ACTIVATIONS)}, got {request.activations!r}")
        device = request.onload.device if request.onload is not None else next(model.parameters()).device
        hidden = make_store(request.activations, device, request.offload_folder)
        timings: dict = {}
        options = RunOptions(progress=request.progress, store=request.store, hidden=hidden, dist=self.dist,
                             onload=request.onload, cache_outputs=request.activations != "disk", timings=timings,
                             expert_min_tokens=config.expert_min_tokens)
        t1 = time.perf_counter()
        try:
            modules = reports_as_dicts(quantize_gptq_(model, batches, self.keep, resolve.default_scheme(config),
                                                      config.gptq, self.schemes, config.seed, options))
        finally:
            hidden.close()
        # Solve time apart from the rest (forward passes, Hessians, their reduction, loading, swapping).
        solve_s = timings.get("solve_seconds", 0.0)
        self.report["gptq_seconds"] = {"solve": solve_s, "other": time.perf_counter() - t1 - solve_s}
        return modules

    def module_schemes(self, modules: list[dict]) -> dict | None:
        """The resolved scheme of every quantized module (reload builds each module from it), for weight-only runs
        with per-module schemes; ``None`` otherwise."""
        if self.schemes is None or self.config.method == "smoothquant":
            return None
        out = {}
        for m in modules:
            s = self.schemes.get(m["name"])
            fmt = s.format if s is not None else IntGrid(m["bits"], m["group_size"], self.config.sym)
            out[m["name"]] = fmt.to_dict(m["method"])
        return out


def _lm_head_to_quantize(model, config) -> str | None:
    """The output head's name when ``lm_head_bits`` is set (``None`` otherwise); ``ConfigError`` when the model
    has no Linear head."""
    if config.lm_head_bits is None:
        return None

    name = output_head_name(model)
    if name is None or not is_quantizable(model.get_submodule(name)):
        raise ConfigError(f"hfquant: lm_head_bits={config.lm_head_bits} but {type(model).__name__} has no Linear "
                          "output head (get_output_embeddings()); set lm_head_bits: null")
    return name


def _quantize_lm_head_(model, config, name: str) -> list:
    """``lm_head_bits``: round the output head ``name`` to nearest, one scale and zero per output channel, after
    the rest of the model (its input is not calibrated: RTN needs none). A head tied to the input embeddings is
    untied first (``tie_word_embeddings`` is set false in the model's config, so reloads keep them apart);
    the embeddings keep the float tensor."""
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    model.all_tied_weights_keys = {t: s for t, s in (getattr(model, "all_tied_weights_keys", None) or {}).items()
                                   if not t.startswith(name + ".")}
    scheme = Scheme(IntGrid(config.lm_head_bits, -1, config.sym, config.observer), "rtn")
    return quantize_rtn_(model, lambda n: n == name, scheme)


def _rtn_layerwise(model, keep, scheme, onload, schemes=None) -> list:
    """RTN a block at a time (loaded, quantized, its float Linears dropped), then the rest of the model."""
    reports = []
    for i in range(len(onload.blocks)):
        prefix = f"{onload.blocks_name}.{i}."
        onload.load_block(i)
        reports += quantize_rtn_(model, lambda n, _p=prefix: n.startswith(_p) and keep(n), scheme, schemes)
    onload.load_rest()
    return reports + quantize_rtn_(model, lambda n: not n.startswith(onload.blocks_name + ".") and keep(n), scheme,
                                   schemes)


