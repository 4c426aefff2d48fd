"""Where hfquant's C++ extension is built and how builders wait for each other (``hfquant.kernels.jit_build``).

Most tests use a fake build (a function that sleeps or leaves torch's lock file behind) in a temporary
``HFQUANT_CACHE``; one compiles a tiny pybind11 module through torch for real, killing a first build midway.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hfquant.kernels import cpu_ext, jit_build
from hfquant.kernels.jit_build import build_folder, locked_build

ROOT = Path(__file__).resolve().parent.parent.parent
FLAGS = ["-O3", "-march=native", "-fopenmp"]

# A process that takes the build lock of ``folder`` and holds it inside a fake build: it touches ``ready``, then
# waits for ``release`` to appear (at most ``hold`` seconds); with ``baton``, it first creates torch's lock file
# in the folder as torch's load() does before it compiles, so that killing it leaves that file behind.
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from torch.utils.file_baton import FileBaton
    from hfquant.kernels.jit_build import locked_build

    folder, ready, release = (Path(a) for a in sys.argv[1:4])
    hold, baton = float(sys.argv[4]), sys.argv[5]
    def build():
        if baton == "baton":
            assert FileBaton(str(folder / "lock")).try_acquire()
        ready.touch()
        end = time.time() + hold
        while not release.exists() and time.time() < end:
            time.sleep(0.02)
        return 1
    locked_build(folder, build, "test kernels")
""")

WAITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from hfquant.kernels.jit_build import build_seconds, locked_build

    assert locked_build(Path(sys.argv[1]), lambda: 2, "test kernels") == 2
    print(build_seconds())
""")


def _env(cache: Path) -> dict:
    return {**os.environ, "HFQUANT_CACHE": str(cache), "PYTHONPATH": str(ROOT)}


def _start_holder(tmp_path: Path, folder: Path, hold: float = 60.0, baton: bool = False) -> subprocess.Popen:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, str(script), str(folder), str(ready), str(tmp_path / "release"), str(hold),
                             "baton" if baton else "-"], env=_env(tmp_path / "cache"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    end = time.time() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < end, "the holder never took the lock"
        time.sleep(0.02)
    return proc


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HFQUANT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ----------------------------------------------------------------------------------------------- the folder
def test_the_cache_root_follows_hfquant_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("HFQUANT_CACHE", str(tmp_path / "h"))
    assert jit_build.cache_root() == tmp_path / "h"
    assert build_folder("x", FLAGS, b"src").parent == tmp_path / "h" / "extensions"
    monkeypatch.delenv("HFQUANT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert jit_build.cache_root() == tmp_path / "x" / "hfquant"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert jit_build.cache_root() == Path.home() / ".cache" / "hfquant"


def test_the_build_folder_changes_with_everything_the_build_depends_on(cache, monkeypatch):
    base = build_folder("hfquant_cpu", FLAGS, b"source")
    assert base == build_folder("hfquant_cpu", list(FLAGS), b"source")  # stable
    assert base.name.startswith("hfquant_cpu-") and base.parent == cache / "extensions"
    others = {
        "flags": build_folder("hfquant_cpu", [*FLAGS, "-mno-avx512vnni"], b"source"),
        "source": build_folder("hfquant_cpu", FLAGS, b"source v2"),
        "name": build_folder("hfquant_cpu_avx2", FLAGS, b"source"),
    }
    changes = {
        "torch path": (torch, "__file__", "/elsewhere/venv2/site-packages/torch/__init__.py"),
        "torch version": (torch, "__version__", "2.99.0+cpu"),
        "python tag": (sys.implementation, "cache_tag", "cpython-399"),
        "cpu": (jit_build, "cpu_description", lambda: "another CPU model and flags"),
    }
    for what, (obj, attr, value) in changes.items():
        with monkeypatch.context() as m:
            m.setattr(obj, attr, value)
            others[what] = build_folder("hfquant_cpu", FLAGS, b"source")
    with monkeypatch.context() as m:
        m.setenv("CXX", "clang++")
        others["compiler"] = build_folder("hfquant_cpu", FLAGS, b"source")
    assert base not in others.values() and len(set(others.values())) == len(others), others
    assert build_folder("hfquant_cpu", FLAGS, b"source") == base  # everything restored: the same again


def test_the_build_key_covers_every_source_file(cache):
    """hfquant's extension is several files (``csrc/``: one per kernel family, the shared header, the registration):
    every one of them is in ``cpu_ext.SOURCES``, and a change to any one, the header included, or a renamed file gives
    another build folder. One file alone keys on its bytes, as before."""
    on_disk = sorted(p.name for p in cpu_ext.CSRC.iterdir() if p.suffix in (".cpp", ".h"))
    assert [p.name for p in cpu_ext.SOURCES] == on_disk and {"common.h", "ops.cpp"} <= set(on_disk)
    files = {p.name: p.read_bytes() for p in cpu_ext.SOURCES}
    base = build_folder(cpu_ext.NAME, FLAGS, jit_build.sources_text(files))
    for name in files:
        changed = {**files, name: files[name] + b"\n// changed\n"}
        assert build_folder(cpu_ext.NAME, FLAGS, jit_build.sources_text(changed)) != base, name
    renamed = {("shared.h" if n == "common.h" else n): t for n, t in files.items()}
    assert build_folder(cpu_ext.NAME, FLAGS, jit_build.sources_text(renamed)) != base
    assert jit_build.sources_text({"tiny.cpp": TINY.encode()}) == TINY.encode()


def test_the_cpu_counts_only_for_march_native(cache, monkeypatch):
    haswell = build_folder("x", ["-O3", "-march=haswell"], b"s")
    native = build_folder("x", FLAGS, b"s")
    monkeypatch.setattr(jit_build, "cpu_description", lambda: "another CPU model and flags")
    assert build_folder("x", ["-O3", "-march=haswell"], b"s") == haswell
    assert build_folder("x", FLAGS, b"s") != native


def test_the_isa_picks_the_build_and_so_its_folder(cache, monkeypatch):
    """``cpu_isa()`` chooses the module name and flags (``-march=haswell`` on AVX2), hence another folder."""
    from helpers import running_as

    seen = []
    def load_extension(name, source, cflags, label):
        seen.append((name, cflags))
        return SimpleNamespace(path=lambda: "avx2")

    monkeypatch.setattr(cpu_ext, "load_extension", load_extension)
    monkeypatch.setattr(cpu_ext, "_STATE", {})
    if cpu_ext.cpu_isa() in ("other", "avx2"):
        pytest.skip("needs a CPU above AVX2 to compare with its AVX2 build")
    cpu_ext._build()
    with running_as("avx2", monkeypatch):
        cpu_ext._build()
    (n1, f1), (n2, f2) = seen
    assert n1 == "hfquant_cpu" and n2 == "hfquant_cpu_avx2" and "-march=haswell" in f2
    assert build_folder(n1, f1, b"s") != build_folder(n2, f2, b"s")


# ------------------------------------------------------------------------------------------------- the lock
def test_a_second_process_says_it_is_waiting_for_the_build(cache, tmp_path):
    folder = build_folder("fake", FLAGS, b"s")
    holder = _start_holder(tmp_path, folder)
    try:
        script = tmp_path / "waiter.py"
        script.write_text(WAITER)
        waiter = subprocess.Popen([sys.executable, str(script), str(folder)], env=_env(cache),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = waiter.stderr.readline()  # plain library use: no logging configured, Python's last-resort handler
        assert "hfquant: waiting for another process's build of test kernels" in line, line
        assert f"(pid {holder.pid};" in line
        (tmp_path / "release").touch()
        out, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0, err
        assert "waited" in err and "building" not in err  # the holder built it; the waiter only loaded it
        assert float(out) > 0  # the wait counts as build time
    finally:
        (tmp_path / "release").touch()
        _, holder_err = holder.communicate(timeout=60)
    assert "hfquant: building test kernels (once per environment)" in holder_err


def test_the_messages_show_under_the_clis_quiet_flag(cache, tmp_path, capsys):
    from hfquant.app import cli

    logger = logging.getLogger("hfquant")
    saved = logger.handlers[:], logger.level, logger.propagate
    folder = build_folder("fake", FLAGS, b"s")
    holder = _start_holder(tmp_path, folder, hold=1.5)  # lets go by itself
    try:
        cli._setup_logging(quiet=True, verbose=False)
        assert logger.level == logging.WARNING
        capsys.readouterr()
        before = jit_build.build_seconds()
        assert locked_build(folder, lambda: 2, "test kernels") == 2
        err = capsys.readouterr().err
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
        holder.communicate(timeout=60)
    assert "hfquant: waiting for another process's build of test kernels" in err, err
    assert jit_build.build_seconds() - before > 0.5


def test_a_killed_build_leaves_no_lock_that_makes_the_next_one_wait(cache, tmp_path):
    """A build killed with SIGKILL leaves torch's ``lock`` file (torch's ``load`` would wait on it forever);
    hfquant's lock died with it, so the next builder knows that file is stale and removes it."""
    from torch.utils.file_baton import FileBaton

    folder = build_folder("fake", FLAGS, b"s")
    holder = _start_holder(tmp_path, folder, baton=True)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.communicate(timeout=60)
    assert (folder / "lock").exists()

    def like_torch():  # what torch's _jit_compile does around a build
        baton = FileBaton(str(folder / "lock"))
        if baton.try_acquire():
            baton.release()
            return "built"
        baton.wait()
        return "waited"

    result = []
    worker = threading.Thread(target=lambda: result.append(locked_build(folder, like_torch, "test kernels")),
                              daemon=True)
    t0 = time.perf_counter()
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the build waited on the killed build's lock file"
    assert result == ["built"] and time.perf_counter() - t0 < 10
    assert not (folder / "lock").exists()


TINY = """
#include <pybind11/pybind11.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""

LOAD_TINY = textwrap.dedent("""
    import sys
    from pathlib import Path
    from hfquant.kernels.jit_build import build_seconds, load_extension

    ext = load_extension("hfquant_test_tiny", Path(sys.argv[1]), ["-O1"], "test kernels")
    print(ext.answer(), build_seconds())
""")


def test_a_real_build_killed_midway_then_built_once_then_loaded(cache, tmp_path):
    """torch's own load() in hfquant's folder: kill a first build in the middle of compiling (its process group,
    compiler included), then the next process builds it without waiting, and a third one only loads it."""
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY)
    script = tmp_path / "load_tiny.py"
    script.write_text(LOAD_TINY)
    folder = build_folder("hfquant_test_tiny", ["-O1"], TINY.encode())
    first = subprocess.Popen([sys.executable, str(script), str(source)], env=_env(cache), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    end = time.time() + 120
    while not (folder / "lock").exists():  # torch's lock: taken right before ninja runs
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert time.time() < end
        time.sleep(0.005)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate(timeout=60)
    assert (folder / "lock").exists()

    def run():
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), str(source)], env=_env(cache), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        answer, seconds = proc.stdout.split()
        assert answer == "42"
        return proc.stderr, float(seconds), time.perf_counter() - t0

    err, seconds, _ = run()
    assert "hfquant: building test kernels (once per environment)" in err and "waiting" not in err, err
    assert seconds > 0 and not (folder / "lock").exists()
    assert json.loads((folder / jit_build.MARKER).read_text())["name"] == "hfquant_test_tiny"
    err, seconds, _ = run()
    assert "building" not in err and "waiting" not in err and seconds == 0.0, err


# ---------------------------------------------------------------------------------------------- the timings
def _report(timings: dict, quantization: dict | None = None) -> dict:
    return {"model_name": "m", "evaluation": {}, "quantization": quantization or {}, "timings": timings,
            "source_mib": 1.0, "checkpoint_bytes": 2**20,
            "config": {"method": "rtn", "sym": True, "bits": 4, "group_size": 32}}


def test_the_table_shows_a_kernel_build_on_its_own_line():
    from hfquant.app.report import table

    text = table(_report({"quantize": 1.8, "kernel_build": 441.9}))
    assert "| 1.8 |" in text and "441.9 |" not in text
    assert text.splitlines()[-1] == ("hfquant's CPU kernels were built in this run: 441.9 s "
                                     "(not counted in quantization)")
    assert "built in this run" not in table(_report({"quantize": 1.8, "kernel_build": 0.02}))
    assert "built in this run" not in table(_report({"quantize": 1.8}))
    assert "41.0 s" in table(_report({}, {"quantization_seconds": 1.8, "kernel_build_seconds": 41.0}))


def _slow_fake_build(monkeypatch, cache: Path, seconds: float):
    """hfquant's CPU extension as a fake that takes ``seconds`` to "build", through the real lock and bookkeeping,
    and then is not used (its ``path()`` says "scalar", which ``cpu_ext`` turns down for torch's int4 kernel)."""
    if cpu_ext.cpu_isa() == "other" or os.environ.get("HFQUANT_CPU_EXTENSION") == "0":
        pytest.skip("hfquant builds no CPU extension here")

    def build():
        time.sleep(seconds)
        return SimpleNamespace(path=lambda: "scalar")

    def compile_kernel(name="hfquant_cpu", extra_cflags=()):
        return locked_build(cache / "extensions" / f"fake-{name}", build, cpu_ext.LABEL)

    monkeypatch.setattr(cpu_ext, "_STATE", {})
    monkeypatch.setattr(cpu_ext, "compile_kernel", compile_kernel)


def test_quantize_keeps_a_kernel_build_out_of_quantization_seconds(cache, monkeypatch, tiny_models):
    from transformers import AutoModelForCausalLM

    import hfquant.integrations.transformers as integration
    from hfquant import HFQuantConfig, quantize_

    _slow_fake_build(monkeypatch, cache, 0.6)
    real = integration.quantize_loaded_model_

    def building_first(*args, **kwargs):  # as a GPTQ run on the CPU that meets its first quantized module
        cpu_ext.extension()
        return real(*args, **kwargs)

    monkeypatch.setattr(integration, "quantize_loaded_model_", building_first)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    t0 = time.perf_counter()
    report = quantize_(model, HFQuantConfig(method="rtn", group_size=32))
    wall = time.perf_counter() - t0
    assert report["kernel_build_seconds"] >= 0.6
    assert report["quantization_seconds"] <= wall - 0.6


def test_a_quiet_run_builds_first_and_reports_it_apart(cache, monkeypatch, tiny_models, tmp_path, capsys):
    """``hfquant -q run`` on the CPU: the build is announced anyway, happens before anything is timed, and is on its
    own line under the table, in report.json and in the model card; ``hfquant -q eval`` likewise."""
    from helpers import run_cli, write_recipe

    _slow_fake_build(monkeypatch, cache, 1.2)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], tmp_path / "out",
                          quantization={"method": "rtn", "group_size": 32}, evaluation={"before": False})
    code, out, err = run_cli(["-q", "run", recipe], capsys)
    assert code == 0, err
    assert "building hfquant's CPU kernels (once per environment)" in err
    note = "hfquant's CPU kernels were built in this run:"
    assert note in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["timings"]["kernel_build"] >= 1.2
    assert "kernel_build_seconds" not in report["quantization"]  # built before quantize_ started
    assert note in (tmp_path / "out" / "README.md").read_text()

    # hfquant eval: built before the model loads, said apart from the perplexity
    monkeypatch.setattr(cpu_ext, "_STATE", {})
    for marker in cache.glob(f"extensions/fake-*/{jit_build.MARKER}"):
        marker.unlink()  # as in another environment: builds again
    code, out, err = run_cli(["-q", "eval", tmp_path / "out"], capsys)
    assert code == 0, err
    assert "building hfquant's CPU kernels" in err
    assert out.splitlines()[0].startswith("perplexity ")
    assert out.splitlines()[1].startswith(note) and out.splitlines()[1].endswith("(not counted in the evaluation)")
