"""A generated corpus for the CPU default recipe: deterministic, no third-party text, with structure to learn.

Tokens follow a first-order Markov chain over a generated lexicon of "words" (each 1-3 token ids), with Zipf-like
successor weights; documents end with token 0, as in the official binidx data. Only `random.Random.random()` is used,
whose stream Python guarantees for a given seed, so the same seed gives the same bytes on every machine.
"""
from __future__ import annotations

import bisect
import random
from itertools import accumulate

import numpy as np


def generate_documents(n_tokens: int, vocab_size: int, seed: int = 0, n_words: int = 400, successors: int = 6,
                       lexicon_seed: int | None = None):
    """Documents (lists of ids, each ending in 0) with n_tokens ids in total (the last document is cut).

    The lexicon and successor table come from `lexicon_seed` (default: seed), the documents from `seed`, so a
    held-out split can share the language but not the text.
    """
    lex = random.Random(seed if lexicon_seed is None else lexicon_seed)
    lpick = lambda n: int(lex.random() * n)  # noqa: E731  (uses random() only: its stream is stable)
    words = [[1 + lpick(vocab_size - 1) for _ in range(1 + lpick(3))] for _ in range(n_words)]
    follow = [[lpick(n_words) for _ in range(successors)] for _ in range(n_words)]
    weights = list(accumulate(1.0 / (r + 1) for r in range(successors)))
    rng = random.Random(seed) if lexicon_seed is not None and lexicon_seed != seed else lex
    pick = lambda n: int(rng.random() * n)  # noqa: E731
    docs, total = [], 0
    while total < n_tokens:
        doc, w = [], pick(n_words)
        for _ in range(40 + pick(200)):
            doc.extend(words[w])
            w = follow[w][bisect.bisect(weights, rng.random() * weights[-1])]
        doc.append(0)
        doc = doc[: n_tokens - total]
        docs.append(np.asarray(doc, dtype=np.int64))
        total += len(doc)
    return docs
