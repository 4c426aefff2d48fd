"""Checkpoints written by an earlier hfquant (``tests/fixtures/checkpoints``, made by
``scripts/make_checkpoint_fixtures.py`` at commit 4ba9b0f) still load to exactly the same logits, and re-saving them
writes exactly the same files.

Each fixture folder holds the checkpoint as it was saved, ``expected.safetensors`` (``input_ids`` and the ``logits``
of the checkpoint reloaded right after saving) and ``manifest.json`` (the sha256 of every file, which files are the
checkpoint, how it reloads, and the re-save checks with the sha256 of the files the fixture's code wrote). The logits
are computed on the reference kernels (``HFQUANT_KERNEL=reference``) with one thread, as they were made, so the
comparison does not depend on which fast CPU path this machine records.

Re-save checks (all run with the current code):

* ``reload+save_pretrained``: the reloaded model saved again in the fixture's ``save_format`` (hfquant layout,
  GPTQ layout after ``load_gptq``, ``model.gguf`` after ``load_gguf``);
* ``export``: ``export_checkpoint`` of the hfquant-layout fixture made from the same quantized model (its
  ``source``) to the fixture's format. Compressed-tensors fixtures have only this one: they reload through
  transformers' compressed-tensors integration (hfquant has no importer for them), so a reload+save would test the
  compressed-tensors library, not hfquant.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent.parent / "fixtures" / "checkpoints"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "manifest.json").is_file()) if FIXTURES.is_dir() else []


def _manifest(case: str) -> dict:
    return json.loads((FIXTURES / case / "manifest.json").read_text())


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _copy_checkpoint(case: str, dst: Path) -> Path:
    """The fixture's checkpoint (and the files its re-save needs) alone in ``dst``: not beside
    ``expected.safetensors``, which a loader or exporter globbing ``*.safetensors`` would read."""
    m = _manifest(case)
    dst.mkdir(parents=True)
    for name in m["checkpoint_files"] + m["extra_files"]:
        shutil.copy2(FIXTURES / case / name, dst / name)
    return dst


def _reload(folder: Path, how: str):
    import hfquant  # also registers quant_method "hfquant" with transformers
    from transformers import AutoModelForCausalLM

    if how in ("from_pretrained", "transformers"):  # transformers: compressed-tensors' loader, no hfquant code
        return AutoModelForCausalLM.from_pretrained(folder).eval()
    if how == "load_gptq":
        return hfquant.load_gptq(folder).eval()
    if how == "load_gguf":
        from hfquant.formats import load_gguf

        return load_gguf(folder / "model.gguf").eval()
    raise ValueError(how)


def _export(src: Path, fmt: str, out: Path) -> None:
    import hfquant

    path = Path(hfquant.export_checkpoint(src, fmt, out))
    assert path in (out, out / "model.gguf")


@pytest.fixture
def as_made(monkeypatch):
    """The reference kernels and one thread, as the expected logits were computed."""
    monkeypatch.setenv("HFQUANT_KERNEL", "reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_fixture_is_here():
    assert len(CASES) >= 11, CASES
    formats = {_manifest(c)["save_format"] for c in CASES}
    assert formats == {"hfquant", "gptq", "compressed-tensors", "gguf"}


@pytest.mark.parametrize("case", CASES)
def test_fixture_files_are_unchanged(case):
    m = _manifest(case)
    on_disk = {k: v for k, v in _hashes(FIXTURES / case).items() if k != "manifest.json"}
    assert on_disk == m["files"]


@pytest.mark.parametrize("case", CASES)
def test_reload_gives_the_frozen_logits(case, tmp_path, as_made):
    m = _manifest(case)
    model = _reload(_copy_checkpoint(case, tmp_path / "ckpt"), m["reload"])
    expected = load_file(str(FIXTURES / case / "expected.safetensors"))
    with torch.no_grad():
        got = model(input_ids=expected["input_ids"]).logits.float()
    assert got.shape == expected["logits"].shape
    assert torch.equal(got, expected["logits"]), float((got - expected["logits"]).abs().max())


@pytest.mark.parametrize("case", CASES)
def test_resave_writes_the_same_files(case, tmp_path, as_made):
    m = _manifest(case)
    assert m["resave"], "every fixture has at least one re-save check"
    for i, check in enumerate(m["resave"]):
        out = tmp_path / f"out{i}"
        if check["how"] == "reload+save_pretrained":
            model = _reload(_copy_checkpoint(case, tmp_path / f"ckpt{i}"), m["reload"])
            model.config.quantization_config.save_format = check["save_format"]
            model.save_pretrained(out)
        elif check["how"] == "reload+save_pretrained+export":
            # load_gguf gives transformers' own model class, without hfquant's save_format hook: it saves the
            # hfquant layout, which exports back to GGUF. The folder's name is the GGUF's general.name ("hfquant").
            model = _reload(_copy_checkpoint(case, tmp_path / f"ckpt{i}"), m["reload"])
            saved = tmp_path / f"saved{i}" / "hfquant"
            model.save_pretrained(saved)
            assert _hashes(saved) == check["saved_files"]
            for name in m["extra_files"]:  # the tokenizer the GGUF writer reads, beside the checkpoint as in a run
                shutil.copy2(FIXTURES / case / name, saved / name)
            _export(saved, check["format"], out)
        else:
            # the exported model's source: the hfquant-layout fixture of the same quantized model, in a folder
            # named "hfquant" (the GGUF's general.name), with this fixture's tokenizer beside it for a GGUF
            src = tmp_path / f"src{i}" / "hfquant"
            src.mkdir(parents=True)
            for name in _manifest(check["source"])["checkpoint_files"]:
                shutil.copy2(FIXTURES / check["source"] / name, src / name)
            for name in m["extra_files"]:
                shutil.copy2(FIXTURES / case / name, src / name)
            _export(src, check["format"], out)
        got = _hashes(out)
        assert got == check["files"], f"{check['how']}: {sorted(k for k in got if got.get(k) != check['files'].get(k))}"
        # ... and that is the fixture itself: every file written (weights, config.json, generation_config.json,
        # quantize_config.json, model.gguf) is byte for byte the fixture's
        assert set(m["checkpoint_files"]) & set(got), check["how"]
        assert [k for k, v in got.items() if m["files"].get(k) != v] == [], check["how"]
