"""Evaluation: perplexity on non-overlapping windows, also as a local ``evaluate`` metric; task accuracy through
lm-eval (``hfquant.eval.tasks``, optional dependency)."""

from pathlib import Path

from hfquant.eval.perplexity import perplexity
from hfquant.eval.tasks import bundled_tasks, check_tasks, evaluate_tasks, TaskError

# The local ``evaluate`` metric module (``hfquant/eval/metrics/perplexity``), loaded by path.
PERPLEXITY_PATH = str(Path(__file__).resolve().parent / "metrics" / "perplexity")


def load_metric():
    """The perplexity metric as an ``evaluate`` module, loaded from the package (no Hub access)."""
    import evaluate  # heavy, and only needed when the metric module is asked for

    return evaluate.load(PERPLEXITY_PATH)


__all__ = ["bundled_tasks", "check_tasks", "evaluate_tasks", "load_metric", "perplexity", "TaskError"]
