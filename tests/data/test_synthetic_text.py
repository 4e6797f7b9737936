"""The synthetic_text builder: offline builds, determinism, every sentence parses, the parser agrees with an
independent description of the grammar's language and rejects strings provably outside it, and the sampler's rule
frequencies follow the grammar's probabilities."""

import glob
import itertools
import os
import re

import numpy as np
import pytest

from seqjax.data.builders import build
from seqjax.data.builders import synthetic_text as st
from seqjax.data.builders.synthetic_text import GRAMMAR, SyntheticTextConfig, generate, grammaticality, parses

CATEGORIES = {"Det": "D", "N": "N", "Adj": "A", "V": "V", "P": "P"}
WORDS = {cat: [rhs[0] for rhs, _ in GRAMMAR[cat]] for cat in CATEGORIES}
CATEGORY_OF = {w: CATEGORIES[cat] for cat, words in WORDS.items() for w in words} | {".": "."}

# The grammar's language, derived by hand: every NP is a chain of base NPs B = Det Adj? N joined by prepositions,
# L(NP) = B (P B)*, because NP -> NP PP and PP -> P NP; and L(VP) = V (NP)? (P NP)* = V B? (P B)*. So
# L(S) = B (P B)* V B? (P B)* "." over the word categories (which share no word). An oracle independent of CYK.
_B = "DA?N"
LANGUAGE = re.compile(rf"^{_B}(P{_B})*V({_B})?(P{_B})*\.$")


def in_language(sentence: str) -> bool:
    words = sentence.split()
    if any(w not in CATEGORY_OF for w in words):
        return False
    return LANGUAGE.match("".join(CATEGORY_OF[w] for w in words)) is not None


def _shards(path):
    files = glob.glob(f"{path}/**/*.array_record*", recursive=True)
    return {os.path.relpath(p, path): open(p, "rb").read() for p in files}


def _config(**kwargs):
    name = "tiny" + "".join(f"-{k}{v}" for k, v in sorted(kwargs.items()))
    return SyntheticTextConfig(name=name, **{"num_train": 128, "num_test": 16, **kwargs})


def _sentences(n, seed=0, max_depth=4):
    rng = np.random.default_rng(seed)
    return [generate(rng, max_depth) for _ in range(n)]


def test_grammar_is_plain_data_and_the_lexicon_is_small_and_disjoint():
    for lhs, rules in GRAMMAR.items():
        assert abs(sum(p for _, p in rules) - 1) < 1e-12, lhs
        assert all(isinstance(rhs, tuple) and all(isinstance(s, str) for s in rhs) for rhs, _ in rules)
    assert all(10 <= len(words) <= 20 for words in WORDS.values())
    assert sum(len(w) for w in WORDS.values()) == len(set(CATEGORY_OF)) - 1  # no word in two categories
    assert st.vocabulary() == sorted(CATEGORY_OF) and all(w == w.lower() for w in st.vocabulary())
    assert {c.name for c in st.SyntheticText.BUILDER_CONFIGS} == {"default", "shallow"}


def test_builds_offline_and_every_sentence_parses(tmp_path):
    builder = build("synthetic_text", str(tmp_path), _config())  # how long: benchmarks/input.py --parts builds
    source = builder.as_data_source()
    assert len(source["train"]) == 128 and len(source["test"]) == 16
    texts = []
    for split in ("train", "test"):
        for i in range(len(source[split])):
            ex = source[split][i]
            assert set(ex) == {"text"} and isinstance(ex["text"], bytes)  # tfds Text reads back as bytes
            text = ex["text"].decode("utf-8")
            assert text.endswith(" .") and text == text.lower() and text == " ".join(text.split())
            texts.append(text)
    assert all(parses(t) for t in texts) and all(in_language(t) for t in texts)
    assert grammaticality(source["train"][i]["text"] for i in range(128)) == 1.0
    assert len(set(texts)) > len(texts) // 2  # not one sentence over and over
    # Stored examples are the ones the config regenerates (the order on disk is TFDS's shuffle of the keys).
    stored = sorted(source["train"][i]["text"].decode() for i in range(128))
    assert stored == sorted(builder.example("train", i)["text"] for i in range(128))


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    for d, seed in (("a", 0), ("b", 0), ("c", 1)):
        build("synthetic_text", str(tmp_path / d), _config(num_train=64, seed=seed))
    sa, sb, sc = (_shards(str(tmp_path / d)) for d in "abc")
    assert sa and sa == sb
    values = lambda shards: [v for _, v in sorted(shards.items())]
    assert len(sa) == len(sc) and all(a != c for a, c in zip(values(sa), values(sc), strict=True))


def test_the_parser_agrees_with_the_language_on_every_short_string():
    """Every category string of up to 7 words followed by "." (97,656 strings; the words vary from string to
    string, cycling through each category's lexicon)."""
    accepted = 0
    for n in range(8):
        for number, cats in enumerate(itertools.product(CATEGORIES, repeat=n)):
            sentence = " ".join([*(WORDS[c][(number + i) % len(WORDS[c])] for i, c in enumerate(cats)), "."])
            ok = parses(sentence)
            assert ok == in_language(sentence), sentence
            accepted += ok
    assert accepted >= 10


def test_the_parser_agrees_with_the_language_on_perturbed_sentences():
    """Sentences with one word deleted, inserted, replaced, or two neighbours swapped: many of these stay
    grammatical and many do not; CYK and the hand-derived language must agree on each."""
    rng = np.random.default_rng(1)
    vocab = st.vocabulary()
    counts = [0, 0]
    for sentence in _sentences(300, seed=2):
        words = sentence.split()
        for _ in range(4):
            w = list(words)
            i = int(rng.integers(len(w)))
            op = rng.integers(4)
            if op == 0:
                del w[i]
            elif op == 1:
                w.insert(i, vocab[rng.integers(len(vocab))])
            elif op == 2:
                w[i] = vocab[rng.integers(len(vocab))]
            elif i + 1 < len(w):
                w[i], w[i + 1] = w[i + 1], w[i]
            candidate = " ".join(w)
            ok = parses(candidate)
            assert ok == in_language(candidate), candidate
            counts[ok] += 1
    assert min(counts) > 100, counts  # both verdicts well represented


def test_provably_ungrammatical_variants_are_rejected():
    """For each generated sentence, variants outside the language for reasons that follow from the grammar alone:
    - every sentence starts with a determiner (S -> NP VP ".", and the leftmost word of any NP is a Det), so the
      words in reverse order (before the ".") start with the last word, a noun or a verb: rejected;
    - every NP ends in a noun and a VP in a verb or an NP, so the word before "." is a noun or verb: a sentence
      ending in a determiner, adjective or preposition is rejected;
    - every S has exactly one VP and so exactly one verb: removing it, or adding another, is rejected;
    - nouns and determiners only occur in base NPs (Det N, Det Adj N), one of each: dropping the noun after a
      determiner, or doubling a determiner, breaks #Det == #N and is rejected;
    - an unknown word, or no final ".", or a second "." is rejected."""
    rng = np.random.default_rng(3)
    pick = lambda cat: WORDS[cat][rng.integers(len(WORDS[cat]))]
    for sentence in _sentences(200, seed=4):
        words = sentence.split()
        body = words[:-1]
        assert parses(sentence)
        verb = next(i for i, w in enumerate(body) if CATEGORY_OF[w] == "V")
        dets = [i for i, w in enumerate(body) if CATEGORY_OF[w] == "D"]
        det = dets[rng.integers(len(dets))]
        noun = next(i for i in range(det, len(body)) if CATEGORY_OF[body[i]] == "N")  # the noun of that Det's NP
        variants = {
            "reversed": [*body[::-1], "."],
            "ends with Det": [*body, pick("Det"), "."],
            "ends with Adj": [*body, pick("Adj"), "."],
            "ends with P": [*body, pick("P"), "."],
            "no verb": [*body[:verb], *body[verb + 1 :], "."],
            "two verbs": [*body[: verb + 1], pick("V"), *body[verb + 1 :], "."],
            "noun dropped": [*body[:noun], *body[noun + 1 :], "."],
            "two determiners": [*body[:det], pick("Det"), *body[det:], "."],
            "unknown word": [*body[:verb], "xyzzy", *body[verb + 1 :], "."],
            "no period": body,
            "two periods": [*body, ".", "."],
        }
        for why, variant in variants.items():
            text = " ".join(variant)
            assert not parses(text), (why, text)
            assert not in_language(text), (why, text)  # the oracle agrees with the proof
    assert not parses("") and not parses(".") and not parses("the dog runs")


def test_grammaticality():
    good = _sentences(3)
    assert grammaticality(good) == 1.0
    assert grammaticality([*good, "dog the runs .", b"the dog runs ."]) == 4 / 5
    assert parses(good[0].encode())
    with pytest.raises(ValueError):
        grammaticality([])


def test_first_rule_choices_follow_the_grammar_probabilities():
    """The top-level choices (depth 1 < max_depth, so unaffected by the depth limit) can be read off the surface:
    each sentence has exactly one verb; the words before it are the subject NP, which used NP -> NP PP iff they
    contain a preposition, and otherwise Det N (2 words) or Det Adj N (3 words); the top VP used VP -> V iff
    nothing follows the verb. Over 4000 sentences a proportion's standard error is <= 0.008, so 0.03 is ~4 sd."""
    sentences = _sentences(4000, seed=5)
    n = len(sentences)
    subject, verb_alone = {"Det N": 0, "Det Adj N": 0, "NP PP": 0}, 0
    for sentence in sentences:
        cats = [CATEGORY_OF[w] for w in sentence.split()]
        assert cats.count("V") == 1
        before = cats[: cats.index("V")]
        key = "NP PP" if "P" in before else {2: "Det N", 3: "Det Adj N"}[len(before)]
        subject[key] += 1
        verb_alone += cats[cats.index("V") + 1 :] == ["."]
    rules = {" ".join(rhs): p for rhs, p in GRAMMAR["NP"]}
    for key, count in subject.items():
        assert abs(count / n - rules[key]) < 0.03, (key, count / n)
    assert abs(verb_alone / n - dict(GRAMMAR["VP"])[("V",)]) < 0.03


def test_max_depth_bounds_the_recursion():
    # max_depth 1: the NP and VP under S (depth 1) cannot take a PP, nor the object NP (depth 2): no preposition.
    shallow = _sentences(300, seed=6, max_depth=1)
    assert all(parses(s) and not set(s.split()) & set(WORDS["P"]) for s in shallow)
    lengths = [np.mean([len(s.split()) for s in _sentences(500, seed=7, max_depth=d)]) for d in (1, 2, 4, 8)]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    assert max(len(s.split()) for s in _sentences(500, seed=8, max_depth=2)) < 30
    with pytest.raises(ValueError):
        generate(np.random.default_rng(0), 0)
    with pytest.raises(ValueError):
        SyntheticTextConfig(name="bad", max_depth=0)
