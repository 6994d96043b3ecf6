"""Does a synthetic query have the shape of the task's real inputs? (docs/design.md, Query shape)

A check derived from the seed examples alone, so it serves any task without a list of tasks:
- multiple choice (half the seeds or more carry an "Options:" block of two or more option lines):
  the query carries one too;
- otherwise the query holds every word trigram that at least 90% of the seeds hold (the task's
  fixed wording: "How many ... do I have?", "Is the following sentence plausible?"), or, where
  no trigram is that common, every such bigram.
In both families its length is within half the shortest and twice the longest seed, in words.
Where the seeds' words are a closed set, the query also stays inside it: no word pair (bigram,
with the start and end of the text as words) or, failing that, no word occurs in only one seed
(Good-Turing: the chance of an unseen one is then estimated at zero), as in boolean_expressions'
"not ( True ) and False is" or navigate's steps; the query's pairs (or words) are then all the
seeds'. A task of free text always has words found in one seed only, so it is never closed.
"""
import re
from collections import Counter
from dataclasses import dataclass

OPTION_LINE = re.compile(r"^\s*(?:\([A-Za-z]\)|[A-Za-z][.)]|-|\*)\s*\S")
OPTIONS_HEADER = re.compile(r"(?im)^[ \t*]*options[ \t*]*:[ \t*]*$")
COMMON = 0.9  # share of the seeds that must hold an n-gram for a query to need it
EDGE = ("<s>", "</s>")  # the start and end of a text, as words: a closed task's queries begin and end as its seeds


def question_with_options(text):
    """(question + "Options:" + its option lines, whether the options run to the end of text),
    or (None, True) when text has no "Options:" block with two or more option lines."""
    m = OPTIONS_HEADER.search(text)
    if not m or not text[:m.start()].strip():
        return None, True
    lines = text[m.end():].lstrip("\n").split("\n")
    options = []
    for line in lines:
        if not OPTION_LINE.match(line):
            break
        options.append(line.strip())
    if len(options) < 2:
        return None, True
    return text[:m.start()].strip() + "\nOptions:\n" + "\n".join(options), len(options) == len(lines)


def _words(text):
    return text.lower().split()


def _ngrams(words, n):
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _seed_counts(texts, n, edges=False):
    """{word n-gram: how many of the texts hold it}, with the texts' start and end as words if edges."""
    counts = Counter()
    for t in texts:
        counts.update(_ngrams([EDGE[0], *_words(t), EDGE[1]] if edges else _words(t), n))
    return counts


def closed_vocabulary(texts):
    """(n, the seeds' word n-grams) for the largest n in (2, 1) at which no n-gram occurs in only one
    seed, edges included; (0, empty) when even single words do: the task's vocabulary is open."""
    for n in (2, 1):
        counts = _seed_counts(texts, n, edges=True)
        if counts and min(counts.values()) > 1:
            return n, frozenset(counts)
    return 0, frozenset()


@dataclass(frozen=True)
class QueryShape:
    options: bool          # the task is multiple choice
    phrases: frozenset     # word n-grams a query must hold
    min_words: int
    max_words: int
    closed_n: int = 0      # closed vocabulary: a query's word n-grams must all be the seeds' (0: open)
    closed_grams: frozenset = frozenset()

    @classmethod
    def from_seeds(cls, texts):
        options = 2 * sum(question_with_options(t)[0] is not None for t in texts) >= len(texts)
        phrases = frozenset()
        if not options:
            for n in (3, 2):
                counts = _seed_counts(texts, n)
                phrases = frozenset(g for g, c in counts.items() if c >= COMMON * len(texts))
                if phrases:
                    break
        lengths = [len(_words(t)) for t in texts]
        return cls(options, phrases, min(lengths) // 2, 2 * max(lengths), *closed_vocabulary(texts))

    def fits(self, query):
        words = _words(query)
        if not self.min_words <= len(words) <= self.max_words:
            return False
        if self.closed_n and not _ngrams([EDGE[0], *words, EDGE[1]], self.closed_n) <= self.closed_grams:
            return False
        if self.options:
            return question_with_options(query)[0] is not None
        present = {n: _ngrams(words, n) for n in {len(g) for g in self.phrases}}
        return all(g in present[len(g)] for g in self.phrases)

    def describe(self):
        if self.options:
            wording = "an Options: block"
        else:
            wording = " and ".join(repr(" ".join(g)) for g in sorted(self.phrases)) or "no common wording"
        if self.closed_n:
            unit = "word pairs" if self.closed_n == 2 else "words"
            wording += f", only the seeds' {len(self.closed_grams)} {unit}"
        return wording
