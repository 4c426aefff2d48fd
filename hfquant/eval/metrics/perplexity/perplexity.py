"""An ``evaluate`` metric module wrapping ``hfquant.eval.perplexity`` (loads from a local path, no Hub).

    import evaluate, hfquant.eval
    ppl = evaluate.load(hfquant.eval.PERPLEXITY_PATH)
    ppl.compute(predictions=[text], model=model, tokenizer=tokenizer, seq_len=512, max_windows=32)
"""

import datasets
import evaluate

from hfquant.calibration.data import join_texts
from hfquant.eval.perplexity import perplexity

_DESCRIPTION = "Perplexity of a causal LM over non-overlapping windows of the joined texts (hfquant PPL protocol)."
_KWARGS = """
Args:
    predictions: texts, joined with "" when each ends with a newline, else with "\\n\\n".
    model: a loaded causal LM (object, not a name).
    tokenizer: its tokenizer.
    seq_len: window length (default 512).
    max_windows: use only the first windows (default: all).
Returns:
    perplexity: exp(mean token NLL).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class HFQuantPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model=None, tokenizer=None, seq_len=512, max_windows=None):
        if model is None or tokenizer is None:
            raise ValueError("hfquant perplexity: pass model=<loaded model> and tokenizer=<its tokenizer> to compute()")
        return {"perplexity": perplexity(model, tokenizer, join_texts(list(predictions)), seq_len, max_windows)}
