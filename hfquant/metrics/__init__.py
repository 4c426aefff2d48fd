"""Local ``evaluate`` metric modules: ``evaluate.load(hfquant.metrics.PERPLEXITY_PATH)``."""

from pathlib import Path

PERPLEXITY_PATH = str(Path(__file__).resolve().parent / "perplexity")
