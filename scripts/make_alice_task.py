"""Build hfquant's bundled lm-eval task ``alice_next`` from the bundled Alice text (public domain).

Each item is a passage of *Alice's Adventures in Wonderland* (hfquant/data/alice/test.txt) and four sentences: the
one that really comes next in the book and three distractors drawn from elsewhere in it. A model is scored on which
of the four it finds most likely after the passage (lm-eval ``multiple_choice``: ``acc`` compares the summed
log-likelihoods, ``acc_norm`` the log-likelihoods per character).

What keeps the answer from showing without the passage:
- the distractors have about the true sentence's length (characters within ``LENGTH_TOLERANCE``), and the true
  sentence's rank by length among the four is drawn at random, so neither the summed nor the per-character score
  favours it by its length;
- they open and close like it (an opening quote or bracket, a closing quote or bracket, the final punctuation), so
  being inside or outside a quotation gives nothing away;
- no sentence that occurs more than once in the book is used (as a target or as a distractor), no distractor is in
  the passage or within ``NEIGHBOURHOOD`` sentences of the target, and the four choices of an item are distinct.

Targets are sentences of 5 to 45 words, any but a chapter's first. The passage is the text of the chapter before
the target (see ``context``), ending with the space or blank line that comes before the target in the book; the task
joins passage and choice with nothing more (``target_delimiter: ""``), and lm-eval moves that trailing whitespace to
the front of each choice, as the book has it.

Deterministic: a ``random.Random(seed)`` draws the items, the distractors and the position of the true sentence;
``python scripts/make_alice_task.py`` rewrites hfquant/data/tasks/alice_next/alice_next.jsonl byte for byte
(tests/eval/test_tasks.py checks that it does).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "hfquant" / "data" / "alice" / "test.txt"
OUT = ROOT / "hfquant" / "data" / "tasks" / "alice_next" / "alice_next.jsonl"

ITEMS = 500
SEED = 0
MIN_WORDS, MAX_WORDS = 5, 45
MIN_CONTEXT_WORDS, MAX_CONTEXT_WORDS = 40, 160
LENGTH_TOLERANCE = 0.15   # a distractor's length in characters is within 15% of the target's
NEIGHBOURHOOD = 30        # sentences either side of the target that are never distractors
CANDIDATES = 12           # distractors are drawn from the closest-in-length candidates

# A sentence ends at . ! or ? (then any closing quotes or brackets) followed by a space and an opening quote, bracket
# or capital letter.
_END = re.compile(r"[.!?]['\")]*\s+(?=['\"(A-Z])")
_NOT_PROSE = ("* *", "CHORUS.", "THE END")


def chapters(text: str) -> list[list[list[str]]]:
    """The book as chapters of paragraphs of sentences: the title page, chapter headings and titles, the rows of
    asterisks and the "CHORUS." lines left out."""
    out: list[list[list[str]]] = []
    lines = [p.strip() for p in text.split("\n\n") if p.strip()]
    for i, p in enumerate(lines):
        if p.startswith("CHAPTER"):
            out.append([])
        elif out and not lines[i - 1].startswith("CHAPTER") and not p.startswith(_NOT_PROSE):
            out[-1].append(sentences(p))
    return out


def sentences(paragraph: str) -> list[str]:
    out, start = [], 0
    for m in _END.finditer(paragraph):
        out.append(paragraph[start:m.end()].strip())
        start = m.end()
    out.append(paragraph[start:].strip())
    return [s for s in out if s]


def shape(sentence: str) -> tuple[str, str, str]:
    """How a sentence opens and closes: (opening quote/bracket, closing quotes/brackets, final punctuation)."""
    tail = re.search(r"([.!?,;:-]?)(['\")]*)$", sentence)
    return (sentence[0] if sentence[0] in "'\"(" else "", tail.group(2), tail.group(1))


def context(paras: list[list[str]], p: int, k: int) -> str:
    """The passage before sentence ``k`` of paragraph ``p`` of a chapter, ending with what separates it from that
    sentence (a space inside a paragraph, a blank line before a new one): whole sentences of the chapter, the
    paragraphs before in front while it is shorter than ``MIN_CONTEXT_WORDS``, trimmed from the front (whole
    sentences) to ``MAX_CONTEXT_WORDS``."""
    parts = [paras[p][:k]] if k else []
    q = p - 1
    while q >= 0 and sum(len(s.split()) for part in parts for s in part) < MIN_CONTEXT_WORDS:
        parts.insert(0, list(paras[q]))
        q -= 1
    while sum(len(s.split()) for part in parts for s in part) > MAX_CONTEXT_WORDS:
        parts[0].pop(0)
        if not parts[0]:
            parts.pop(0)
    return "\n\n".join(" ".join(part) for part in parts) + (" " if k else "\n\n")


def _distractors(rng: random.Random, pool: list[str], target: str) -> list[str]:
    """Three of ``pool`` (sentences shaped like ``target``, lengths within the tolerance), with the target's rank
    by length among the four drawn uniformly: ``r`` shorter ones and ``3 - r`` longer ones, each from the
    ``CANDIDATES // 2`` closest in length on its side."""
    shorter = sorted((s for s in pool if len(s) <= len(target)), key=lambda s: len(target) - len(s))
    longer = sorted((s for s in pool if len(s) > len(target)), key=lambda s: len(s) - len(target))
    ranks = [r for r in range(4) if len(shorter) >= r and len(longer) >= 3 - r]
    if not ranks:
        return []
    r = rng.choice(ranks)
    half = CANDIDATES // 2
    return rng.sample(shorter[:max(half, r)], r) + rng.sample(longer[:max(half, 3 - r)], 3 - r)


def build(text: str, items: int = ITEMS, seed: int = SEED) -> list[dict]:
    """The task's items, in book order: ``{"id", "context", "choices", "label"}``."""
    rng = random.Random(seed)
    book = chapters(text)
    flat = [(c, p, k, s) for c, paras in enumerate(book) for p, ss in enumerate(paras) for k, s in enumerate(ss)]
    counts: dict[str, int] = {}
    for *_, s in flat:
        counts[s] = counts.get(s, 0) + 1
    usable = [i for i, (*_, s) in enumerate(flat) if counts[s] == 1 and MIN_WORDS <= len(s.split()) <= MAX_WORDS]
    shapes = {j: shape(flat[j][3]) for j in usable}
    targets = [i for i in usable if flat[i][1] or flat[i][2]]  # not a chapter's first sentence: it has a passage
    rng.shuffle(targets)
    chosen: dict[int, dict] = {}
    for i in targets:  # in a seeded order, until ``items`` have their three distractors
        if len(chosen) == items:
            break
        c, p, k, target = flat[i]
        passage = context(book[c], p, k)
        if not passage.strip():  # the sentences before it are one sentence longer than MAX_CONTEXT_WORDS
            continue
        pool = [flat[j][3] for j in usable if shapes[j] == shapes[i] and abs(j - i) > NEIGHBOURHOOD
                and abs(len(flat[j][3]) - len(target)) <= LENGTH_TOLERANCE * len(target) and flat[j][3] not in passage]
        distractors = _distractors(rng, pool, target)
        if not distractors:
            continue
        rng.shuffle(distractors)
        label = rng.randrange(4)
        choices = distractors[:label] + [target] + distractors[label:]
        assert len(set(choices)) == 4
        chosen[i] = {"context": passage, "choices": choices, "label": label}
    return [{"id": n, **chosen[i]} for n, i in enumerate(sorted(chosen))]


def to_jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--items", type=int, default=ITEMS)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    items = build(SOURCE.read_text(encoding="utf-8"), args.items, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_jsonl(items), encoding="utf-8")
    labels = [sum(1 for it in items if it["label"] == k) for k in range(4)]
    print(f"wrote {len(items)} items to {args.out} (true sentence at positions 0-3: {labels})")


if __name__ == "__main__":
    main()
