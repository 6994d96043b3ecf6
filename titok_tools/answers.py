"""How answers compare: the one normalization behind titok-eval's exact match, the answers a
record accepts, and the test titok-bigbench uses to keep option labels from colliding with option
texts. Light on imports: titok-bigbench and the study's report load it without transformers."""
import re
import string

# Surrounding characters that do not change an answer: quotes, sentence punctuation.
_SURROUNDING = string.whitespace + "\"'`“”‘’.,;:!?"
_CHOICE = re.compile(r"^\(?([a-z])\)?$")


def normalize(text):
    """The form answers are compared in: stripped, lowercased, without surrounding quotes or
    punctuation, inner whitespace collapsed; a multiple-choice letter ("A", "(A)", "a)") as "(a)"."""
    text = " ".join(text.lower().split()).strip(_SURROUNDING)
    choice = _CHOICE.match(text)
    return f"({choice.group(1)})" if choice else text


def choice_letter(text):
    """The letter an answer names when it reads as a multiple-choice letter ("A", "(a)", "b)"):
    exact match takes it for the option that letter labels. None otherwise."""
    choice = _CHOICE.match(normalize(text))
    return choice.group(1) if choice else None


def exact_match(prediction, reference):
    return normalize(prediction) == normalize(reference)


def references(record, completion):
    """The acceptable answers: the record's "references" list when it has one (BIG-bench's
    "three" and "3"), else its completion."""
    extra = record.get("references")
    if isinstance(extra, list) and extra and all(isinstance(r, str) for r in extra):
        return extra
    return [completion]
