"""Bad-input battery: each malformed recipe, override, path or checkpoint gives exit code 2, one line on
stderr without a traceback, and leaves the disk exactly as it was."""

import os
import shutil
import stat

import pytest
import yaml

from helpers import run_cli, write_recipe


def snapshot(root):
    """Every path under ``root`` with its type, size, mode and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mode, st.st_mtime_ns)
    st = os.lstat(root)
    out["."] = (st.st_mode, st.st_mtime_ns)
    return out


def _recipe(tmp, model, **sections):
    return write_recipe(tmp / "r.yaml", model, tmp / "out", **sections)


def _raw(tmp, text):
    p = tmp / "r.yaml"
    p.write_text(text)
    return p


def _checkpoint(tmp, model, corrupt):
    folder = tmp / "ckpt"
    shutil.copytree(model, folder)
    st = folder / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2] if corrupt == "truncated" else b"\x00garbage" * 64)
    return folder


def _unwritable(tmp):
    if os.geteuid() == 0:  # root ignores permission bits: use a read-only file system
        return "/proc/hfquant-test/out"
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return str(ro / "out")


# name -> (builder(tmp, model) -> argv, text expected in the message)
CASES = {
    "unknown top-level key": (lambda t, m: ["run", _recipe(t, m, modle="x")], "modle: unknown key"),
    "unknown quantization key": (lambda t, m: ["run", _recipe(t, m, quantization={"bitz": 4})], "quantization.bitz"),
    "bits as a string": (lambda t, m: ["run", _recipe(t, m, quantization={"bits": "4"})], "quantization.bits"),
    "bits 5": (lambda t, m: ["run", _recipe(t, m, quantization={"bits": 5})], "quantization.bits: got 5"),
    "group size 0": (lambda t, m: ["run", _recipe(t, m, quantization={"group_size": 0})], "quantization.group_size"),
    "unknown method": (lambda t, m: ["run", _recipe(t, m, quantization={"method": "awq"})], "quantization.method"),
    "field of another method": (lambda t, m: ["run", _recipe(t, m, quantization={"alpha": 0.5})],
                                "quantization.alpha: unknown key"),
    "override not a mapping": (lambda t, m: ["run", _recipe(t, m, quantization={"overrides": {"a": 1}})],
                               "quantization.overrides['a']: got 1; expected a non-empty mapping"),
    "override bad bits": (lambda t, m: ["run", _recipe(t, m, quantization={"overrides": {"re:.*down_proj": {"bits": 5}}})],
                          "quantization.overrides['re:.*down_proj'].bits: got 5"),
    "override unknown field": (lambda t, m: ["run", _recipe(t, m, quantization={"overrides": {"*": {"bitz": 4}}})],
                               "quantization.overrides['*'].bitz: unknown key"),
    "override matches nothing": (lambda t, m: ["run", _recipe(t, m, quantization={"overrides": {"*.nope": {"bits": 8}}})],
                                 "quantization.overrides['*.nope']: matches no quantizable module"),
    "bits auto without a budget": (lambda t, m: ["run", _recipe(t, m, quantization={"bits": "auto"})],
                                   "quantization.bits: got 'auto'; expected \"auto\" with exactly one of"),
    "budget without bits auto": (lambda t, m: ["run", _recipe(t, m, quantization={"target_avg_bits": 3.5})],
                                 "quantization.target_avg_bits: got 3.5; expected null unless bits is \"auto\""),
    "budget below the candidates": (lambda t, m: ["run", _recipe(t, m, quantization={"bits": "auto", "target_avg_bits": 1.5})],
                                    "quantization.target_avg_bits: 1.5 is below"),
    "smoothquant bits override": (lambda t, m: ["run", _raw(t, f"model: {m}\noutput_dir: {t / 'out'}\nquantization:\n"
                                                               "  method: smoothquant\n  overrides: {'*': {bits: 4}}\n")],
                                  "supports only skip overrides"),
    "token in recipe": (lambda t, m: ["run", _recipe(t, m, hub={"token": "hf_secret"})], "hub.token"),
    "missing model": (lambda t, m: ["run", _raw(t, f"output_dir: {t / 'out'}\n")], "model: required"),
    "nonexistent model path": (lambda t, m: ["run", _recipe(t, t / "nope" / "model")], "does not exist"),
    "model folder without config.json": (lambda t, m: ["run", _recipe(t, t)], "no config.json"),
    "model not a string": (lambda t, m: ["validate", _raw(t, "model: 3\noutput_dir: o\n")], "model: must be"),
    "missing calibration file": (lambda t, m: ["run", _recipe(t, m, calibration={"dataset": str(t / "no.txt")})],
                                 "calibration.dataset"),
    "empty calibration file": (lambda t, m: ["run", _recipe(t, m, calibration={"dataset": _file(t, "e.txt", "")})],
                               "calibration.dataset: file"),
    "too-short calibration text": (lambda t, m: ["run", _recipe(t, m, calibration={"dataset": _file(t, "s.txt", "a few words only\n")})],
                                   "seq_len"),
    "empty list of texts": (lambda t, m: ["run", _recipe(t, m, calibration={"dataset": []})], "calibration.dataset"),
    "calibration seq_len above the model's max": (lambda t, m: ["run", _recipe(t, m, calibration={"seq_len": 1024})],
                                                  "calibration.seq_len: 1024 exceeds the model's maximum of 256"),
    "evaluation seq_len above the model's max": (lambda t, m: ["run", _recipe(t, m, evaluation={"seq_len": 512, "max_tokens": 1024})],
                                                 "evaluation.seq_len"),
    "max_tokens below seq_len": (lambda t, m: ["run", _recipe(t, m, evaluation={"max_tokens": 10})], "evaluation.max_tokens"),
    "num_samples 0": (lambda t, m: ["run", _recipe(t, m, calibration={"num_samples": 0})], "calibration.num_samples"),
    "dtype float64": (lambda t, m: ["run", _recipe(t, m, dtype="float64")], "dtype"),
    "device tpu": (lambda t, m: ["run", _recipe(t, m, device="tpu")], "device"),
    "device cuda without CUDA": (lambda t, m: _no_cuda(["run", _recipe(t, m, device="cuda")]), "CUDA is not available"),
    "trust_remote_code yes": (lambda t, m: ["run", _recipe(t, m, trust_remote_code="yes")], "trust_remote_code"),
    "section not a mapping": (lambda t, m: ["run", _recipe(t, m, quantization=[1, 2])], "quantization: must be a mapping"),
    "output dir is a file": (lambda t, m: ["run", _recipe(t, m), "--output", _file(t, "afile", "x")], "is a file"),
    "output dir not empty": (lambda t, m: ["run", _recipe(t, m), "--output", _file(t, "full/x", "x").rsplit("/", 1)[0]],
                             "--overwrite"),
    "output dir below a file": (lambda t, m: ["run", _recipe(t, m), "--output", _file(t, "f", "x") + "/sub/out"], "is a file"),
    "output dir not writable": (lambda t, m: ["run", _recipe(t, m), "--output", _unwritable(t)], "output_dir"),
    "bad --set syntax": (lambda t, m: ["run", _recipe(t, m), "--set", "quantization.bits"], "expected key.path=value"),
    "--set into a value": (lambda t, m: ["run", _recipe(t, m), "--set", "model.x=1"], "model is not a section"),
    "--set invalid value": (lambda t, m: ["run", _recipe(t, m), "--set", "quantization.bits=[4"], "not valid YAML"),
    "--set makes bits 5": (lambda t, m: ["validate", _recipe(t, m), "--set", "quantization.bits=5"], "quantization.bits"),
    "bad YAML": (lambda t, m: ["run", _raw(t, "model: [unclosed\n")], "invalid YAML at line"),
    "non-mapping YAML": (lambda t, m: ["run", _raw(t, "- a\n- b\n")], "mapping"),
    "empty YAML": (lambda t, m: ["validate", _raw(t, "")], "empty"),
    "missing recipe file": (lambda t, m: ["run", t / "missing.yaml"], "file not found"),
    "recipe is a folder": (lambda t, m: ["validate", t], "is a folder"),
    "unknown CLI option": (lambda t, m: ["run", _recipe(t, m), "--bogus"], "unrecognized arguments"),
    "resume with smoothquant": (lambda t, m: ["run", _recipe(t, m, quantization=None), "--resume",
                                              "--set", "quantization.method=smoothquant"],
                                "--resume"),
    "bad --push-to-hub repo": (lambda t, m: ["run", _recipe(t, m), "--push-to-hub", "not a repo"], "--push-to-hub"),
    "eval of a truncated safetensors": (lambda t, m: ["eval", _checkpoint(t, m, "truncated")], "not a valid safetensors"),
    "inspect of a garbage safetensors": (lambda t, m: ["inspect", _checkpoint(t, m, "garbage")], "not a valid safetensors"),
    "eval of a folder without config": (lambda t, m: ["eval", t], "no config.json"),
    "inspect of a missing folder": (lambda t, m: ["inspect", t / "nothing"], "no such folder"),
    "push with a bad repo id": (lambda t, m: ["push", _checkpoint_ok(t, m), "no/such/repo"], "repo:"),
    "eval with seq-len 1": (lambda t, m: ["eval", _checkpoint_ok(t, m), "--seq-len", "1"], "evaluation.seq_len"),
}


def _file(tmp, name, text):
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return str(p)


def _no_cuda(argv):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    return argv


def _checkpoint_ok(tmp, model):
    folder = tmp / "ckpt"
    shutil.copytree(model, folder)
    return folder


def test_battery_has_enough_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exit_2_one_line_nothing_changed(case, tmp_path, tiny_models, capsys):
    build, expected = CASES[case]
    argv = build(tmp_path, tiny_models["llama"])
    before = snapshot(tmp_path)
    code, _, err = run_cli(argv, capsys)
    after = snapshot(tmp_path)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"{case}: exit {code}, stderr: {err[-1500:]}"
    assert len(lines) == 1 and lines[0].startswith("hfquant: error: "), f"{case}: {err[-1500:]}"
    assert "Traceback" not in err and expected in lines[0], f"{case}: {lines[0]}"
    assert after == before, f"{case}: the disk changed"
    assert not os.path.exists(tmp_path / "out")


def test_exception_in_api_is_a_config_error(tiny_models, tmp_path):
    from hfquant.app import recipe
    from hfquant.core.errors import ConfigError

    p = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], tmp_path / "o", quantization={"bits": 5})
    with pytest.raises(ConfigError, match=r"^quantization\.bits: "):
        recipe.load(p)
    assert yaml.safe_load(p.read_text())["quantization"]["bits"] == 5
