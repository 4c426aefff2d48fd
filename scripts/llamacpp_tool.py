"""llama.cpp's side of ``scripts/bench_gguf.py``, run by the llama-cpp-python venv (``scripts/setup_llamacpp_venv.sh``):

    python scripts/llamacpp_tool.py quantize IN.gguf OUT.gguf TYPE     # llama_model_quantize, no importance matrix
    python scripts/llamacpp_tool.py ppl FILE.gguf WINDOWS.json         # PPL over the given token windows

Prints one JSON object. ``ppl`` evaluates each window from an empty cache and scores tokens 1..n-1 with the
logits llama.cpp computes (the same protocol as ``hfquant.eval.perplexity``). Imports only the standard library,
numpy and llama_cpp, so it runs in that venv without hfquant.

Where llama-cpp-python was installed without its own library (``LLAMA_BUILD=OFF``: ``setup_llamacpp_venv.sh`` after
``build_llamacpp_tools.sh``), ``LLAMA_CPP_LIB_PATH`` defaults to the libraries that ``build_llamacpp_tools.sh``
built (``build/llamacpp/bin``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import math
import os
from pathlib import Path
import sys
import time

# llama.cpp's llama_ftype values (include/llama.h)
FTYPES = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12,
          "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18}
BUILT_LIB = Path(__file__).resolve().parent.parent / "build" / "llamacpp" / "bin"


def _default_lib_path() -> None:
    """Point llama-cpp-python at ``BUILT_LIB`` when its package holds no libllama of its own."""
    spec = importlib.util.find_spec("llama_cpp")
    own = spec is not None and any(Path(d, "lib", "libllama.so").exists() for d in spec.submodule_search_locations or ())
    if not own and "LLAMA_CPP_LIB_PATH" not in os.environ and (BUILT_LIB / "libllama.so").exists():
        os.environ["LLAMA_CPP_LIB_PATH"] = str(BUILT_LIB)


def quantize(src: str, dst: str, kind: str) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.nthread = 2
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")
    return {"seconds": time.perf_counter() - t0, "llama_cpp_python": llama_cpp.__version__}


def ppl(path: str, windows_file: str) -> dict:
    import numpy as np
    from llama_cpp import Llama

    windows = json.loads(open(windows_file).read())
    n = len(windows[0])
    llm = Llama(model_path=path, n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, n_threads=2, verbose=False)
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    return {"ppl": math.exp(nll / count), "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    _default_lib_path()
    cmd, *args = sys.argv[1:]
    print(json.dumps({"quantize": quantize, "ppl": ppl}[cmd](*args)))
