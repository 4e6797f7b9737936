"""`synthetic_text`: sentences of a small probabilistic context-free grammar, so that a language model's samples can
be scored by whether they parse (`grammaticality`) as well as by perplexity.

The grammar (`GRAMMAR`; probabilities in brackets; the lexicon's words are equally likely within their category,
and the categories share no word):

    S  -> NP VP "."                              [1.0]
    NP -> Det N [0.5] | Det Adj N [0.3] | NP PP [0.2]
    VP -> V NP [0.5]  | V [0.3]         | VP PP [0.2]
    PP -> P NP                                   [1.0]

Sentences are lower case, words separated by single spaces, ending in " .". `generate` samples one sentence with
the recursion bounded by `max_depth`: S is at depth 0 and a phrase's children one deeper; a phrase at depth
>= max_depth cannot use a self-recursive rule (NP -> NP PP, VP -> VP PP), the remaining rules' probabilities being
renormalised. `parses` is a CYK recogniser for the unbounded grammar (binarised, with unit rules closed over), so
every generated sentence parses and nothing outside the grammar's language does.

Feature: "text" (a `tfds.features.Text`, read back as UTF-8 bytes; `parses` and `grammaticality` take either).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

import numpy as np
import tensorflow_datasets as tfds

from seqjax.data.builders.seeded import SeededBuilder, SeededConfig

START = "S"

_LEXICON = {
    "Det": ("the", "a", "every", "some", "this", "that", "no", "each", "my", "your"),
    "N": (
        "dog", "cat", "bird", "man", "woman", "child", "teacher", "park",
        "house", "garden", "telescope", "book", "river", "city", "car",
    ),
    "Adj": ("big", "small", "old", "young", "happy", "sad", "red", "green", "quiet", "bright"),
    "V": ("sees", "likes", "chases", "finds", "knows", "watches", "follows", "meets", "sleeps", "runs"),
    "P": ("in", "on", "with", "near", "under", "behind", "from", "to", "by", "over"),
}  # fmt: skip

# Nonterminal -> ((right-hand side, probability), ...). A symbol that is not a key is a terminal (a word or ".").
GRAMMAR: dict[str, tuple[tuple[tuple[str, ...], float], ...]] = {
    "S": ((("NP", "VP", "."), 1.0),),
    "NP": ((("Det", "N"), 0.5), (("Det", "Adj", "N"), 0.3), (("NP", "PP"), 0.2)),
    "VP": ((("V", "NP"), 0.5), (("V",), 0.3), (("VP", "PP"), 0.2)),
    "PP": ((("P", "NP"), 1.0),),
    **{cat: tuple(((w,), 1.0 / len(words)) for w in words) for cat, words in _LEXICON.items()},
}


def _check_grammar(grammar) -> None:
    for lhs, rules in grammar.items():
        total = sum(p for _, p in rules)
        if abs(total - 1.0) > 1e-9 or any(p <= 0 or not rhs for rhs, p in rules):
            raise ValueError(f"GRAMMAR[{lhs!r}]: probabilities must be positive and sum to 1, rules non-empty")


_check_grammar(GRAMMAR)


def vocabulary() -> list[str]:
    """Every terminal of the grammar (the words and "."), sorted."""
    return sorted({s for rules in GRAMMAR.values() for rhs, _ in rules for s in rhs if s not in GRAMMAR})


def generate(rng: np.random.Generator, max_depth: int = 4) -> str:
    """One sentence of the grammar, recursion bounded by `max_depth` >= 1 (see the module docstring)."""
    if max_depth < 1:
        raise ValueError(f"generate needs max_depth >= 1, got {max_depth}")
    words: list[str] = []

    def expand(symbol: str, depth: int) -> None:
        if symbol not in GRAMMAR:
            words.append(symbol)
            return
        rules = GRAMMAR[symbol]
        if depth >= max_depth:
            rules = tuple((rhs, p) for rhs, p in rules if symbol not in rhs)
        probs = np.array([p for _, p in rules])
        rhs = rules[int(rng.choice(len(rules), p=probs / probs.sum()))][0] if len(rules) > 1 else rules[0][0]
        for child in rhs:
            expand(child, depth + 1)

    expand(START, 0)
    return " ".join(words)


@functools.lru_cache(maxsize=1)
def _cnf():
    """The grammar for CYK: rules with more than two symbols binarised (A -> X Y Z becomes A -> X A'1, A'1 -> Y Z),
    terminals inside longer rules replaced by a fresh preterminal, and unit rules A -> B kept apart as a closure
    (which nonterminals derive B through unit rules alone, B included)."""
    lexical: dict[str, set[str]] = {}  # word -> {A : A -> word}
    binary: list[tuple[str, str, str]] = []  # (A, B, C) for A -> B C
    unit: dict[str, set[str]] = {}  # B -> {A : A -> B}

    def symbol(s: str) -> str:
        if s in GRAMMAR:
            return s
        pre = f"'{s}'"
        lexical.setdefault(s, set()).add(pre)
        return pre

    for lhs, rules in GRAMMAR.items():
        for n, (rhs, _) in enumerate(rules):
            if len(rhs) == 1 and rhs[0] not in GRAMMAR:
                lexical.setdefault(rhs[0], set()).add(lhs)
            elif len(rhs) == 1:
                unit.setdefault(rhs[0], set()).add(lhs)
            else:
                syms = [symbol(s) for s in rhs]
                head = lhs
                for k in range(len(syms) - 2):
                    fresh = f"{lhs}'{n}.{k}"
                    binary.append((head, syms[k], fresh))
                    head = fresh
                binary.append((head, syms[-2], syms[-1]))

    closure: dict[str, frozenset[str]] = {}
    symbols = set(GRAMMAR) | {a for a, _, _ in binary} | {p for heads in lexical.values() for p in heads}
    for b in symbols:
        seen, todo = {b}, [b]
        while todo:
            for a in unit.get(todo.pop(), ()):
                if a not in seen:
                    seen.add(a)
                    todo.append(a)
        closure[b] = frozenset(seen)
    by_children: dict[tuple[str, str], set[str]] = {}
    for a, b, c in binary:
        by_children.setdefault((b, c), set()).add(a)
    return lexical, by_children, closure


def _close(symbols: Iterable[str], closure) -> set[str]:
    out: set[str] = set()
    for s in symbols:
        out |= closure[s]
    return out


def parses(sentence: str | bytes) -> bool:
    """Whether `sentence` (words separated by whitespace) is in the grammar's language, by CYK. An unknown word or
    an empty sentence does not parse."""
    if isinstance(sentence, bytes):
        sentence = sentence.decode("utf-8")
    words = sentence.split()
    lexical, by_children, closure = _cnf()
    if not words or any(w not in lexical for w in words):
        return False
    n = len(words)
    chart = [[set() for _ in range(n + 1)] for _ in range(n)]  # chart[i][j]: symbols deriving words[i:j]
    for i, w in enumerate(words):
        chart[i][i + 1] = _close(lexical[w], closure)
    for span in range(2, n + 1):
        for i in range(n - span + 1):
            j = i + span
            found: set[str] = set()
            for k in range(i + 1, j):
                left, right = chart[i][k], chart[k][j]
                if left and right:
                    for b in left:
                        for c in right:
                            found |= by_children.get((b, c), set())
            chart[i][j] = _close(found, closure)
    return START in chart[0][n]


def grammaticality(sentences: Iterable[str | bytes]) -> float:
    """The fraction of `sentences` that parse (ValueError if there are none)."""
    results = [parses(s) for s in sentences]
    if not results:
        raise ValueError("grammaticality of no sentences")
    return sum(results) / len(results)


@dataclasses.dataclass(eq=False)
class SyntheticTextConfig(SeededConfig):
    """Sentences of GRAMMAR with recursion bounded by `max_depth` (>= 1)."""

    max_depth: int = 4

    def __post_init__(self):
        if self.max_depth < 1:
            raise ValueError(f"SyntheticTextConfig.max_depth={self.max_depth} must be >= 1")


class SyntheticText(SeededBuilder):
    """PCFG sentences (see the module docstring)."""

    BUILDER_CONFIGS = [  # noqa: RUF012
        SyntheticTextConfig(name="default", max_depth=4, description="PCFG sentences, max_depth 4."),
        SyntheticTextConfig(name="shallow", max_depth=2, description="PCFG sentences, max_depth 2 (shorter)."),
    ]
    DESCRIPTION = __doc__

    def _features(self):
        return tfds.features.FeaturesDict({"text": tfds.features.Text()})

    def _example(self, rng: np.random.Generator, index: int) -> dict:
        return {"text": generate(rng, self.builder_config.max_depth)}


__all__ = [
    "GRAMMAR",
    "START",
    "SyntheticText",
    "SyntheticTextConfig",
    "generate",
    "grammaticality",
    "parses",
    "vocabulary",
]
