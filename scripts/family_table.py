"""README's model-family table, rendered from the results of ``tests/test_families.py``.

The one command that regenerates it (the test writes one ``<family>.json`` per family into the folder that
``HFQUANT_FAMILY_RESULTS`` names; this script reads them and replaces the section between ``<!-- families:begin -->``
and ``<!-- families:end -->`` of README.md):

    HFQUANT_FAMILY_RESULTS=/tmp/fam python -m pytest tests/test_families.py -q && python scripts/family_table.py --results /tmp/fam --update-readme

This script runs nothing itself (no model, no test): without ``--update-readme`` it prints the markdown. Columns:
family, the transformers class, the share of the expert weights quantized (MoE families), the run report's bits per
weight, the reload, the GPTQ and compressed-tensors exports read back, the GGUF export read back by transformers, and
notes; each refusal or failure is a numbered footnote under the table with the one-line reason that was recorded.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"
COLUMNS = ("family", "transformers class", "experts quantized", "bits/weight", "reload", "GPTQ export",
           "compressed-tensors export", "GGUF export + read-back", "notes")
INTRO = """Every family hfquant supports, run end to end on a tiny random model (2 layers, hidden 64, vocabulary 320;
MoE: 4 experts, top-2) by `tests/test_families.py` on a CPU: W4 g16 GPTQ through `from_pretrained` (the run report's
expert weights quantized and bits per weight), `save_pretrained` -> `from_pretrained` (logits bit-equal),
`export_checkpoint` to GPTQ (read back by `load_gptq`: max |Δ logit| against the hfquant model, bound 1e-3 x max
|logit|) and to compressed-tensors (read back by transformers + compressed-tensors: bound 1e-5), and a GGUF leg:
`HFQuantConfig(gguf_type="Q4_0")`, `export_checkpoint(..., "gguf", ...)`, read back by transformers
(`from_pretrained(folder, gguf_file="model.gguf")`) against the hfquant model (bound 0; Gemma 3 1e-5; MoE 1e-4).
The GGUF leg uses its own tiny config where transformers' GGUF loader does not read a size back from the file
(notes). Bits/weight is the report's, over every linear-algebra weight with the float32 output head included: at
these sizes the head dominates it. The test fails when quantization or the reload fails for a family, when an MoE
family's experts are not 100% quantized, or when an export's outcome differs from the test's `EXPECTED` table."""
COMMAND = ("HFQUANT_FAMILY_RESULTS=/tmp/fam python -m pytest tests/test_families.py -q && "
           "python scripts/family_table.py --results /tmp/fam --update-readme")


def load_results(folder: Path) -> list[dict]:
    """Every ``<family>.json`` under ``folder``, in the test's family order."""
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    if not results:
        raise SystemExit(f"family_table: no <family>.json in {folder}; run: {COMMAND}")
    return sorted(results, key=lambda r: (r.get("order", 99), r["family"]))


class Footnotes:
    """Numbered reasons, each distinct reason once."""

    def __init__(self):
        self.reasons: list[str] = []

    def ref(self, reason: str) -> str:
        reason = re.sub(r"<tmp>/[^:\s]*: ", "", reason or "no reason recorded").strip()
        reason = re.sub(r"\.layers\.\d+\.", ".layers.<i>.", reason)
        if reason not in self.reasons:
            self.reasons.append(reason)
        return f"({self.reasons.index(reason) + 1})"

    def markdown(self) -> str:
        return "\n".join(f"({i}) {r.replace('|', '/')}  " for i, r in enumerate(self.reasons, 1))


def _diff(value) -> str:
    return "0" if not value else f"{value:.1e}"


def _status_cell(step: dict, notes: Footnotes, ok_text: str, expected: str | None = None) -> str:
    status = step.get("status", "not run")
    label = "written, not read back" if status == "unreadable" else status
    cell = ok_text if status == "ok" else f"{label} {notes.ref(step.get('reason', ''))}"
    if expected is not None and status != expected:
        cell += f" **(expected {expected})**"
    return cell


def _gguf_cell(step: dict, notes: Footnotes, expected: str) -> str:
    arch = f"`{step['arch']}`" if step.get("arch") else ""
    ok = f"ok: {arch}, max Δ {_diff(step.get('max_abs_diff'))}"
    if step.get("status") == "ok with config":
        ok = f"ok with `config=` {notes.ref(step.get('reason'))}: {arch}, max Δ {_diff(step.get('max_abs_diff'))}"
        return ok if expected == "ok with config" else f"{ok} **(expected {expected})**"
    if step.get("status") == "unreadable":
        text = f"written {arch}; transformers cannot read it {notes.ref(step.get('reason'))}"
        return text if expected == "unreadable" else f"{text} **(expected {expected})**"
    return _status_cell(step, notes, ok, expected)


def _notes(result: dict) -> str:
    steps, parts = result["steps"], [result.get("features", "")]
    gguf = steps.get("gguf", {})
    if gguf.get("config"):
        parts.append(f"GGUF leg: {gguf['config']}")
    cls = steps["quantize"].get("class")
    if gguf.get("class") and cls and gguf["class"] != cls:
        parts.append(f"GGUF read back as {gguf['class']}")
    return "; ".join(p for p in parts if p)


def row(result: dict, notes: Footnotes) -> list[str]:
    """One table row of one family's result."""
    steps, expected = result["steps"], result.get("expected", {})
    q = steps["quantize"]
    experts = "—" if not q.get("expert_weights") else \
        f"{q['experts_quantized_pct']:.0f}% of {q['expert_weights']:,}"
    gptq = steps.get("gptq", {})
    gptq_ok = f"ok: max Δ {_diff(gptq.get('max_abs_diff'))}" + \
        (", bit-equal with fp16 scales" if gptq.get("exact_with_float16_scales") else "")
    ct_ok = f"ok: max Δ {_diff(steps.get('compressed-tensors', {}).get('max_abs_diff'))}"
    return [f"`{result['family']}`", q.get("class", "?"), experts if q.get("status") == "ok" else "",
            f"{q['bits_per_weight']:.2f}" if q.get("bits_per_weight") is not None else "",
            _status_cell(steps["quantize"], notes, "") + _status_cell(steps.get("reload", {}), notes, "bit-equal"),
            _status_cell(gptq, notes, gptq_ok, expected.get("gptq")),
            _status_cell(steps.get("compressed-tensors", {}), notes, ct_ok, expected.get("compressed-tensors")),
            _gguf_cell(steps.get("gguf", {}), notes, expected.get("gguf")), _notes(result)]


def markdown(results: list[dict]) -> str:
    """The table and its footnotes."""
    notes = Footnotes()
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row(r, notes)) + " |" for r in results]
    seconds = sum(r.get("seconds", 0) for r in results)
    return "\n".join([f"<!-- generated by scripts/family_table.py; regenerate: {COMMAND} -->", "", INTRO, "",
                      *lines, "", notes.markdown(), "",
                      f"{len(results)} families, {seconds:.0f} s of test time on the machine that ran them."])


def update_readme(md: str, readme: Path = README) -> None:
    """Replace the text between the markers of ``readme`` by ``md``."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"family_table: {readme} has no {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{md}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="the folder HFQUANT_FAMILY_RESULTS named")
    parser.add_argument("--update-readme", action="store_true", help=f"replace {BEGIN} ... {END} in README.md")
    parser.add_argument("--readme", type=Path, default=README, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    md = markdown(load_results(args.results))
    if args.update_readme:
        update_readme(md, args.readme)
    else:
        sys.stdout.write(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
