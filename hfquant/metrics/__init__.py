"""Local ``evaluate`` metric modules: ``evaluate.load(hfquant.metrics.PERPLEXITY_PATH)``."""

from hfquant.eval import PERPLEXITY_PATH

__all__ = ["PERPLEXITY_PATH"]
