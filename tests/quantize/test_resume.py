"""Kill a run with SIGKILL after a block is saved, resume it, and get the same checkpoint bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_cli, tiny_config, tiny_tokenizer, write_recipe


def _four_layer_llama(folder, seed=1):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 4
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _cli(*args, env=None):
    return [sys.executable, "-m", "hfquant", "--quiet", *map(str, args)]


def _kill_after_two_blocks(recipe, out, env):
    """Start ``hfquant run`` and SIGKILL it once two blocks are saved; returns the progress folder."""
    progress = out.parent / f".{out.name}.hfquant-progress"
    victim = subprocess.Popen(_cli("run", recipe, "--output", out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**env, "HFQUANT_TEST_PAUSE_AFTER_BLOCK": "1"})
    deadline = time.time() + 240
    state = {}
    while time.time() < deadline and victim.poll() is None:
        try:
            state = json.loads((progress / "state.json").read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("blocks_done") == 2:
            break
        time.sleep(0.2)
    assert state.get("blocks_done") == 2, (f"run ended early: {victim.poll()} "
                                           f"{victim.stderr.read()[-2000:] if victim.poll() is not None else ''}")
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    victim.stderr.close()
    return progress


@pytest.mark.parametrize("dtype,quality", [("float32", "default"), ("bfloat16", "default"), ("float32", "best")])
def test_sigkill_then_resume_gives_identical_checkpoint(tmp_path, capsys, dtype, quality):
    model = _four_layer_llama(tmp_path / "model")
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "unused", dtype=dtype,
                          evaluation={"before": False, "after": False}, quantization={"quality": quality})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    straight = tmp_path / "straight"
    proc = subprocess.run(_cli("run", recipe, "--output", straight), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    out = tmp_path / "resumed"
    progress = _kill_after_two_blocks(recipe, out, env)
    assert not out.exists(), "a killed run must not leave a folder that looks complete"
    assert sorted(p.name for p in progress.iterdir()) == [
        "block-0.json", "block-0.safetensors", "block-1.json", "block-1.safetensors", "hidden-2.safetensors", "state.json"]

    # Without --resume the unfinished run is reported, not silently discarded.
    code, _, err = run_cli(["run", recipe, "--output", out], capsys)
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    assert progress.is_dir()

    proc = subprocess.run(_cli("run", recipe, "--output", out, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "report.json").read_text())["resumed_from_block"] == 2
    assert not progress.exists()

    a, b = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 20
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    layers_a = json.loads((straight / "report.json").read_text())["layers"]
    layers_b = json.loads((out / "report.json").read_text())["layers"]
    assert layers_a == layers_b
    assert {t.dtype for k, t in b.items() if k.endswith(".scales")} == {getattr(torch, dtype)}


def test_resume_refuses_progress_of_another_recipe(tmp_path, capsys, tiny_models):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], out, evaluation={"before": False, "after": False})
    progress = tmp_path / ".out.hfquant-progress"
    progress.mkdir()
    (progress / "state.json").write_text(json.dumps({"key": "something-else", "blocks_done": 1, "hidden": None, "extra": {}}))
    before = (progress / "state.json").read_text()
    code, _, err = run_cli(["run", recipe, "--resume"], capsys)
    assert code == 2 and "changed since the unfinished run" in err and len(err.strip().splitlines()) == 1
    assert (progress / "state.json").read_text() == before and not out.exists()


def test_resume_keys_on_the_weights_not_the_path(tmp_path, capsys):
    """Kill a run after two blocks, save other weights (same architecture, same config) at the same model path, and
    resume: refused in one line naming the changed file, the progress kept. (Before, the key was the path and the
    config: the run resumed with blocks 0-1 from the old weights and the rest from the new ones.) The same weights
    moved to another folder resume."""
    import shutil

    model = _four_layer_llama(tmp_path / "model")
    original = tmp_path / "original"
    shutil.copytree(model, original)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", model, out, evaluation={"before": False, "after": False})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    progress = _kill_after_two_blocks(recipe, out, env)
    saved = (progress / "state.json").read_text()

    shutil.rmtree(model)
    _four_layer_llama(model, seed=2)  # other weights, byte for byte the same config and file size
    assert (model / "config.json").read_text() == (original / "config.json").read_text()
    assert (model / "model.safetensors").stat().st_size == (original / "model.safetensors").stat().st_size
    code, _, err = run_cli(["run", recipe, "--resume"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "the model weights changed (model.safetensors content differs)" in lines[0] and "--overwrite" in lines[0]
    assert (progress / "state.json").read_text() == saved and not out.exists()

    moved = write_recipe(tmp_path / "moved.yaml", original, out, evaluation={"before": False, "after": False})
    proc = subprocess.run(_cli("run", moved, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "report.json").read_text())["resumed_from_block"] == 2
