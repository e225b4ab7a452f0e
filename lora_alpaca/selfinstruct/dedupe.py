"""ROUGE-L similarity of a new instruction to every instruction kept so far, fast.

Stanford's generate_instruction.py tokenizes with rouge-score's tokenizer and calls
`rouge_scorer._score_lcs` once per (new, kept) pair in a 16-process pool: a pure-Python
O(n*m) table per pair, about 1.4 billion pairs for 52K instructions (hours on 2 cores).

Here the tokens still come from rouge-score's own tokenizer, and the figure is still
rouge-score's F-measure (precision = LCS / len(kept), recall = LCS / len(new),
f = 2*p*r / (p + r), the same float operations as `rouge_score.scoring.fmeasure`), but the
LCS lengths are computed for all kept instructions at once with the bit-parallel LCS
algorithm (Allison & Dix 1986; Hyyrö 2004) on numpy uint64 words. rouge-score has no
batched LCS, hence this hand-written part; tests check it equals `RougeScorer.score`.

The new instruction is the bit side (one bit per token, 64 per word); every kept
instruction is read token by token, its rows grouped in buckets of similar length so the
padding columns cost little. A padding token matches nothing and leaves the row unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rouge_score import tokenizers

_TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=False)  # Stanford: use_stemmer=False
PAD = 0  # token id of padding (matches nothing); every real token id is >= 1


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's own tokenization (lowercase, alphanumeric runs), as Stanford used it."""
    return _TOKENIZER.tokenize(text)


ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


class _Bucket:
    """Kept instructions of at most `width` tokens: a growing (width, rows) id matrix, stored
    column by column so that reading token j of every row is one contiguous slice."""

    def __init__(self, width: int):
        self.width = width
        self.columns = np.zeros((width, 64), dtype=np.int32)
        self.lengths = np.zeros(64, dtype=np.int64)
        self.order = np.zeros(64, dtype=np.int64)  # index of each row in insertion order
        self.size = 0
        self.longest = 0

    def add(self, ids: list[int], index: int) -> None:
        if self.size == len(self.lengths):  # double the capacity
            grow = len(self.lengths)
            self.columns = np.concatenate([self.columns, np.zeros_like(self.columns)], axis=1)
            self.lengths = np.concatenate([self.lengths, np.zeros(grow, dtype=np.int64)])
            self.order = np.concatenate([self.order, np.zeros(grow, dtype=np.int64)])
        self.columns[: len(ids), self.size] = ids
        self.lengths[self.size] = len(ids)
        self.order[self.size] = index
        self.size += 1
        self.longest = max(self.longest, len(ids))


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per row of a (rows, k) uint64 array."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(words).sum(axis=1, dtype=np.int64)
    as_bytes = np.ascontiguousarray(words).view(np.uint8).reshape(len(words), -1)
    return np.unpackbits(as_bytes, axis=1).sum(axis=1, dtype=np.int64)


def _match_table(query: list[int], n_ids: int, k: int) -> np.ndarray:
    """match[t, w] = bits of the query positions 64w..64w+63 that hold token id t."""
    match = np.zeros((n_ids, k), dtype=np.uint64)
    for pos, tok in enumerate(query):
        match[tok, pos // 64] |= np.uint64(1) << np.uint64(pos % 64)
    return match


def _low_bits(m: int, k: int) -> np.ndarray:
    low = np.full(k, ALL_ONES)
    if m % 64:
        low[-1] = np.uint64((1 << (m % 64)) - 1)
    return low


def _lcs_lengths(query: list[int], bucket: _Bucket, n_ids: int) -> np.ndarray:
    """LCS length between `query` and every row of `bucket` (bit-parallel, all rows at once)."""
    m, rows = len(query), bucket.size
    k = (m + 63) // 64
    match = _match_table(query, n_ids, k)
    if k == 1:  # nearly every instruction: one word, the addition needs no carry
        table = match[:, 0]
        v = np.full(rows, ALL_ONES)
        for j in range(bucket.longest):
            m_j = table[bucket.columns[j, :rows]]
            v = (v + (v & m_j)) | (v & ~m_j)  # uint64 addition wraps: the carry out is dropped
        return m - _popcount((v & _low_bits(m, 1)[0])[:, None])
    v = np.full((rows, k), ALL_ONES)
    for j in range(bucket.longest):
        m_j = match[bucket.columns[j, :rows]]  # (rows, k)
        u = v & m_j
        total = np.empty_like(v)  # v + u, the carry propagated across the k words
        carry = np.zeros(rows, dtype=np.uint64)
        for w in range(k):
            s = v[:, w] + u[:, w]
            c1 = s < v[:, w]
            s2 = s + carry
            carry = (c1 | (s2 < s)).astype(np.uint64)
            total[:, w] = s2
        v = total | (v & ~m_j)
    # bits at positions >= m are not query positions: count zeros among the first m only
    return m - _popcount(v & _low_bits(m, k))


@dataclass
class Similarity:
    max_score: float
    most_similar: dict[str, float]  # Stanford's `most_similar_instructions` (10 best)
    avg_score: float  # Stanford's `avg_similarity_score`


class RougeIndex:
    """Every instruction kept so far (seed tasks first), ready to be compared with a new one."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.lengths: list[int] = []
        self._vocab: dict[str, int] = {}
        self._buckets: dict[int, _Bucket] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def _ids(self, tokens: list[str], grow: bool) -> list[int]:
        ids = []
        for t in tokens:
            i = self._vocab.get(t)
            if i is None:
                if not grow:
                    i = len(self._vocab) + 1  # unseen: matches nothing kept
                else:
                    i = self._vocab[t] = len(self._vocab) + 1
            ids.append(i)
        return ids

    def add(self, text: str) -> None:
        tokens = rouge_tokens(text)
        ids = self._ids(tokens, grow=True)
        width = 8
        while width < len(ids):
            width *= 2
        bucket = self._buckets.setdefault(width, _Bucket(width))
        bucket.add(ids, len(self.texts))
        self.texts.append(text)
        self.lengths.append(len(ids))

    def scores(self, text: str) -> np.ndarray:
        """rouge-score's ROUGE-L F-measure of `text` against every kept text, in insertion order."""
        query = self._ids(rouge_tokens(text), grow=False)
        out = np.zeros(len(self.texts), dtype=np.float64)
        if not query:
            return out  # rouge-score: an empty token list scores 0
        for bucket in self._buckets.values():
            if not bucket.size:
                continue
            lcs = _lcs_lengths(query, bucket, len(self._vocab) + 2).astype(np.float64)
            lengths = bucket.lengths[: bucket.size].astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                precision = lcs / lengths  # prediction = the kept instruction
                recall = lcs / len(query)  # target = the new instruction
                f = 2 * precision * recall / (precision + recall)
            out[bucket.order[: bucket.size]] = np.where(lcs > 0, f, 0.0)
        return out

    def similarity(self, text: str) -> Similarity:
        """The figures Stanford records for a new instruction (before it is added)."""
        scores = self.scores(text)
        if not len(scores):
            return Similarity(0.0, {}, 0.0)
        best = np.argsort(scores, kind="stable")[-10:][::-1]
        return Similarity(
            float(scores.max()),
            {self.texts[i]: float(scores[i]) for i in best},
            float(np.mean(scores)),
        )
