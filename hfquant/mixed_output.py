"""Mixed-precision parts of an output folder: the sensitivity files, true average bits, the card section.

Files: ``sensitivity.json`` (the table of ``hfquant.sensitivity``), ``sensitivity.md`` (the same as a
markdown table, with the chosen scheme per module when there is an allocation) and ``sensitivity.png``
(the plot, embedded in ``README.md`` by a relative link so it shows on the Hub).
"""

from __future__ import annotations

import json
from pathlib import Path

SENSITIVITY_JSON = "sensitivity.json"
SENSITIVITY_MD = "sensitivity.md"
SENSITIVITY_PNG = "sensitivity.png"


def write_sensitivity(folder: Path, table: dict, allocation: dict | None = None) -> None:
    from hfquant.sensitivity import plot, to_markdown

    (folder / SENSITIVITY_JSON).write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    (folder / SENSITIVITY_MD).write_text(to_markdown(table, allocation), encoding="utf-8")
    plot(table, folder / SENSITIVITY_PNG, allocation)


def stored_average_bits(folder: Path) -> dict:
    """Measured from the saved safetensors: bits of ``weight`` + ``scales`` + ``zeros`` + ``g_idx`` of every
    W4A16 module, over its ``in * out`` weights. Returns ``{"avg_bits", "modules", "weights"}``."""
    import math

    from hfquant.output import tensor_headers

    itemsize = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}
    sizes: dict[str, dict] = {}  # module -> leaf -> (shape, bytes); read from the headers, no tensor data
    for key, shape, dtype in tensor_headers(sorted(Path(folder).glob("*.safetensors"))):
        name, _, leaf = key.rpartition(".")
        if leaf in ("weight", "scales", "zeros", "g_idx"):
            sizes.setdefault(name, {})[leaf] = (shape, math.prod(shape) * itemsize[dtype])
    bits = weights = 0
    count = 0
    for parts in sizes.values():
        if set(parts) != {"weight", "scales", "zeros", "g_idx"}:
            continue  # a float Linear (no scales/zeros/g_idx)
        count += 1
        bits += sum(nbytes * 8 for _, nbytes in parts.values())
        weights += parts["g_idx"][0][0] * parts["scales"][0][0]
    return {"avg_bits": bits / weights if weights else None, "modules": count, "weights": weights}


def card_section(report: dict, folder: Path) -> str:
    """Markdown for the model card: the allocation and the sensitivity plot (when present)."""
    from hfquant.mixed import summary

    auto = report.get("auto") or {}
    allocation = auto.get("allocation")
    lines = []
    schemes = report["config"].get("module_schemes")
    if schemes or allocation or (folder / SENSITIVITY_PNG).exists():
        lines += ["## Mixed precision", ""]
    if schemes:
        lines.append(f"Per-module schemes ({len(schemes)} modules): {summary(schemes)}; the exact scheme of every "
                     "module is `quantization_config.module_schemes` in `config.json`.")
        lines.append("")
    if auto:
        goal = (f"target {auto['target_avg_bits']} average bits" if auto.get("target_avg_bits") is not None
                else f"perplexity increase at most {auto['max_ppl_increase']:.1%} on WikiText-2 valid windows")
        measured = report.get("stored_bits", {}).get("avg_bits")
        lines.append(f"`bits: auto`, {goal}: allocation predicted {auto['predicted_avg_bits']:.4f} stored bits per weight"
                     + (f", measured {measured:.4f} from the saved tensors" if measured else "")
                     + " (codes, scales, zeros and g_idx over the quantized modules).")
        lines.append("")
    conflicts = report.get("quantization", {}).get("override_conflicts") or []
    if conflicts:
        lines.append(f"{len(conflicts)} override conflicts were resolved by the most specific pattern (see `report.json`).")
        lines.append("")
    if (folder / SENSITIVITY_PNG).exists():
        lines += [f"![per-module sensitivity]({SENSITIVITY_PNG})", "",
                  f"Per-module sensitivity: {_measure_words(json.loads((folder / SENSITIVITY_JSON).read_text()))} "
                  "when only that module is quantized at each candidate "
                  f"(table: `{SENSITIVITY_MD}`, data: `{SENSITIVITY_JSON}`)" + ("; circles mark the chosen scheme." if allocation else "."),
                  ""]
    return "\n".join(lines)


def _measure_words(table: dict) -> str:
    """What the sensitivity plot of ``table`` shows (the quantity the allocation minimises)."""
    from hfquant.sensitivity import has_fisher

    return ("the estimated increase of the next-token loss" if has_fisher(table)
            else "the relative output error")


def run_sensitivity(plan, quiet: bool = False) -> dict:
    """``hfquant sensitivity``: measure the table on the float model and write it (JSON, markdown, PNG) with a
    ``README.md`` into the plan's output folder (assembled beside it, moved into place when complete)."""
    import shutil
    import time

    from huggingface_hub import ModelCard, ModelCardData

    from hfquant.errors import ConfigError
    from hfquant.output import CARD, partial_dir, place
    from hfquant.pipeline import load_model
    from hfquant.sensitivity import has_fisher, measure_for_config

    cfg = plan.config
    if plan.windows is None:
        raise ConfigError("quantization.method: sensitivity needs calibration data; use method gptq in the recipe")
    t0 = time.perf_counter()
    model = load_model(plan.recipe)
    skip = set(cfg.modules_to_not_convert or [])
    names_out = {n for n, _ in model.named_modules() if n.endswith("lm_head")}

    def keep(name: str) -> bool:
        return name not in names_out and not any(name == s or name.startswith(s + ".") for s in skip)

    table = measure_for_config(model, list(plan.windows.split(cfg.calibration_batch_size)), keep, cfg, not quiet)
    table["model"] = plan.recipe["model"]
    partial = partial_dir(plan.out)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        write_sensitivity(partial, table)
        data = ModelCardData(library_name="transformers", tags=["hfquant", "sensitivity"])
        body = (f"\n# Sensitivity of {plan.recipe['model']}\n\n"
                f"Measured by `hfquant sensitivity` in {table['seconds']:.0f} s on {plan.windows.shape[0]} calibration "
                f"windows x {plan.windows.shape[1]} tokens: for every quantizable module and candidate scheme, the GPTQ "
                "and RTN proxy loss tr((W-Q) H (W-Q)^T) when only that module is quantized, relative to tr(W H W^T)"
                + (f", and the estimated increase of the next-token loss (output errors weighted by squared loss gradients "
                   f"from {table['fisher_windows']} windows)" if has_fisher(table) else "")
                + f". The plot shows {_measure_words(table)}.\n\n"
                f"![per-module sensitivity]({SENSITIVITY_PNG})\n\n"
                f"Table: `{SENSITIVITY_MD}`; data: `{SENSITIVITY_JSON}`.\n")
        ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(str(partial / CARD))
        place(partial, plan.out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    table["total_seconds"] = time.perf_counter() - t0
    return table
