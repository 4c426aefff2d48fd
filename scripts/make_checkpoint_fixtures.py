"""Write the frozen checkpoint fixtures of ``tests/formats/test_old_checkpoints.py`` with the ``hfquant`` that is importable.

    PYTHONPATH=/path/to/reference/checkout .venv/bin/python scripts/make_checkpoint_fixtures.py [--out DIR]

One folder per case under ``tests/fixtures/checkpoints/<case>/`` (``--out`` to write elsewhere), holding:

* the checkpoint exactly as ``save_pretrained`` wrote it (every ``save_format`` and scheme family: hfquant GPTQ W4 g32,
  RTN asym mixed 2/3/8-bit via ``overrides`` (``module_schemes`` in its config), an 8-bit head (``lm_head_bits``),
  GGUF Q4_K in the hfquant layout, SmoothQuant W8A8 dynamic and static, GPTQ layout, compressed-tensors W4A16 and
  W8A8, and ``model.gguf``);
* ``expected.safetensors``: ``input_ids`` (a fixed batch) and the ``logits`` of the checkpoint reloaded right after
  saving (``from_pretrained``; GPTQ layout: ``hfquant.formats.load_gptq``; compressed-tensors: transformers'
  compressed-tensors loader; GGUF: ``hfquant.formats.load_gguf``), on the reference kernels
  (``HFQUANT_KERNEL=reference``) with one thread, so the numbers do not depend on which fast CPU path a machine
  records;
* ``manifest.json``: the sha256 of every file, which files are the checkpoint, how to reload it, and the re-save
  checks with the sha256 of the files today's code writes (reload + ``save_pretrained`` in the same format; for
  compressed-tensors and the GPTQ/GGUF siblings also ``export_checkpoint`` of the hfquant-layout fixture made from the
  same quantized model).

Models (seeded, float32, built from a config, no download): a Llama with hidden 64, intermediate 128, 2 layers, vocab
320 (tied embeddings), and for the K-quant a Llama with hidden 256, intermediate 512, 1 layer (Q4_K needs rows that
are multiples of 256). Calibration: 8 windows of 32 tokens drawn from ``CALIBRATION_TEXT`` with the tests' tiny
byte-level BPE (320 tokens, trained on the bundled WikiText-2 text).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HFQUANT_KERNEL"] = "reference"  # expected logits on the exact reference kernels
os.environ.setdefault("HFQUANT_CPU_CHOICES", os.path.join(tempfile.mkdtemp(prefix="hfquant-fixture-paths-"), "p.json"))

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_identity import save_tiny_model, tiny_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "checkpoints"

CALIBRATION_TEXT = [
    "The quick brown fox jumps over the lazy dog while the river runs quietly past the old mill.",
    "In 1912 the ship left Southampton with more than two thousand people on board, bound for New York.",
    "Quantization maps each weight to one of a few levels; the scale and the zero point say which values they are.",
    "She opened the window, looked at the rain, and decided that the walk to the station could wait an hour.",
    "The committee met on Tuesday to discuss the budget, the new library, and the repairs to the bridge.",
    "Numbers such as 3.14159, 2.71828 and 1.41421 appear in many formulas of physics and engineering.",
    "He played the piano every evening, mostly Bach and Chopin, and sometimes a song of his own.",
    "Rivers, mountains and forests covered the northern half of the country until the railway arrived.",
]
CALIBRATION = dict(dataset=CALIBRATION_TEXT, num_samples=8, seq_len=32, calibration_batch_size=4)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             tie_word_embeddings=True)
K_QUANT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=True)
INPUT_SEED, INPUT_SHAPE = 1234, (2, 12)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def input_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, INPUT_SHAPE, generator=torch.Generator().manual_seed(INPUT_SEED))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------------- reloading (shared with the test)
def reload(folder: Path, how: str):
    """The checkpoint in ``folder`` reloaded as ``how`` says (see the module docstring)."""
    import hfquant  # noqa: F401 - registers quant_method "hfquant"
    from transformers import AutoModelForCausalLM

    if how == "from_pretrained":
        return AutoModelForCausalLM.from_pretrained(folder).eval()
    if how == "load_gptq":
        from hfquant.formats import load_gptq

        return load_gptq(folder).eval()
    if how == "transformers":  # compressed-tensors: transformers' own loader (no hfquant code)
        return AutoModelForCausalLM.from_pretrained(folder).eval()
    if how == "load_gguf":
        from hfquant.formats import load_gguf

        return load_gguf(folder / "model.gguf").eval()
    raise ValueError(how)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float().contiguous()


def resave(model, out: Path, save_format: str) -> dict[str, str]:
    """``save_pretrained`` of a reloaded model in ``save_format``; the sha256 of every file written."""
    model.config.quantization_config.save_format = save_format
    model.save_pretrained(out)
    return hashes(out)


def export(src: Path, fmt: str, out: Path) -> dict[str, str]:
    from hfquant.formats import export_checkpoint

    path = Path(export_checkpoint(src, fmt, out))
    return hashes(path.parent if path.is_file() else path)


# ----------------------------------------------------------------------------------------------------- the cases
def quantized(model_dir: Path, tokenizer, **config):
    import hfquant
    from transformers import AutoModelForCausalLM

    cfg = hfquant.HFQuantConfig(tokenizer=tokenizer, **(CALIBRATION if config.get("method") != "rtn" else {}), **config)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=cfg).eval()


CASES = {
    # model folder -> [(config, [(fixture name, save_format, how to reload)])]
    "small": [
        (dict(method="gptq", bits=4, group_size=32, sym=True),
         [("hfquant_gptq_w4g32_sym", "hfquant", "from_pretrained"), ("gptq_w4g32_sym", "gptq", "load_gptq"),
          ("ct_w4a16_g32_sym", "compressed-tensors", "transformers")]),
        (dict(method="rtn", bits=4, group_size=32, sym=False,
              overrides={"re:.*down_proj": {"bits": 8}, "*.layers.0.*": {"bits": 2}, "*.v_proj": {"bits": 3},
                         "model.layers.1.mlp.up_proj": {"skip": True}}),
         [("hfquant_rtn_mixed_asym_2_3_8", "hfquant", "from_pretrained")]),
        (dict(method="gptq", bits=4, group_size=32, sym=False, lm_head_bits=8),
         [("hfquant_gptq_w4g32_asym_lm_head8", "hfquant", "from_pretrained")]),
        (dict(method="smoothquant"),
         [("hfquant_sq_w8a8_dynamic", "hfquant", "from_pretrained"),
          ("ct_w8a8_dynamic", "compressed-tensors", "transformers")]),
        (dict(method="smoothquant", alpha=0.5, weight_method="gptq", activation_scheme="static"),
         [("hfquant_sq_w8a8_static_gptq", "hfquant", "from_pretrained"),
          ("ct_w8a8_static_gptq", "compressed-tensors", "transformers")]),
    ],
    "k_quant": [
        (dict(method="gptq", gguf_type="Q4_K"),
         [("hfquant_gguf_q4k", "hfquant", "from_pretrained"), ("gguf_q4k", "gguf", "load_gguf")]),
    ],
}


def make(out: Path) -> dict[str, dict]:
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    vocab = len(tok)
    ids = input_ids(vocab)
    work = Path(tempfile.mkdtemp(prefix="hfquant-fixtures-"))
    models = {"small": save_tiny_model(work / "small", "llama", seed=0, tokenizer=tok, **SMALL),
              "k_quant": save_tiny_model(work / "k_quant", "llama", seed=0, tokenizer=tok, **K_QUANT)}
    written: dict[str, dict] = {}
    from safetensors.torch import save_file

    for model_name, configs in CASES.items():
        for config, saves in configs:
            model = quantized(models[model_name], tok, **config)
            sibling = None  # the hfquant-layout fixture of this quantized model
            for name, save_format, how in saves:
                folder = out / name
                if folder.exists():
                    shutil.rmtree(folder)
                model.config.quantization_config.save_format = save_format
                model.save_pretrained(folder)
                checkpoint = sorted(p.name for p in folder.iterdir())
                if save_format == "gguf":  # the re-save writes the GGUF's tokenizer from the model's folder
                    for f in TOKENIZER_FILES:
                        shutil.copy2(models[model_name] / f, folder / f)
                manifest = {"model": model_name, "config": dict(config), "save_format": save_format,
                            "reload": how, "checkpoint_files": checkpoint,
                            "extra_files": [f for f in TOKENIZER_FILES if save_format == "gguf"],
                            "resave": []}
                # reload from a copy (the fixture folder will also hold expected.safetensors and manifest.json)
                scratch = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
                copy = scratch / "ckpt"
                copy.mkdir()
                for f in checkpoint + manifest["extra_files"]:
                    shutil.copy2(folder / f, copy / f)
                reloaded = reload(copy, how)
                save_file({"input_ids": ids, "logits": logits(reloaded, ids)}, folder / "expected.safetensors")
                if how == "load_gguf":
                    # load_gguf's model is transformers' own class (no save_format hook): it saves the hfquant
                    # layout, which exports back to GGUF (README: "saves, reloads and exports like a quantized run")
                    saved = scratch / "resaved" / "hfquant"  # the GGUF writer names the file after its source folder
                    files = resave(reloaded, saved, "hfquant")
                    for f in manifest["extra_files"]:
                        shutil.copy2(folder / f, saved / f)
                    manifest["resave"].append({"how": "reload+save_pretrained+export", "format": save_format,
                                               "saved_files": files,
                                               "files": export(saved, save_format, scratch / "resaved-gguf")})
                elif how != "transformers":
                    manifest["resave"].append({"how": "reload+save_pretrained", "save_format": save_format,
                                               "files": resave(reloaded, scratch / "resaved", save_format)})
                if sibling is not None and save_format != "hfquant":
                    src = scratch / "hfquant"  # the GGUF writer names the file after its source folder
                    src.mkdir()
                    for f in json.loads((sibling[0] / "manifest.json").read_text())["checkpoint_files"]:
                        shutil.copy2(sibling[0] / f, src / f)
                    for f in manifest["extra_files"]:  # a GGUF carries the tokenizer: beside the source, as in a run
                        shutil.copy2(folder / f, src / f)
                    manifest["resave"].append({"how": "export", "source": sibling[1], "format": save_format,
                                               "files": export(src, save_format, scratch / "exported")})
                del reloaded
                manifest["files"] = hashes(folder)
                (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
                if save_format == "hfquant":
                    sibling = (folder, name)
                written[name] = manifest
                print(f"{name}: {', '.join(f'{p.name} {p.stat().st_size}' for p in sorted(folder.iterdir()))}")
    shutil.rmtree(work, ignore_errors=True)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    import hfquant

    print(f"hfquant from {Path(hfquant.__file__).resolve().parent}")
    args.out.mkdir(parents=True, exist_ok=True)
    written = make(args.out)
    for name, m in written.items():
        same = [all(m["files"].get(k) == v for k, v in r["files"].items()) for r in m["resave"]]
        print(f"{name}: re-saves identical to the fixture: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
