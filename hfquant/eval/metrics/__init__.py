"""Local ``evaluate`` metric modules, loaded by path (``evaluate.load(hfquant.eval.PERPLEXITY_PATH)``)."""
