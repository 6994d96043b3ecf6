"""What titok-gen asks and how it reads the answer: query templates (data/templates/query-*.txt:
settings, then a str.format prompt) and the seed examples they show (docs/design.md, Generation)."""
import dataclasses
import itertools
import json
import math
import logging
import os
import re
import string
from dataclasses import dataclass

from .errors import TitokError
from .formatting import check_prompt
from .query_shape import OPTIONS_HEADER, question_with_options
from .records import RecordError, prompt_messages, read_records, read_text

log = logging.getLogger("titok.gen")

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Bundled templates: inside the package if it ships them, else the source tree's data/templates.
TEMPLATE_DIRS = (os.path.join(PACKAGE_DIR, "templates"), os.path.join(os.path.dirname(PACKAGE_DIR), "data", "templates"))
GENERIC_TASK = "Write new inputs for the task that the examples below illustrate."


DEFAULT_LABEL = r"(?:new |another )?(?:input|question|query)(?: \d+)?"
DEFAULT_END = r"(?:output|answer)(?: \d+)?"
DEFAULT_PREAMBLE = r"(?:sure|here|of course|okay|ok|certainly|great)\b.*:"
SETTINGS = {"example": "Input: {text}", "label": DEFAULT_LABEL, "end": DEFAULT_END, "preamble": DEFAULT_PREAMBLE,
            "keep": "paragraph", "compare": "query", "min_words": "3", "allow_cut": "no", "turn": "chat"}
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
FIELDS = ("task_description", "examples", "shots")
FENCE_LINE = re.compile(r"(?m)^[ \t]*```[^\n]*\n?")


@dataclass
class QueryTemplate:
    """A query-synthesis template: how to ask for a query, and how to read one from a reply."""
    path: str
    body: str
    example: str
    label: re.Pattern
    end: re.Pattern      # None: nothing ends a query early
    preamble: re.Pattern
    keep: str
    compare: str
    min_words: int
    allow_cut: bool
    turn: str = "chat"   # chat: the prompt is a user turn; none: a plain document the model continues
    paragraphs: int = 1  # keep: paragraph keeps this many (for_seeds sets it)

    def for_seeds(self, texts):
        """The template fitted to the seed examples: a query has as many paragraphs as the longest
        of them (BIG-bench writes a task prefix and the input as two), and the end label is not
        applied when the examples themselves have such a line (it is then part of a query)."""
        paragraphs = max(len(PARAGRAPH_BREAK.split(t.strip())) for t in texts)
        end = None if self.end is None or any(self.end.search(t) for t in texts) else self.end
        return dataclasses.replace(self, paragraphs=paragraphs, end=end)

    def prompt(self, task_description, exemplars):
        examples = "\n\n".join(self.example.format(text=t, number=i + 1) for i, t in enumerate(exemplars))
        return self.body.format(task_description=task_description, examples=examples, shots=len(exemplars)).strip()

    def parse(self, reply, used_whole_budget=False):
        """The query in a model reply, or (None, why) when there is none."""
        text = FENCE_LINE.sub("", reply).strip()
        closed = False  # the query ends before a next label: it was not cut off by the budget
        if self.turn == "none":  # the document ended with the label: the reply is the query, up to the next one
            labelled = self.label.search(text)
            closed = labelled is not None
            text = text[:labelled.start()].strip() if closed else text
            labelled = None
        else:
            labelled = self.label.search(text)
        while labelled:  # "New input:\n\nInput: ..." carries two labels
            text = text[labelled.end():].strip()
            labelled = self.label.match(text)
        first, newline, rest = text.partition("\n")
        if newline and rest.strip() and self.preamble.fullmatch(first.strip()):
            text = rest.strip()  # "Here is a new input:" on a line of its own
        ended = self.end.search(text) if self.end is not None else None
        if ended:  # the model answered its own query ("Output: ..."): the query ends before that
            text = text[:ended.start()].strip()
        if self.keep == "paragraph":
            breaks = list(itertools.islice(PARAGRAPH_BREAK.finditer(text), self.paragraphs))
            runs_to_end = len(breaks) < self.paragraphs
            query = text.strip() if runs_to_end else text[:breaks[-1].start()].strip()
        elif self.keep == "options":
            query, runs_to_end = question_with_options(text)
            if query is None:
                return None, "no Options: block with two or more options"
        else:
            query, runs_to_end = text, True
        if used_whole_budget and runs_to_end and not ended and not closed and not self.allow_cut:
            return None, "cut off by --max-new-tokens"
        if len(query.split()) < self.min_words:
            return None, f"fewer than {self.min_words} words"
        return query, None

    def stop_strings(self):
        """Where a reply can stop early: a document template's next example (its label at the start
        of a line; parse reads only what comes before it). None for a chat turn, which ends itself."""
        label = self.example.split("{text}")[0].strip()
        if self.turn != "none" or not label or "{" in label:
            return None
        return ["\n" + label]

    def dedup_key(self, query):
        """What dedup compares: the whole query, or (compare: stem) the question before its options."""
        if self.compare == "stem":
            m = OPTIONS_HEADER.search(query)
            return query[:m.start()] if m else query
        return query


def template_path(name):
    """A template file: NAME as a path, or a bundled template query-NAME.txt."""
    if os.path.isfile(name):
        return name
    if os.sep not in name and not name.endswith(".txt"):
        tried = [os.path.join(d, f"query-{name}.txt") for d in TEMPLATE_DIRS]
        for path in tried:
            if os.path.isfile(path):
                return path
        raise TitokError(f"--template {name}: no such file, and no bundled template at {' or '.join(tried)}")
    raise TitokError(f"--template {name}: no such file")


def load_template(name):
    path = template_path(name)
    lines = read_text(path, "--template").split("\n")
    settings = dict(SETTINGS)
    for lineno, line in enumerate(lines):
        where = f"{path}:{lineno + 1}"
        if line.strip() == "---":
            body = "\n".join(lines[lineno + 1:])
            break
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep or key not in SETTINGS:
            raise TitokError(f"{where}: expected 'key: value' with a key in {', '.join(SETTINGS)}, "
                                       f"or the '---' line that starts the prompt")
        settings[key] = value.strip()
    else:
        raise TitokError(f"{path}: no '---' line before the prompt text")
    where = path
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(body) if f}
        example_fields = {f for _, f, _, _ in string.Formatter().parse(settings["example"]) if f}
    except ValueError as e:
        raise TitokError(f"{where}: bad placeholder ({e}; write a literal brace as {{{{ or }}}})")
    if not used <= set(FIELDS) or "examples" not in used:
        raise TitokError(f"{where}: the prompt must use {{examples}} and only {', '.join('{%s}' % f for f in FIELDS)}")
    if not example_fields <= {"text", "number"} or "text" not in example_fields:
        raise TitokError(f"{where}: example must use {{text}} (and optionally {{number}})")
    if settings["keep"] not in ("paragraph", "options", "all"):
        raise TitokError(f"{where}: keep must be paragraph, options or all")
    if settings["compare"] not in ("query", "stem"):
        raise TitokError(f"{where}: compare must be query or stem")
    if settings["turn"] not in ("chat", "none"):
        raise TitokError(f"{where}: turn must be chat or none")
    if settings["allow_cut"] not in ("yes", "no"):
        raise TitokError(f"{where}: allow_cut must be yes or no")
    try:
        label, end = (re.compile(rf"(?im)^[ \t*#>_-]*(?:{pattern})[ \t*_]*:[ \t*_]*") if pattern else None
                      for pattern in (settings["label"], settings["end"]))
        if label is None:
            raise TitokError(f"{where}: label must not be empty (end may be, to end no query early)")
        preamble = re.compile(settings["preamble"], re.IGNORECASE)
        min_words = int(settings["min_words"])
    except (re.error, ValueError) as e:
        raise TitokError(f"{where}: bad label, end or preamble regex, or min_words ({e})")
    return QueryTemplate(path, body, settings["example"], label, end, preamble, settings["keep"], settings["compare"],
                         min_words, settings["allow_cut"] == "yes", settings["turn"])


def query_budget(texts, tokenizer):
    """The token budget of a query reply that --max-new-tokens auto gives: room for the longest
    seed query and a quarter more, plus 16 tokens for the label or blank line that closes it.
    A fixed budget either cuts a long task's queries off (an 18-option block needs ~250 tokens,
    and a cut query is rejected) or spends a short task's time on tokens past the query."""
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return math.ceil(1.25 * longest) + 16


@dataclass
class Seeds:
    ids: list          # the seed records' ids
    texts: list        # their query text (the last user turn of the prompt)
    task_description: str
    system: list       # a system message all seed prompts share, given to the labelling prompts too


def load_seeds(path, shots, task_description=None, tokenizer=None):
    ids, texts, descriptions, systems = [], [], set(), set()
    for where, record in read_records(path):
        messages = prompt_messages(record, where)
        if tokenizer is not None:  # their text goes into the query prompts: it must not spell a special token
            check_prompt(tokenizer, messages, False, where, record)
        users = [m for m in messages if m.get("role") == "user"]
        if not users or not users[-1]["content"].strip():
            raise RecordError(where, "prompt", "has no user turn to use as an example query")
        ids.append(record["id"])
        texts.append(users[-1]["content"].strip())
        if isinstance(record.get("task_description"), str) and record["task_description"].strip():
            descriptions.add(record["task_description"].strip())
        system = [m for m in messages if m.get("role") == "system"]
        systems.add(json.dumps(system, sort_keys=True))
    if not texts:
        raise TitokError(f"{path}: no seed examples (the file is empty)")
    if shots is not None and len(texts) < shots:
        raise TitokError(f"{path}: {len(texts)} seed examples, fewer than --shots {shots}")
    system = json.loads(systems.pop()) if len(systems) == 1 else []
    if task_description is None:
        if len(descriptions) > 1:
            log.warning("%s: %d different task_description values; using the first in sorted order", path, len(descriptions))
        if descriptions:
            task_description = sorted(descriptions)[0]
        elif system:
            task_description = system[0]["content"]
        else:
            task_description = GENERIC_TASK
    return Seeds(ids, texts, task_description, system)
