import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CPU paths are hfquant's defaults (the machine's recorded choices, hfquant.kernels.common.choose_path): the tests
# run what users run. Tests of other paths set HFQUANT_CPU_PREFILL / HFQUANT_CPU_W8A8 / HFQUANT_CPU_HALF themselves.
# The record is the session's own (its processes share it), not the user's file in ~/.cache/hfquant.
os.environ.setdefault("HFQUANT_CPU_CHOICES", os.path.join(tempfile.mkdtemp(prefix="hfquant-test-paths-"), "paths.json"))
if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under the interpreter (must be set before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

REFERENCE_MODEL = Path(os.environ.get("HFQUANT_REFERENCE_MODEL", Path(__file__).parent.parent / "models" / "smollm2-135m"))


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason=f"reference model not found at {REFERENCE_MODEL}; run scripts/prepare_reference_model.py")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "slow" in item.keywords and not (REFERENCE_MODEL / "config.json").is_file():
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Saved tiny float models, one folder per architecture (built once per session)."""
    from helpers import save_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny_model(arch, root / arch) for arch in ("llama", "qwen2", "opt", "gpt2", "bert", "gemma3")}
