"""Perplexity over non-overlapping windows.

PPL-16K, the number hfquant compares everywhere: tokenize all of WikiText-2 ``test.txt`` with the
model's tokenizer (``tokenizer(text)``, no extra special tokens), take the first 32 non-overlapping
windows of 512 tokens, perplexity = ``exp(mean token NLL)`` over the predicted tokens of every window.
That is ``perplexity(model, tokenizer, text, seq_len=512, max_windows=32)``. For a tokenizer that puts BOS in
front of every text (Gemma, Llama 3: ``hfquant.calibration.data.leading_bos``) each window is BOS and the next
511 tokens, all 511 predicted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hfquant.calibration.data import evaluation_token_ids
from hfquant.core.errors import CalibrationError


def _ids(text, tokenizer, seq_len: int) -> torch.Tensor:
    if isinstance(text, torch.Tensor):
        return text.reshape(-1).long()
    return evaluation_token_ids(text, tokenizer, seq_len)


@torch.no_grad()
def window_nlls(model, ids: torch.Tensor, seq_len: int, max_windows: int | None = None, progress: bool = False):
    """Sum of token NLL and token count per window (list of ``(nll_sum, n_tokens)``)."""
    n_windows = ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise CalibrationError(f"evaluation text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}; give more text or lower seq_len")
    device = next(model.parameters()).device
    out = []
    it = range(n_windows)
    if progress:
        it = tqdm(it, desc="perplexity", unit="window")
    for k in it:
        window = ids[k * seq_len : (k + 1) * seq_len].unsqueeze(0).to(device)
        logits = model(input_ids=window).logits.float()
        nll = F.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        out.append((float(nll), seq_len - 1))
    return out


def perplexity(model, tokenizer, text, seq_len: int = 512, max_windows: int | None = None, progress: bool = False) -> float:
    """Perplexity of ``model`` on ``text`` (a string, or a tensor of token ids).

    Args:
        model: a causal LM returning ``.logits``.
        tokenizer: used to tokenize ``text`` without extra special tokens, then BOS at the start of each window
            where the tokenizer puts one in front of every text (ignored for token ids).
        text: the evaluation text, or its token ids already laid out in windows (``with_bos``).
        seq_len: window length; windows do not overlap.
        max_windows: use only the first ``max_windows`` windows (``None``: all whole windows).
        progress: show a tqdm bar.

    Returns:
        ``exp(total NLL / total predicted tokens)``.
    """
    was_training = model.training
    model.eval()
    try:
        parts = window_nlls(model, _ids(text, tokenizer, seq_len), seq_len, max_windows, progress)
    finally:
        model.train(was_training)
    nll = sum(p[0] for p in parts)
    count = sum(p[1] for p in parts)
    return math.exp(nll / count)
