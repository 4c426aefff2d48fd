"""The output folder of an ``hfquant run`` while it is written: the lock, the resume store, the partial folder.

The run is assembled in a partial folder beside the output (``partial_dir``) under an ``OutputLock``, and moved
into place only when complete; a run that fails leaves the old output as it was, no partial folder, and its resume
progress only when there is some (``ResumeStore``, GPTQ in one process)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hfquant.app.recipe import RecipeError
from hfquant.app.run_plan import Plan
from hfquant.formats.files import describe_fingerprint_change, OutputLock, partial_dir, progress_dir
from hfquant.quantize.resume import ResumeStore

logger = logging.getLogger("hfquant.app.pipeline")  # the run's messages keep the logger name they always had


def describe_change(name: str, old, new) -> str:
    """``ResumeStore``'s words for a changed part: which weight files differ."""
    if name == "model weights" and isinstance(old, dict) and isinstance(new, dict):
        return describe_fingerprint_change(old, new)
    return ""


def resume_store(p: Plan, dist) -> ResumeStore | None:
    """The run's resume store: GPTQ, one process, the whole model loaded; ``None`` otherwise (progress is per
    process -- hidden states of its own batches --, so there is no resume store with several processes)."""
    resumable = p.config.method == "gptq" and not dist.active and not p.recipe["calibration"]["layerwise"]
    return ResumeStore(progress_dir(p.out), p.key, p.key_parts, describe_change) if resumable else None


@contextmanager
def run_output(p: Plan, dist) -> Iterator[tuple[ResumeStore | None, Path]]:
    """Hold the output lock and give ``(resume store or None, empty partial folder)`` to the run's work (main
    process). When the work fails, the partial folder is removed, and the progress folder too when no block was
    finished; when it succeeds (it has moved the partial folder into place), the processes meet and the progress
    folder is removed. Writing next to the output fails as a ``RecipeError`` before the work starts."""
    store = resume_store(p, dist)
    partial = partial_dir(p.out)
    lock = OutputLock(p.out)
    try:  # the first writes: fail here, before loading the model, when the output folder is not writable
        p.out.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as exc:
        raise RecipeError(f"output_dir: cannot write next to {str(p.out)!r} ({exc.strerror}); choose another --output") from None
    try:
        try:
            if store is not None:
                store.start(resume=p.resume)
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        except OSError as exc:
            raise RecipeError(f"output_dir: cannot write next to {str(p.out)!r} ({exc.strerror}); choose another "
                              "--output") from None
        if p.resume and store is not None and not store.resumed_from:
            logger.info("--resume: no finished blocks saved; starting from the first block")
        try:
            yield store, partial
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            if store is not None and store.blocks_done == 0:  # nothing worth resuming
                shutil.rmtree(store.folder, ignore_errors=True)
            raise
        dist.barrier()
        if store is not None:
            shutil.rmtree(store.folder, ignore_errors=True)
    finally:
        lock.release()
