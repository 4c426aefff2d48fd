"""The machine's record of CPU path choices (``hfquant.kernels.choices``): written once, read by every process, safe
under concurrent first timings, and harmless where it cannot be written."""

import json
import subprocess
import sys
import time
import warnings

import pytest
import torch

import hfquant.kernels.choices as record


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A record file of the test's own, and a process that has not read one yet."""
    monkeypatch.setenv("HFQUANT_CPU_CHOICES", str(tmp_path / "paths.json"))
    monkeypatch.setattr(record, "_STATE", {})
    return tmp_path / "paths.json"


def test_the_first_decision_is_written_and_later_processes_read_it(fresh, monkeypatch):
    calls = []

    def decide():
        calls.append(1)
        return {"path": "tiles", "ratio": 1.5}
    assert record.record("FAMILY", (64, 32, 3), decide) == {"path": "tiles", "ratio": 1.5}
    assert json.loads(fresh.read_text()) == {"FAMILY|64,32,3": {"path": "tiles", "ratio": 1.5}}
    monkeypatch.setattr(record, "_STATE", {})  # another process
    assert record.recorded("FAMILY", (64, 32, 3)) == {"path": "tiles", "ratio": 1.5}
    assert record.record("FAMILY", (64, 32, 3), lambda: {"path": "int16", "ratio": 9.0})["path"] == "tiles"
    assert record.record("FAMILY", (64, 32, 4), lambda: None) is None  # no candidate took it: nothing recorded
    assert len(calls) == 1 and list(json.loads(fresh.read_text())) == ["FAMILY|64,32,3"]


HOLDER = r"""
import fcntl, json, os, sys, time
file = sys.argv[1]
fd = os.open(file + ".lock", os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(1.0)  # a first timing in progress
with open(file, "w") as f:
    json.dump({"FAMILY|1,2,3": {"path": "int", "ratio": 2.0}}, f)
"""


def test_a_process_that_meets_a_class_while_another_times_it_takes_the_others_choice(fresh):
    """Two processes meeting a new shape class at once: the second waits for the first's timing (the lock) and takes
    its recorded choice instead of timing for itself (which could choose another path, with other numbers)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(fresh)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    t0 = time.perf_counter()
    entry = record.record("FAMILY", (1, 2, 3), lambda: {"path": "tiles", "ratio": 1.0})
    assert holder.wait(timeout=30) == 0
    holder.stdout.close()
    assert entry == {"path": "int", "ratio": 2.0} and time.perf_counter() - t0 > 0.5


def test_an_unwritable_record_warns_once_and_keeps_the_choice_for_the_process(monkeypatch):
    monkeypatch.setenv("HFQUANT_CPU_CHOICES", "/proc/hfquant-test/paths.json")  # not writable, even for root
    monkeypatch.setattr(record, "_STATE", {})
    with pytest.warns(RuntimeWarning, match="cannot write the CPU path record"):
        assert record.record("FAMILY", (1,), lambda: {"path": "tiles", "ratio": None})["path"] == "tiles"
    assert record.record("FAMILY", (1,), lambda: {"path": "int16", "ratio": None})["path"] == "tiles"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process
        record.record("FAMILY", (2,), lambda: {"path": "int16", "ratio": None})


def test_the_machine_key_follows_what_the_timing_and_the_numbers_depend_on(monkeypatch):
    monkeypatch.delenv("HFQUANT_CPU_CHOICES", raising=False)
    key = record.machine_key()
    assert record.record_file().name == f"{key}.json" and record.record_file().parent.name == "cpu-paths"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(1, threads - 1) if threads > 1 else 2)
        assert record.machine_key() != key
    finally:
        torch.set_num_threads(threads)
    assert record.machine_key() == key
