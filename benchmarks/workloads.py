"""The benchmark workloads: real English texts in three length mixes, built with fixed seeds.

    short      STS-B dev sentences (~20 tokens), the STS-like case
    medium     passages of consecutive WikiText-2 sentences cut at ~128 tokens
    mixed      90% short, 10% long passages of 256+ tokens (the model truncates them to max_seq_length)
    sentences  Wikipedia sentences (wiki1m_head) of 20-40 tokens: what a new user embeds first
    passages   passages of consecutive WikiText-2 sentences of 150-250 tokens: documents to index

Texts come from ../shared/data ($EMBEDLINE_DATA); without it (a user's machine, the tests) they are
built from the built-in export parity texts, so the suite still runs, and the JSON says which source.
Token counts use the artifact's own tokenizer, the one the server runs.
"""

from __future__ import annotations

import gzip
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import data_dir, percentile, stsb_dev_sentences

SHORT, MEDIUM, MIXED, SENTENCES, PASSAGES = "short", "medium", "mixed", "sentences", "passages"
WORKLOADS = (SHORT, MEDIUM, MIXED, SENTENCES, PASSAGES)
# The corpus call is measured on these three lengths (benchmarks/suite.py: measure_corpus).
CORPUS_WORKLOADS = (SHORT, SENTENCES, PASSAGES)
MEDIUM_TOKENS = 128
SENTENCE_TOKENS = (20, 40)
PASSAGE_TOKENS = (150, 250)
LONG_TOKENS = 256
LONG_FRACTION = 0.10


@dataclass(frozen=True)
class Workload:
    """A named list of texts and their token counts (after truncation to max_seq_length)."""

    name: str
    texts: list[str]
    tokens: np.ndarray = field(repr=False)  # int (n,)
    source: str

    def summary(self) -> dict:
        return {
            "texts": len(self.texts),
            "source": self.source,
            "mean_tokens": round(float(self.tokens.mean()), 1),
            "p50_tokens": int(percentile(self.tokens, 50)),
            "p90_tokens": int(percentile(self.tokens, 90)),
            "max_tokens": int(self.tokens.max()),
        }


def _lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _sources() -> tuple[list[str], list[str], list[str], str]:
    """(short sentences, running prose to cut passages from, sentences to pick by length, source description)."""
    data = data_dir(required=False)
    if data is None:
        from embedline.export.parity import LONG_TEXT, SHORT_TEXTS

        prose = [s.strip() + "." for s in LONG_TEXT.split(".") if s.strip()]
        return [t for t in SHORT_TEXTS if t], prose, prose, "built-in texts (no shared data found)"
    short = stsb_dev_sentences(data)
    prose = _lines(data / "corpus" / "wikitext2_valid_test_sentences.txt.gz")
    wiki = _lines(data / "corpus" / "wiki1m_head.txt.gz")
    return short, prose, wiki, "shared/data: STS-B dev sentences; WikiText-2 passages; wiki1m_head sentences"


def _sentences(candidates: list[str], count: int, min_tokens: int, max_tokens: int, count_tokens) -> list[str]:
    """`count` of the candidates with min_tokens..max_tokens tokens, in their order (all of them, repeated,
    when too few are that long)."""
    picked = []
    for text in candidates:
        if min_tokens <= count_tokens(text) <= max_tokens:
            picked.append(text)
            if len(picked) == count:
                return picked
    pool = picked or candidates
    return [pool[i % len(pool)] for i in range(count)]


def _passages(prose: list[str], count: int, min_tokens: int, max_tokens: int, count_tokens, rng) -> list[str]:
    """`count` passages of consecutive sentences from a random start, grown to >= min_tokens and cut by
    whole words to <= max_tokens (so they are text a user would send, not token soup)."""
    passages = []
    while len(passages) < count:
        start = rng.randrange(len(prose))
        words: list[str] = []
        i = start
        while count_tokens(" ".join(words)) < min_tokens:
            words.extend(prose[i % len(prose)].split())
            i += 1
        while count_tokens(" ".join(words)) > max_tokens and len(words) > 1:
            words = words[: max(1, int(len(words) * 0.95))]
        passages.append(" ".join(words))
    return passages


def build_workloads(tokenizer_json: Path, max_seq_length: int, n: int = 1000, seed: int = 13,
                    names: tuple[str, ...] = WORKLOADS) -> dict[str, Workload]:
    """The named workloads of about n texts each (medium and passages: n // 4, a passage costs 6-10x a
    sentence)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.no_padding()
    tokenizer.no_truncation()

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text).ids)

    short, prose, wiki, source = _sources()
    rng = random.Random(seed)
    rng.shuffle(short)
    texts: dict[str, list[str]] = {}
    if SHORT in names:
        texts[SHORT] = [short[i % len(short)] for i in range(n)]
    if MEDIUM in names:
        texts[MEDIUM] = _passages(prose, max(8, n // 4), MEDIUM_TOKENS - 8, MEDIUM_TOKENS + 8, count_tokens, rng)
    if MIXED in names:
        n_long = max(1, round(n * LONG_FRACTION))
        longs = _passages(prose, n_long, LONG_TOKENS, LONG_TOKENS + 64, count_tokens, rng)
        mixed = [short[(i + 500) % len(short)] for i in range(n - n_long)] + longs
        rng.shuffle(mixed)  # long texts arrive at random among the short ones
        texts[MIXED] = mixed
    if SENTENCES in names:
        texts[SENTENCES] = _sentences(wiki, n, *SENTENCE_TOKENS, count_tokens)
    if PASSAGES in names:
        texts[PASSAGES] = _passages(prose, max(8, n // 4), *PASSAGE_TOKENS, count_tokens, rng)
    workloads = {}
    for name, items in texts.items():
        tokens = np.array([min(count_tokens(t), max_seq_length) for t in items])
        workloads[name] = Workload(name, items, tokens, source)
    return workloads


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
