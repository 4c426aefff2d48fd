"""The ``evaluate`` perplexity metric (its script is loaded by path, see ``hfquant.eval.PERPLEXITY_PATH``)."""
