"""Evaluation: perplexity on non-overlapping windows."""

from hfquant.eval.perplexity import perplexity

__all__ = ["perplexity"]
