"""Does a synthetic query have the shape of the task's real inputs? (docs/design.md, Query shape)

A check derived from the seed examples alone, so it serves any task without a list of tasks:
- multiple choice (half the seeds or more carry an "Options:" block of two or more option lines):
  the query carries one too;
- otherwise the query holds every word trigram that at least 90% of the seeds hold (the task's
  fixed wording: "How many ... do I have?", "Is the following sentence plausible?"), or, where
  no trigram is that common, every such bigram.
In both families its length is within half the shortest and twice the longest seed, in words.
"""
import re
from dataclasses import dataclass

OPTION_LINE = re.compile(r"^\s*(?:\([A-Za-z]\)|[A-Za-z][.)]|-|\*)\s*\S")
OPTIONS_HEADER = re.compile(r"(?im)^[ \t*]*options[ \t*]*:[ \t*]*$")
COMMON = 0.9  # share of the seeds that must hold an n-gram for a query to need it


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


@dataclass(frozen=True)
class QueryShape:
    options: bool          # the task is multiple choice
    phrases: frozenset     # word n-grams a query must hold
    min_words: int
    max_words: int

    @classmethod
    def from_seeds(cls, texts):
        options = 2 * sum(question_with_options(t)[0] is not None for t in texts) >= len(texts)
        phrases = frozenset()
        if not options:
            for n in (3, 2):
                counts = {}
                for t in texts:
                    for gram in _ngrams(_words(t), n):
                        counts[gram] = counts.get(gram, 0) + 1
                phrases = frozenset(g for g, c in counts.items() if c >= COMMON * len(texts))
                if phrases:
                    break
        lengths = [len(_words(t)) for t in texts]
        return cls(options, phrases, min(lengths) // 2, 2 * max(lengths))

    def fits(self, query):
        words = _words(query)
        if not self.min_words <= len(words) <= self.max_words:
            return False
        if self.options:
            return question_with_options(query)[0] is not None
        present = {n: _ngrams(words, n) for n in {len(g) for g in self.phrases}}
        return all(g in present[len(g)] for g in self.phrases)

    def describe(self):
        if self.options:
            return "an Options: block"
        return " and ".join(repr(" ".join(g)) for g in sorted(self.phrases)) or "no common wording"
