"""Evaluation: perplexity on non-overlapping windows, also as a local ``evaluate`` metric."""

from hfquant.eval.perplexity import perplexity


def load_metric():
    """The perplexity metric as an ``evaluate`` module, loaded from the package (no Hub access)."""
    import evaluate

    from hfquant.metrics import PERPLEXITY_PATH

    return evaluate.load(PERPLEXITY_PATH)


__all__ = ["load_metric", "perplexity"]
