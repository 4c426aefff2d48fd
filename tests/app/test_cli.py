"""The hfquant CLI end to end on a tiny model: output folder, report, model card, eval, inspect, overwrite."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import run_cli, write_recipe


@pytest.fixture(scope="module")
def finished(tiny_models, tmp_path_factory):
    """One full run (GPTQ, evaluation before and after) shared by the tests of this module."""
    from hfquant.app.cli import main

    root = tmp_path_factory.mktemp("cli")
    recipe = write_recipe(root / "r.yaml", tiny_models["llama"], root / "out")
    assert main(["--quiet", "run", str(recipe)]) == 0
    return root / "out", recipe


def test_output_folder_is_complete(finished):
    out, _ = finished
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "hfquant_recipe.yaml", "report.json", "README.md"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    siblings = {p.name for p in out.parent.iterdir()}
    assert not any("hfquant-partial" in n or "hfquant-progress" in n for n in siblings), siblings


def _plain_perplexity(model, ids, seq_len, windows):
    """``exp(mean NLL)`` of the next token over the first ``windows`` non-overlapping windows, in float64."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for k in range(windows):
            window = ids[k * seq_len:(k + 1) * seq_len][None]
            logp = torch.log_softmax(model(input_ids=window).logits[0, :-1].double(), dim=-1)
            nll -= float(logp.gather(1, window[0, 1:, None]).sum())
            count += seq_len - 1
    return math.exp(nll / count)


def test_report_has_the_measurements(finished, tiny_models):
    out, _ = finished
    report = json.loads((out / "report.json").read_text())
    float_mib = (tiny_models["llama"] / "model.safetensors").stat().st_size / 2**20
    assert abs(report["source_mib"] - float_mib) < 0.05  # tied embeddings counted once
    ev = report["evaluation"]
    assert ev["windows"] == 512 // 64 and ev["seq_len"] == 64 and ev["dataset"].startswith("WikiText-2 test")
    # before: the float model's perplexity; after: the quantized checkpoint's; each recomputed here on the first
    # 8 windows of 64 tokens of the bundled WikiText-2 test text (they differ by ~1e-3 relative, far above rel)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfquant.calibration.data import BUNDLED_EVALUATION

    text = BUNDLED_EVALUATION.read_text(encoding="utf-8")
    ids = torch.tensor(AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"])
    float_ppl = _plain_perplexity(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval(), ids, 64, 8)
    quant_ppl = _plain_perplexity(AutoModelForCausalLM.from_pretrained(out).eval(), ids, 64, 8)
    assert abs(quant_ppl / float_ppl - 1) > 1e-4  # the two models really differ on this text
    assert ev["before"] == pytest.approx(float_ppl, rel=1e-5)
    assert ev["after"] == pytest.approx(quant_ppl, rel=1e-5)
    assert abs(ev["after"] / ev["before"] - 1) < 0.01  # W4 g32 GPTQ barely moves the perplexity
    layers = report["layers"]
    assert len(layers) == 2 * 7 and all(m["method"] == "gptq" and m["loss"] > 0 for m in layers)
    assert report["damp_retries"] == sum(m["damp_retries"] for m in layers)
    assert len(report["quantization"]["calibration"]["fingerprint"]) == 16
    assert {"prepare", "load", "quantize", "save", "eval_before", "eval_after"} <= set(report["timings"])
    assert {"hfquant", "torch", "transformers", "huggingface_hub", "safetensors"} <= set(report["versions"])
    assert report["config"]["bits"] == 4 and report["config"]["group_size"] == 32


def test_saved_recipe_is_the_resolved_one_and_reruns(finished):
    from hfquant.app import recipe

    out, original = finished
    saved = yaml.safe_load((out / "hfquant_recipe.yaml").read_text())
    assert saved == recipe.load(original)
    assert saved["quantization"]["desc_act"] is True  # defaults are written out


def test_model_card(finished):
    from huggingface_hub import ModelCard

    out, _ = finished
    card = ModelCard.load(out / "README.md")
    assert "hfquant" in card.data.tags and card.data.library_name == "transformers"
    report = json.loads((out / "report.json").read_text())
    assert f"{report['evaluation']['after']:.3f}" in card.text and f"{report['evaluation']['before']:.3f}" in card.text
    assert "import hfquant" in card.text and "from_pretrained" in card.text
    assert card.text.lstrip().startswith(f"# {out.name}\n")


def test_eval_reproduces_the_reported_perplexity(finished, capsys):
    out, _ = finished
    code, stdout, err = run_cli(["--quiet", "eval", out], capsys)
    assert code == 0, err
    after = json.loads((out / "report.json").read_text())["evaluation"]["after"]
    assert f"perplexity {after:.3f}" in stdout  # the reloaded checkpoint gives the in-memory model's number


def test_eval_in_another_dtype(finished, capsys):
    """``--dtype``: evaluated in the dtype a serving engine runs (bf16 here), said on the line; close to float32's."""
    out, _ = finished
    code, stdout, err = run_cli(["--quiet", "eval", out, "--dtype", "bfloat16"], capsys)
    assert code == 0, err
    line = next(s for s in stdout.splitlines() if s.startswith("perplexity "))
    after = json.loads((out / "report.json").read_text())["evaluation"]["after"]
    assert line.endswith(" in bfloat16") and abs(float(line.split()[1]) / after - 1) < 0.05
    code, _, err = run_cli(["eval", out, "--dtype", "int8"], capsys)
    assert code == 2 and "invalid choice: 'int8'" in err


def test_inspect_shows_config_sizes_and_layers(finished, capsys):
    out, _ = finished
    code, stdout, err = run_cli(["inspect", out], capsys)
    assert code == 0, err
    assert "GPTQ W4A16 g32" in stdout and "MiB" in stdout and "quantized modules: 14" in stdout
    assert stdout.count("| model.layers.") == 14


def test_non_empty_output_needs_overwrite_and_dry_run_writes_nothing(finished, capsys, tmp_path):
    out, recipe = finished
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    code, stdout, _ = run_cli(["run", recipe, "--overwrite", "--dry-run"], capsys)
    assert code == 0 and "dry run" in stdout
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
    # --overwrite replaces the folder (as one rename) with an RTN run
    target = tmp_path / "copy"
    import shutil

    shutil.copytree(out, target)
    (target / "stale.txt").write_text("from an earlier run")
    code, _, err = run_cli(["--quiet", "run", recipe, "--output", target, "--overwrite",
                            "--set", "quantization={method: rtn}", "--set", "evaluation.before=false"], capsys)
    assert code == 0, err
    assert not (target / "stale.txt").exists()
    report = json.loads((target / "report.json").read_text())
    assert report["config"]["method"] == "rtn" and report["evaluation"]["before"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(finished, capsys, tmp_path, monkeypatch):
    """``--overwrite`` moves the old folder aside only when the new one is complete: a run that fails while saving
    leaves the old output byte for byte as it was, no partial folder, no lock file."""
    import hashlib
    import shutil

    from hfquant.app import pipeline

    out, recipe = finished
    target = tmp_path / "copy"
    shutil.copytree(out, target)

    def digest():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(target.iterdir())}
    before = digest()

    def failing_save(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pipeline, "_save", failing_save)
    code, _, err = run_cli(["--quiet", "run", recipe, "--output", target, "--overwrite", "--set",
                            "quantization={method: rtn}", "--set", "evaluation.before=false"], capsys)
    assert code == 1 and "No space left" in err
    assert digest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_table_without_evaluation_says_so(tiny_models, tmp_path, capsys):
    """With evaluation off the table header read "PPL (, 0 x 512 tokens)"; it says the model was not evaluated."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], tmp_path / "out",
                          quantization={"method": "rtn"}, evaluation={"before": False, "after": False})
    code, stdout, err = run_cli(["--quiet", "run", recipe], capsys)
    assert code == 0, err
    assert "| model | PPL (not evaluated) | checkpoint (MiB) |" in stdout and "(, 0 x" not in stdout
    assert "PPL (not evaluated)" in (tmp_path / "out" / "README.md").read_text()


def test_smoothquant_recipe_runs(tiny_models, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], tmp_path / "sq", quantization=None,
                          evaluation={"before": False})
    code, stdout, err = run_cli(["--quiet", "run", recipe, "--set", "quantization={method: smoothquant, alpha: 0.5}"],
                                capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "sq" / "report.json").read_text())
    assert report["config"]["method"] == "smoothquant" and any(m["smoothed"] for m in report["layers"])
    assert "SmoothQuant W8A8" in stdout


def test_entry_points():
    pyproject = (Path(__file__).parent.parent.parent / "pyproject.toml").read_text()
    assert '[project.scripts]\nhfquant = "hfquant.app.cli:main"' in pyproject
    proc = subprocess.run([sys.executable, "-m", "hfquant", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for name in ("run", "eval", "inspect", "push", "validate"):
        assert name in proc.stdout


def test_commands_table_drives_the_parser():
    from hfquant.app import cli

    calls = []
    extra = cli.Command("test command", lambda p: p.add_argument("x"), lambda a: calls.append(a.x) or 0)
    cli.COMMANDS["extra-test"] = extra
    try:
        assert cli.main(["extra-test", "42"]) == 0 and calls == ["42"]
    finally:
        del cli.COMMANDS["extra-test"]


def test_inspect_of_a_float_model_says_it_is_not_quantized(tiny_models, capsys):
    code, stdout, err = run_cli(["inspect", tiny_models["llama"]], capsys)
    assert code == 0, err
    assert "not an hfquant checkpoint" in stdout and "quantized modules: 0" in stdout and "no report.json" in stdout


def test_tasks_run_before_and_after_into_report_card_and_eval(tiny_models, tmp_path, capsys):
    """``evaluation.tasks``: the bundled task on the float model (before) and on the quantized one (after), after
    the perplexity; the rows land in report.json, the printed table and the model card, and ``hfquant eval`` of the
    saved checkpoint (its recipe's tasks) gives the report's after numbers."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], tmp_path / "out", quantization={"method": "rtn"},
                          evaluation={"tasks": ["alice_next"], "task_limit": 4})
    code, stdout, err = run_cli(["--quiet", "run", recipe], capsys)
    assert code == 0, err
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    tasks = report["tasks"]
    assert tasks["lm_eval"].startswith("0.4.") and tasks["limit"] == 4 and tasks["num_fewshot"] is None
    rows = [tasks["before"]["alice_next"], tasks["after"]["alice_next"]]
    for row in rows:
        assert (row["n"], row["num_fewshot"]) == (4, 0)
        for metric in ("acc", "acc_norm"):
            assert 0.0 <= row[metric] <= 1.0 and row[metric] * 4 == pytest.approx(round(row[metric] * 4))
            assert row[f"{metric}_stderr"] is not None
    assert report["timings"]["tasks_before"] > 0 and report["timings"]["tasks_after"] > 0
    line = f"| alice_next | acc | 4 | 0 | {rows[0]['acc']:.4f} ± {rows[0]['acc_stderr']:.4f} | {rows[1]['acc']:.4f}"
    assert line in stdout and line in (out / "README.md").read_text()
    assert "first 4 items of each task" in (out / "README.md").read_text()
    code, stdout, err = run_cli(["--quiet", "eval", out], capsys)
    assert code == 0, err
    assert f"| alice_next | acc_norm | 4 | 0 | {rows[1]['acc_norm']:.4f} ± {rows[1]['acc_norm_stderr']:.4f} |" in stdout
    code, stdout, err = run_cli(["--quiet", "eval", out, "--tasks", "none"], capsys)
    assert code == 0 and "perplexity" in stdout and "alice_next" not in stdout, err


def test_a_hub_task_offline_fails_before_anything_is_loaded(tiny_models, tmp_path, capsys, monkeypatch):
    """Offline, a task whose data is on the Hub stops the run at its plan (exit 2, one line, nothing written); lm-eval's
    index is cut down to the bundled tasks and its hellaswag folder (indexing all of it takes seconds)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import hfquant.eval.tasks as tasks

    hellaswag = Path(lm_eval.__file__).parent / "tasks" / "hellaswag"
    monkeypatch.setattr(tasks, "_manager", lambda include_defaults: TaskManager(
        include_path=[str(tasks.TASKS_DIR), str(hellaswag)], include_defaults=False))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], tmp_path / "out",
                          evaluation={"tasks": ["alice_next", "hellaswag"]})
    code, stdout, err = run_cli(["run", recipe], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("hfquant: error: evaluation.tasks: task 'hellaswag' needs its data set from the Hugging Face "
                          "Hub") and "HF_HUB_OFFLINE" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
    code, _, err = run_cli(["eval", tiny_models["llama"], "--tasks", "hellaswag"], capsys)
    assert code == 2 and err.startswith("hfquant: error: --tasks: task 'hellaswag' needs its data set"), err
