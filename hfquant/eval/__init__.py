"""Evaluation: perplexity on non-overlapping windows, also as a local ``evaluate`` metric."""

from pathlib import Path

from hfquant.eval.perplexity import perplexity

# The local ``evaluate`` metric module (``hfquant/eval/metrics/perplexity``), loaded by path.
PERPLEXITY_PATH = str(Path(__file__).resolve().parent / "metrics" / "perplexity")


def load_metric():
    """The perplexity metric as an ``evaluate`` module, loaded from the package (no Hub access)."""
    import evaluate  # heavy, and only needed when the metric module is asked for

    return evaluate.load(PERPLEXITY_PATH)


__all__ = ["load_metric", "perplexity"]
