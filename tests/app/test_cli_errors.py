"""Bad-input battery: each malformed recipe, override, path or checkpoint gives exit code 2, one line on
stderr without a traceback, and leaves the disk exactly as it was."""

import fcntl
import hashlib
import os
import shutil
import stat

import pytest
import yaml

from helpers import run_cli, write_recipe


def snapshot(root):
    """Every path under ``root`` with its type, size, mode, mtime and (files) content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            digest = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mode, st.st_mtime_ns, digest)
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
    # issue 31, 1: an output folder whose replacement (--overwrite) would delete something the user has
    "output is the model folder": (lambda t, m: ["run", _recipe(t, _own_model(t, m)), "--output", t / "model",
                                                 "--overwrite"], "is the input model"),
    "output contains the model folder": (lambda t, m: ["run", _recipe(t, _own_model(t, m, "models/m")), "--output",
                                                       t / "models", "--overwrite"], "contains the input model"),
    "output inside the model folder": (lambda t, m: ["run", _recipe(t, _own_model(t, m)), "--output",
                                                     t / "model" / "q", "--overwrite"], "is inside the input model"),
    "output is the current directory": (lambda t, m: _in_cwd(t, ["run", _recipe(t, m), "--output", ".", "--overwrite"]),
                                        "is the current directory"),
    "output contains the current directory": (lambda t, m: _in_cwd(t / "work", ["run", _recipe(t, m), "--output", t,
                                                                                "--overwrite"]),
                                              "contains the current directory"),
    "output is the home directory": (lambda t, m: _as_home(t / "home", ["run", _recipe(t, m), "--output", t / "home",
                                                                        "--overwrite"]), "is your home directory"),
    "output contains the home directory": (lambda t, m: _as_home(t / "home" / "me", ["run", _recipe(t, m), "--output",
                                                                                     t / "home", "--overwrite"]),
                                           "contains your home directory"),
    "output contains the calibration file": (lambda t, m: ["run", _recipe(t, m, calibration={"dataset": _file(
        t, "data/cal.txt", "some text " * 400)}), "--output", t / "data", "--overwrite"], "contains the calibration dataset"),
    "output contains the recipe": (lambda t, m: ["run", _recipe_in(t / "runs", m), "--output", t / "runs",
                                                 "--overwrite"], "contains the recipe"),
    "sensitivity output is the model folder": (lambda t, m: ["sensitivity", _recipe(t, _own_model(t, m)), "--output",
                                                             t / "model", "--overwrite"], "is the input model"),
    # issue 31, 7: a second run on an output that another run is writing
    "output being written by another run": (lambda t, m: _locked(t / "out", ["run", _recipe(t, m)]),
                                            "another hfquant run"),
    "overwrite of an output being written": (lambda t, m: _locked(t / "done", ["run", _recipe(t, m), "--output", _file(
        t, "done/x", "x").rsplit("/", 1)[0], "--overwrite"]), "another hfquant run"),
    # issue 31, 6: checkpoints whose config.json and tensors disagree, found from the headers before any work
    "export of a config saying 8 bits over 4-bit tensors": (
        lambda t, m: ["export", _quantized(t, m, bits=8), "--format", "gptq", t / "exported"],
        "model.layers.0.self_attn.q_proj.weight in model.safetensors is I32 [64, 2, 4], but config.json "
        "(model.layers.0.self_attn.q_proj: 8-bit codes, group_size 32) expects I32 tensor [64, 2, 8]"),
    "export of a shard index without the embeddings": (
        lambda t, m: ["export", _sharded(t, m, "model.embed_tokens.weight"), "--format", "gguf", t / "exported"],
        "model.embed_tokens.weight, which config.json's LlamaForCausalLM needs, is missing from "
        "model.safetensors.index.json"),
    "eval of a shard index without the embeddings": (
        lambda t, m: ["eval", _sharded(t, m, "model.embed_tokens.weight")], "model.embed_tokens.weight, which"),
    "run of a model whose index lacks the embeddings": (
        lambda t, m: ["run", _recipe(t, _sharded(t, m, "model.embed_tokens.weight"))],
        "model.embed_tokens.weight, which config.json's LlamaForCausalLM needs, is missing from "
        "model.safetensors.index.json"),
    "eval of an index entry in a missing shard": (lambda t, m: ["eval", _sharded(t, m, shard_gone=True)],
                                                  "which is not in the folder"),
    "inspect of a config saying bits 5": (lambda t, m: ["inspect", _quantized(t, m, bits=5)],
                                          "config.json': quantization_config.bits: got 5; expected one of [2, 3, 4, 8]"),
    "eval of a config/tensor shape mismatch": (lambda t, m: ["eval", _edited(t, m, intermediate_size=128)],
                                               "model.layers.0.mlp.gate_proj.weight in model.safetensors is F32 "
                                               "[160, 64], but config.json (model.layers.0.mlp.gate_proj: Linear) "
                                               "expects a float tensor [128, 64]"),
    "push of a config/tensor shape mismatch": (lambda t, m: ["push", _edited(t, m, vocab_size=400), "someone/repo"],
                                               "expects a float tensor [400, 64]"),
    # issue 31, 5: GGUF files
    "inspect of a garbage .gguf": (lambda t, m: ["inspect", _file(t, "g/model.gguf", "GGUF but not really").rsplit("/", 1)[0]],
                                   "not a readable GGUF file"),
    "push of a bare .gguf file": (lambda t, m: ["push", _file(t, "g/model.gguf", "GGUF"), "someone/repo"],
                                  "is a file; give the folder that holds it"),
    # issue 31, 8: late failures and lax validation, now refused up front
    "gguf_type on GPT-2's Conv1D": (lambda t, m: ["run", _recipe(t, m.parent / "gpt2", quantization={
        "method": "rtn", "gguf_type": "Q8_0"})], "quantization.gguf_type: transformer.h.0.attn.c_attn is a Conv1D"),
    "duplicate YAML key": (lambda t, m: ["run", _raw(t, f"model: {m}\noutput_dir: {t / 'out'}\nquantization:\n"
                                                        "  bits: 4\n  bits: 8\n")], "duplicate key 'bits'"),
    "duplicate key in --set": (lambda t, m: ["run", _recipe(t, m), "--set", "quantization={bits: 4, bits: 3}"],
                               "duplicate key 'bits'"),
    "huge seed": (lambda t, m: ["run", _recipe(t, m, calibration={"seed": 2**70})], "calibration.seed"),
    "empty tokenizer": (lambda t, m: ["run", _recipe(t, m, calibration={"tokenizer": ""})],
                        "calibration.tokenizer: got ''; expected null"),
    "smoothquant with bits": (lambda t, m: ["run", _raw(t, f"model: {m}\noutput_dir: {t / 'out'}\nquantization:\n"
                                                           "  method: smoothquant\n  bits: 4\n")],
                              "quantization.bits: unknown key"),
    "model already quantized": (lambda t, m: ["run", _recipe(t, _quantized(t, m))], "is already quantized"),
    "empty model": (lambda t, m: ["run", _raw(t, f"model: ''\noutput_dir: {t / 'out'}\n")], "got an empty string"),
    "empty output_dir": (lambda t, m: ["run", _raw(t, f"model: {m}\noutput_dir: ''\n")], "got an empty string"),
    "empty calibration dataset": (lambda t, m: ["run", _recipe(t, m, calibration={"dataset": ""})],
                                  "calibration.dataset: got ''; expected"),
    "non-UTF-8 calibration text": (lambda t, m: ["run", _recipe(t, m, calibration={"dataset": _bytes(
        t, "latin1.txt", "caf\xe9 au lait ".encode("latin-1") * 300)})], "is not UTF-8 text (byte 0xe9 at offset 3"),
    "non-UTF-8 evaluation text": (lambda t, m: ["eval", _checkpoint_ok(t, m), "--dataset", _bytes(
        t, "e.txt", b"ok " * 5000 + b"\xff")], "is not UTF-8 text (byte 0xff at offset 15000"),
    "model is a file": (lambda t, m: ["run", _recipe(t, _file(t, "model.bin", "x"))], "is a file, not a model folder"),
    "calibration dataset is a folder": (lambda t, m: ["run", _recipe(t, m, calibration={"dataset": str(t)})],
                                        "is a folder, not a file"),
    "empty revision": (lambda t, m: ["run", _recipe(t, m, revision="")], "revision: must be"),
}

_HELD: list[int] = []  # lock files held open by the cases below, released after each test


def _bytes(tmp, name, data: bytes):
    p = tmp / name
    p.write_bytes(data)
    return str(p)


def _own_model(tmp, model, where="model"):
    folder = tmp / where
    shutil.copytree(model, folder)
    return folder


def _in_cwd(folder, argv):
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)  # restored by the test (monkeypatch.chdir)
    return argv


def _as_home(folder, argv):
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["HOME"] = str(folder)  # restored by the test
    return argv


def _recipe_in(folder, model):
    folder.mkdir(parents=True, exist_ok=True)
    return write_recipe(folder / "r.yaml", model, folder)


def _locked(out, argv):
    """``argv`` while another open file holds ``out``'s run lock, as a concurrent ``hfquant run`` does."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.parent / f".{out.name}.hfquant-lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX)
    _HELD.append(fd)
    return argv


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


def _quantized(tmp, model, **changes):
    """A copy of an RTN W4 g32 checkpoint of ``model`` (made once, beside it) with ``changes`` in its
    quantization_config."""
    import json

    import transformers

    from hfquant import HFQuantConfig

    cached = model.parent / f"{model.name}-rtn-g32"
    if not cached.exists():
        transformers.AutoModelForCausalLM.from_pretrained(
            model, quantization_config=HFQuantConfig(method="rtn", group_size=32)).save_pretrained(cached)
    folder = tmp / "ckpt"
    shutil.copytree(cached, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _edited(tmp, model, **changes):
    """A copy of ``model`` whose config.json has ``changes``."""
    import json

    folder = _checkpoint_ok(tmp, model)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _sharded(tmp, model, drop=None, shard_gone=False):
    """``model`` saved in shards, ``drop`` left out of the index (the shard still holds it), or (``shard_gone``) one
    shard deleted."""
    import json

    import transformers

    folder = tmp / "ckpt"
    transformers.AutoModelForCausalLM.from_pretrained(model).save_pretrained(folder, max_shard_size="100KB")
    shutil.copy(model / "tokenizer.json", folder / "tokenizer.json")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    if drop is not None:
        del data["weight_map"][drop]
    index.write_text(json.dumps(data))
    if shard_gone:
        (folder / sorted(set(data["weight_map"].values()))[-1]).unlink()
    return folder


def _checkpoint_ok(tmp, model):
    folder = tmp / "ckpt"
    shutil.copytree(model, folder)
    return folder


def test_battery_has_enough_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exit_2_one_line_nothing_changed(case, tmp_path, tiny_models, capsys, monkeypatch):
    build, expected = CASES[case]
    monkeypatch.chdir(os.getcwd())  # restored after the cases that change it
    monkeypatch.setenv("HOME", os.environ.get("HOME", str(tmp_path)))
    model_before = snapshot(tiny_models["llama"])
    try:
        argv = build(tmp_path, tiny_models["llama"])
        before = snapshot(tmp_path)
        code, _, err = run_cli(argv, capsys)
        after = snapshot(tmp_path)
    finally:
        while _HELD:
            os.close(_HELD.pop())
    assert snapshot(tiny_models["llama"]) == model_before, f"{case}: the input model changed"
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
