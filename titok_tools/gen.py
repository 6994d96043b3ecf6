"""titok-gen: synthetic task data from the source expert (docs/design.md, Generation).

Two modes:

    titok-gen --model BASE --adapter LORA --seed-examples train.jsonl --num 500 > synthetic.jsonl
    titok-gen --model BASE --adapter LORA --label prompts.jsonl > labeled.jsonl

Query synthesis runs in rounds. Round r asks the expert --batch-size times for one new query,
each time with --shots exemplars drawn afresh from the seed examples and rendered through a
template file (data/templates/query-*.txt: settings, then a str.format prompt). Replies are
parsed by the template's rules, de-duplicated by ROUGE-L F against the seed examples and every
kept query, and the round's new queries are answered by the expert (greedy) with the query as
the user turn, the same formatting training uses.

All randomness of round r is a function of (--seed, r): the exemplars of every call, the
sampling seed of the round's generate calls. The state a round depends on (the kept queries) is
exactly what the output file holds, so `--resume` rebuilds it from the file and replays the
last round it finds, skipping the records already written: the result equals an uninterrupted
run's.
"""
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import string
from array import array
from dataclasses import dataclass

import click
import numpy as np
from tqdm import tqdm

from . import cli
from .formatting import check_prompt
from .query_shape import OPTIONS_HEADER, QueryShape, question_with_options
from .records import (RecordError, check_resume, checked, is_done, prompt_messages, read_records, read_text, record_writer,
                      unique_ids)

log = logging.getLogger("titok.gen")

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Bundled templates: inside the package if it ships them, else the source tree's data/templates.
TEMPLATE_DIRS = (os.path.join(PACKAGE_DIR, "templates"), os.path.join(os.path.dirname(PACKAGE_DIR), "data", "templates"))
GENERIC_TASK = "Write new inputs for the task that the examples below illustrate."


def derive_seed(*parts):
    """A 31-bit seed that depends only on `parts` (never on what ran before in the process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") >> 1


# ---------------------------------------------------------------------------------------------
# Fast ROUGE-L dedup

class RougeDedup:
    """ROUGE-L F (rouge-score's tokenizer with Porter stemming) of a text against a growing pool.

    The scores are rouge-score's exactly (same tokens, same float formula), but each text is
    tokenized once, and a pair gets its LCS computed only when an upper bound on its F reaches
    the threshold: F = 2*LCS/(a+b) with LCS <= min(a, b) (the length ratio) and LCS <= the
    multiset overlap of the two token lists (an inverted index gives the overlap with every
    pooled text at once). The LCS itself is bit-parallel (Allison-Dix) on Python ints.
    """

    def __init__(self, threshold):
        from rouge_score.tokenizers import DefaultTokenizer

        self.threshold = threshold
        self.tokenizer = DefaultTokenizer(use_stemmer=True)
        self.vocab = {}           # token -> int
        self.features = {}        # (token id, occurrence number) -> int
        self.postings = []        # feature -> array of pooled indices holding it
        self.lengths = array("l")
        self.masks = []           # per pooled text: {token id: bitmask of its positions}
        self.stats = {"pairs": 0, "length_pruned": 0, "overlap_pruned": 0, "lcs": 0}

    def __len__(self):
        return len(self.lengths)

    def tokens(self, text):
        vocab = self.vocab
        return [vocab.setdefault(t, len(vocab)) for t in self.tokenizer.tokenize(text)]

    def _feature_ids(self, tokens, create):
        # The k-th occurrence of a token is feature (token, k): the dot product of two texts'
        # feature sets is then sum over tokens of min(count_a, count_b), the multiset overlap.
        seen, ids = {}, []
        for t in tokens:
            k = seen.get(t, 0)
            seen[t] = k + 1
            f = self.features.get((t, k))
            if f is None and create:
                f = self.features[(t, k)] = len(self.postings)
                self.postings.append(array("l"))
            if f is not None:
                ids.append(f)
        return ids

    def add(self, text):
        tokens = self.tokens(text)
        index = len(self.lengths)
        for f in self._feature_ids(tokens, create=True):
            self.postings[f].append(index)
        masks = {}
        for i, t in enumerate(tokens):
            masks[t] = masks.get(t, 0) | (1 << i)
        self.lengths.append(len(tokens))
        self.masks.append(masks)

    def best(self, text):
        """(F, index) of the pooled text most similar to `text` if that F >= threshold, else
        (below-threshold F or 0.0, None). Only candidates that can reach the threshold are scored."""
        tokens = self.tokens(text)
        n, b = len(self.lengths), len(tokens)
        self.stats["pairs"] += n
        if not n or not b:
            return 0.0, None
        lengths = np.frombuffer(self.lengths, dtype=np.int64) if n else np.zeros(0, np.int64)
        margin = 1e-9  # the bounds are exact maths; never prune a pair rouge-score would flag on rounding
        total = lengths + b
        reachable = 2 * np.minimum(lengths, b) >= (self.threshold - margin) * total
        reachable &= lengths > 0
        self.stats["length_pruned"] += n - int(reachable.sum())
        feats = self._feature_ids(tokens, create=False)
        if feats:
            hits = np.concatenate([np.frombuffer(self.postings[f], dtype=np.int64) for f in feats])
            overlap = np.bincount(hits, minlength=n)
        else:
            overlap = np.zeros(n, np.int64)
        bound = 2 * overlap >= (self.threshold - margin) * total
        candidates = np.flatnonzero(reachable & bound)
        self.stats["overlap_pruned"] += int(reachable.sum()) - len(candidates)
        # Most promising first: the first pair at or over the threshold settles it.
        order = candidates[np.argsort(-(overlap[candidates] / total[candidates]), kind="stable")]
        best = 0.0
        for i in order.tolist():
            self.stats["lcs"] += 1
            f = rouge_f(lcs_length(self.masks[i], int(lengths[i]), tokens), int(lengths[i]), b)
            if f >= self.threshold:
                return f, i
            best = max(best, f)
        return best, None


def lcs_length(masks, length, tokens):
    """Length of the longest common subsequence of a pooled text (its position bitmasks per
    token, and its length) and a token list: the bit-parallel algorithm of Allison and Dix
    (1986), one addition per token of `tokens`."""
    full = (1 << length) - 1
    v = full
    for t in tokens:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return length - v.bit_count()


def rouge_f(lcs, target_len, prediction_len):
    """rouge-score's F for an LCS length, computed with its very float operations."""
    if not lcs:
        return 0.0
    precision, recall = lcs / prediction_len, lcs / target_len
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------
# Query templates

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
        raise click.ClickException(f"--template {name}: no such file, and no bundled template at {' or '.join(tried)}")
    raise click.ClickException(f"--template {name}: no such file")


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
            raise click.ClickException(f"{where}: expected 'key: value' with a key in {', '.join(SETTINGS)}, "
                                       f"or the '---' line that starts the prompt")
        settings[key] = value.strip()
    else:
        raise click.ClickException(f"{path}: no '---' line before the prompt text")
    where = path
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(body) if f}
        example_fields = {f for _, f, _, _ in string.Formatter().parse(settings["example"]) if f}
    except ValueError as e:
        raise click.ClickException(f"{where}: bad placeholder ({e}; write a literal brace as {{{{ or }}}})")
    if not used <= set(FIELDS) or "examples" not in used:
        raise click.ClickException(f"{where}: the prompt must use {{examples}} and only {', '.join('{%s}' % f for f in FIELDS)}")
    if not example_fields <= {"text", "number"} or "text" not in example_fields:
        raise click.ClickException(f"{where}: example must use {{text}} (and optionally {{number}})")
    if settings["keep"] not in ("paragraph", "options", "all"):
        raise click.ClickException(f"{where}: keep must be paragraph, options or all")
    if settings["compare"] not in ("query", "stem"):
        raise click.ClickException(f"{where}: compare must be query or stem")
    if settings["turn"] not in ("chat", "none"):
        raise click.ClickException(f"{where}: turn must be chat or none")
    if settings["allow_cut"] not in ("yes", "no"):
        raise click.ClickException(f"{where}: allow_cut must be yes or no")
    try:
        label, end = (re.compile(rf"(?im)^[ \t*#>_-]*(?:{pattern})[ \t*_]*:[ \t*_]*") if pattern else None
                      for pattern in (settings["label"], settings["end"]))
        if label is None:
            raise click.ClickException(f"{where}: label must not be empty (end may be, to end no query early)")
        preamble = re.compile(settings["preamble"], re.IGNORECASE)
        min_words = int(settings["min_words"])
    except (re.error, ValueError) as e:
        raise click.ClickException(f"{where}: bad label, end or preamble regex, or min_words ({e})")
    return QueryTemplate(path, body, settings["example"], label, end, preamble, settings["keep"], settings["compare"],
                         min_words, settings["allow_cut"] == "yes", settings["turn"])


# ---------------------------------------------------------------------------------------------
# Seed examples

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
        raise click.ClickException(f"{path}: no seed examples (the file is empty)")
    if len(texts) < shots:
        raise click.ClickException(f"{path}: {len(texts)} seed examples, fewer than --shots {shots}")
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


# ---------------------------------------------------------------------------------------------
# Backends: complete a list of prompts (message lists) with one seed per call

class HfBackend:
    """transformers generate via the shared generation.generate (CPU or one GPU)."""

    def __init__(self, model, adapter, dtype, device, trust_remote_code, tokenizer, chat_template, batch_size, max_length):
        from .models import load_model

        self.lm = load_model(model, adapter, dtype, device, trust_remote_code, check_logits=False)  # generates only
        self.tokenizer, self.chat_template, self.batch_size, self.max_length = tokenizer, chat_template, batch_size, max_length

    def without_adapter(self):
        """The base model alone (the same weights, adapter switched off) inside the block."""
        return self.lm.disable_adapter() if hasattr(self.lm, "disable_adapter") else contextlib.nullcontext()

    def complete(self, prompts, max_new_tokens, temperature, top_p, seed, plain=False):
        """plain: the prompts are documents to continue, rendered without the chat template."""
        from .generation import generate

        return generate(self.lm, self.tokenizer, prompts, chat_template=self.chat_template and not plain,
                        max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, batch_size=self.batch_size, seed=seed,
                        max_length=self.max_length)


class VllmBackend:
    """vLLM with the adapter as a LoRARequest; prompts are token ids from the shared formatting."""

    def __init__(self, model, adapter, dtype, trust_remote_code, tokenizer, chat_template, max_length,
                 tensor_parallel_size, seed):
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
        except ImportError:
            raise click.ClickException("--backend vllm needs vLLM: pip install 'titok-tools[vllm]'")
        from .formatting import stop_token_ids
        from .models import adapter_config, resolve

        rank = int(adapter_config(adapter).get("r", 16)) if adapter else 16
        # vLLM accepts only these maximum ranks: take the smallest that fits the adapter.
        max_rank = next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), 512)
        self.llm = LLM(model=resolve(model, trust_remote_code=trust_remote_code), dtype=dtype, seed=seed,
                       trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
                       enable_lora=adapter is not None, max_lora_rank=max_rank)
        self.lora = LoRARequest("expert", 1, os.path.abspath(adapter)) if adapter else None
        self.tokenizer, self.chat_template, self.max_length = tokenizer, chat_template, max_length
        self.stops = stop_token_ids(tokenizer, chat_template)
        self.base_only = False

    @contextlib.contextmanager
    def without_adapter(self):
        self.base_only = True
        try:
            yield
        finally:
            self.base_only = False

    def complete(self, prompts, max_new_tokens, temperature, top_p, seed, plain=False):
        from vllm import SamplingParams

        from .formatting import prompt_ids, stop_token_ids

        chat_template = self.chat_template and not plain
        stops = self.stops if chat_template else stop_token_ids(self.tokenizer, False)
        params = [SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0, max_tokens=max_new_tokens,
                                 seed=derive_seed(seed, i), stop_token_ids=stops, skip_special_tokens=True)
                  for i in range(len(prompts))]
        inputs = [{"prompt_token_ids": prompt_ids(self.tokenizer, m, chat_template, self.max_length)} for m in prompts]
        outputs = self.llm.generate(inputs, params, lora_request=None if self.base_only else self.lora, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]


# ---------------------------------------------------------------------------------------------
# Query synthesis and labelling

@dataclass
class GenSettings:
    num: int
    shots: int = 3
    batch_size: int = 8
    max_rounds: int = None
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 200
    label_temperature: float = 0.0
    label_max_new_tokens: int = 200
    rouge_threshold: float = 0.7
    dedup: bool = True
    seed: int = 0
    queries_from: str = "expert"
    shape_check: bool = True

    def rounds(self):
        # Default cap: 20 times the rounds --num needs if every reply were kept.
        return self.max_rounds if self.max_rounds is not None else 20 * math.ceil(self.num / self.batch_size) + 10


def record_id(seed, index):
    return f"gen-{seed}-{index}"


def label_prompt(seeds, query):
    return seeds.system + [{"role": "user", "content": query}]


def generate_records(backend, tokenizer, template, seeds, settings, meta, existing=(), counts=None, progress=None):
    """Yield synthetic records until settings.num are kept or the round cap is reached.

    `existing` are the records an interrupted run wrote (in order): the rounds before the last
    one they reach rebuild the dedup pool, and that last round is replayed without yielding
    the records already written.
    """
    counts = {} if counts is None else counts
    for key in ("format", "duplicate", "empty_label", "kept", "parsed", "on_format"):
        counts.setdefault(key, 0)
    template = template.for_seeds(seeds.texts)
    shape = QueryShape.from_seeds(seeds.texts)
    pool = RougeDedup(settings.rouge_threshold) if settings.dedup else None
    if pool is not None:
        for text in seeds.texts:
            pool.add(template.dedup_key(text))
    existing = list(existing)
    for record in existing:
        if not isinstance(record.get("titok_gen"), dict) or not isinstance(record["titok_gen"].get("round"), int):
            raise click.ClickException(f"--resume: record {record.get('id')!r} of the output has no titok_gen.round "
                                       f"(was the file written by titok-gen?)")
        if record["titok_gen"].get("seed") != settings.seed:
            raise click.ClickException(f"--resume: the output was written with --seed {record.get('titok_gen', {}).get('seed')}, "
                                       f"not {settings.seed}")
    start_round = max((r["titok_gen"]["round"] for r in existing), default=0)
    earlier = [r for r in existing if r["titok_gen"]["round"] < start_round]
    if pool is not None:
        for record in earlier:
            pool.add(template.dedup_key(_query_of(record)))
    already = {r["id"]: _query_of(r) for r in existing}
    kept = len(earlier)
    counts["kept"] = len(existing)

    for round_ in range(start_round, settings.rounds()):
        if kept >= settings.num:
            return
        picks = [random.Random(derive_seed(settings.seed, "shots", round_, slot)).sample(range(len(seeds.texts)), settings.shots)
                 for slot in range(settings.batch_size)]
        prompts = [[{"role": "user", "content": template.prompt(seeds.task_description, [seeds.texts[i] for i in pick])}]
                   for pick in picks]
        # The paper writes queries with the expert; a small expert tuned on short answers may
        # answer the query prompt instead of writing a query: --queries-from base avoids that.
        with backend.without_adapter() if settings.queries_from == "base" else contextlib.nullcontext():
            replies = backend.complete(prompts, settings.max_new_tokens, settings.temperature, settings.top_p,
                                       derive_seed(settings.seed, "queries", round_), plain=template.turn == "none")
        new = []
        for pick, reply in zip(picks, replies):
            whole = len(tokenizer(reply, add_special_tokens=False)["input_ids"]) >= settings.max_new_tokens - 3
            query, why = template.parse(reply, used_whole_budget=whole)
            if query is None:
                counts["format"] += 1
                log.debug("reply rejected (%s): %r", why, reply[:200])
                continue
            counts["parsed"] += 1
            if shape.fits(query):
                counts["on_format"] += 1
            elif settings.shape_check:
                counts["format"] += 1
                log.debug("query rejected (not the seeds' shape: %s): %r", shape.describe(), query[:200])
                continue
            key = template.dedup_key(query) if pool is not None else None
            if pool is not None and pool.best(key)[1] is not None:  # the seed examples and earlier rounds' queries
                counts["duplicate"] += 1
                continue
            new.append((pick, query, key))
        if not new:
            continue
        labels = backend.complete([label_prompt(seeds, q) for _, q, _ in new], settings.label_max_new_tokens,
                                  settings.label_temperature, settings.top_p, derive_seed(settings.seed, "labels", round_))
        # Within the round, a query is compared with the round's queries kept before it: after
        # labelling, so that one dropped for an empty label rules nothing out.
        fresh = RougeDedup(settings.rouge_threshold) if pool is not None else None
        for (pick, query, key), label in zip(new, labels):
            if not label.strip():
                counts["empty_label"] += 1  # titok-score cannot use an empty completion
                continue
            if fresh is not None and fresh.best(key)[1] is not None:
                counts["duplicate"] += 1
                continue
            if kept >= settings.num:
                return
            prompt = label_prompt(seeds, query) if seeds.system else query
            record = {"id": record_id(settings.seed, kept), "prompt": prompt, "completion": label,
                      "titok_gen": dict(meta, shots=[seeds.ids[i] for i in pick], seed=settings.seed, round=round_)}
            kept += 1
            if pool is not None:
                pool.add(key)
                fresh.add(key)
            if record["id"] in already:
                if already[record["id"]] != query:
                    log.warning("--resume: record %s replays differently (%r, was %r): was the run's hardware or "
                                "settings changed?", record["id"], query[:80], already[record["id"]][:80])
                continue
            counts["kept"] += 1
            if progress is not None:
                progress.update(1)
            yield record
    if kept < settings.num:
        log.warning("stopped after --max-rounds %d with %d of %d queries: raise --max-rounds and --resume",
                    settings.rounds(), kept, settings.num)


def _query_of(record):
    prompt = record["prompt"]
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def label_records(pairs, backend, settings, meta, counts=None, progress=None, done=None, skip_invalid=False):
    """Answer each (where, record)'s prompt with the expert; yield the records with
    "completion" and "titok_gen" set, in input order. A record without a prompt the chat
    template accepts stops the run with a one-line error, or is skipped and counted in
    counts["invalid"] with skip_invalid.

    Prompts are answered in blocks of settings.batch_size consecutive records, one seed per
    block. A label depends on its whole block (the block's padding changes bf16 numbers, and
    sampling draws for the block at once), so records that `done(record)` says a resumed run
    already wrote are still generated with their block, only not yielded again: a resumed run
    gives the records an uninterrupted one would.
    """
    counts = {} if counts is None else counts
    counts.setdefault("labelled", 0)
    counts.setdefault("empty_label", 0)

    def answer(block):
        todo = [not (done and done(record)) for record, _ in block]
        labels = [None] * len(block)
        if any(todo):
            labels = backend.complete([m for _, m in block], settings.label_max_new_tokens, settings.label_temperature,
                                      settings.top_p, derive_seed(settings.seed, "labels", block[0][0]["id"]))
        for (record, messages), label, needed in zip(block, labels, todo):
            if not needed:
                continue
            if not label.strip():
                counts["empty_label"] += 1
                continue
            if "messages" in record:
                record.pop("messages")
                record["prompt"] = messages
            record["completion"] = label
            record["titok_gen"] = dict(meta, shots=[], seed=settings.seed)
            counts["labelled"] += 1
            yield record
        if progress is not None:
            progress.update(len(block))

    def check(where, record):
        messages = prompt_messages(record, where)
        check_prompt(backend.tokenizer, messages, backend.chat_template, where, record)
        return messages

    block = []
    for _, record, messages in checked(pairs, check, skip_invalid, counts):
        block.append((record, messages))
        if len(block) >= settings.batch_size:
            yield from answer(block)
            block = []
    if block:
        yield from answer(block)


# ---------------------------------------------------------------------------------------------
# Command line

@click.command()
@cli.model_options
@cli.adapter_option
@cli.tokenizer_options
@click.option("--seed-examples", type=click.Path(dir_okay=False),
              help="Task records (JSONL) whose prompts are the few-shot exemplars: makes new queries.")
@click.option("--label", "label_file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Prompts (JSONL, '-' = stdin) to answer with the expert instead of making new queries.")
@click.option("--num", type=click.IntRange(min=1), help="Unique queries to make (the caller asks for 2M for a pool of 2M).")
@click.option("--task-description", help="Task text for the query prompt [default: the seed records' task_description, "
                                         "else their shared system message, else a generic line].")
@click.option("--shots", default=3, show_default=True, type=click.IntRange(min=1), help="Exemplars per query prompt, re-drawn per call.")
@click.option("--template", default="continuation", show_default=True,
              help="Query template: a file, or the name of a bundled one in data/templates/query-NAME.txt: continuation "
                   "(the seed examples as a document the model continues with one more), default (a chat turn that asks "
                   "for a new input), multiple-choice (the same, for a question with an Options: block).")
@click.option("--temperature", default=1.0, show_default=True, type=cli.Finite(min=0), help="Sampling temperature of queries.")
@click.option("--top-p", default=0.9, show_default=True, type=cli.Finite(0, 1, min_open=True), help="Nucleus sampling of queries (and of labels when sampled).")
@click.option("--max-new-tokens", default=200, show_default=True, type=click.IntRange(min=1), help="Token budget of a query reply.")
@click.option("--label-temperature", default=0.0, show_default=True, type=cli.Finite(min=0), help="0 = greedy labels.")
@click.option("--label-max-new-tokens", default=200, show_default=True, type=click.IntRange(min=1), help="Token budget of a label.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Prompts per generate call; a round of query synthesis is one batch, and --label answers blocks of this "
                   "many consecutive prompts (with --shard, of the shard's prompts).")
@click.option("--rouge-threshold", default=0.7, show_default=True, type=cli.Finite(0, 1, min_open=True),
              help="Reject a query whose ROUGE-L F with a seed example or a kept query is at least this.")
@click.option("--no-dedup", is_flag=True, help="Keep near-duplicate queries (the paper does for history tasks).")
@click.option("--max-rounds", type=click.IntRange(min=1), help="Stop after this many rounds even if fewer than --num "
                                                                "queries were kept [default: 20 x ceil(num / batch-size) + 10].")
@click.option("--queries-from", type=click.Choice(["expert", "base"]), default="expert", show_default=True,
              help="Who writes the queries: the expert (the paper), or its base model with the adapter switched off "
                   "(for an expert so specialized that it answers the query prompt). Labels always come from the expert.")
@click.option("--shape-check/--no-shape-check", default=True, show_default=True,
              help="Reject a query without the shape of the seed examples (counted as format): an Options: block when "
                   "they are multiple choice, else the wording 90%% of them share, and a length within half the shortest "
                   "to twice the longest. The summary reports the share of read queries that had it either way.")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="transformers generate (CPU or GPU), or vLLM (pip install 'titok-tools[vllm]'; give it a large --batch-size).")
@click.option("--tensor-parallel-size", default=1, show_default=True, type=click.IntRange(min=1), help="GPUs per model (vllm).")
@cli.output_option
@cli.resume_option
@cli.seed_option
@cli.shard_option
@cli.skip_invalid_option
@cli.command
def main(model, dtype, device, trust_remote_code, adapter, chat_template, no_chat_template, max_length, seed_examples,
         label_file, num, task_description, shots, template, temperature, top_p, max_new_tokens, label_temperature,
         label_max_new_tokens, batch_size, rouge_threshold, no_dedup, max_rounds, queries_from, shape_check, backend, tensor_parallel_size, output,
         resume, seed, shard, skip_invalid):
    """Make task data with the source expert (--model + --adapter): new queries from a few
    real examples and the expert's answers, or answers to given prompts (--label).

    Query synthesis: each query prompt shows --shots exemplar prompts from --seed-examples
    (re-drawn per call) through --template; replies are parsed by the template's rules and
    kept if their ROUGE-L F (rouge-score, stemming) with every seed example and kept query is
    below --rouge-threshold; each kept query is answered greedily, as a user turn. Output:
    {"id", "prompt", "completion", "titok_gen": {"model", "adapter", "shots", "seed", "round"}}.

    A run is a function of its options and --seed: `-o FILE --resume` (with the same options)
    continues an interrupted run and gives the records an uninterrupted one would.

    \b
    Examples:
      titok-gen --model BASE --adapter LORA --seed-examples train.jsonl --num 500 -o synthetic.jsonl
      titok-gen --model BASE --adapter LORA --label prompts.jsonl > labeled.jsonl
    """
    from .models import load_tokenizer, resolve_device, resolve_dtype

    if (seed_examples is None) == (label_file is None):
        raise click.UsageError("give exactly one of --seed-examples FILE (make queries) and --label FILE (answer prompts)")
    if seed_examples is not None and num is None:
        raise click.UsageError("--seed-examples needs --num")
    if label_file is not None and num is not None:
        raise click.UsageError("--num goes with --seed-examples; --label answers every prompt of its file")
    if shard is not None and label_file is None:
        raise click.UsageError("--shard splits --label work; query synthesis is sequential (dedup sees every query)")
    if skip_invalid and label_file is None:
        raise click.UsageError("--skip-invalid goes with --label; seed examples must all be valid")
    check_resume(output, resume)
    settings = GenSettings(num=num or 0, shots=shots, batch_size=batch_size, max_rounds=max_rounds, temperature=temperature,
                           top_p=top_p, max_new_tokens=max_new_tokens, label_temperature=label_temperature,
                           label_max_new_tokens=label_max_new_tokens, rouge_threshold=rouge_threshold, dedup=not no_dedup,
                           seed=seed, queries_from=queries_from, shape_check=shape_check)
    tokenizer = load_tokenizer(model, chat_template, trust_remote_code)
    if seed_examples is not None:
        query_template = load_template(template)
        seeds = load_seeds(seed_examples, shots, task_description, tokenizer)
    if adapter is None:
        log.warning("no --adapter: the base model writes the data, not an expert")
    use_template = not no_chat_template
    if backend == "vllm":
        vllm_dtype = "auto" if dtype == "auto" else dtype
        engine = VllmBackend(model, adapter, vllm_dtype, trust_remote_code, tokenizer, use_template, max_length,
                             tensor_parallel_size, seed)
    else:
        engine = HfBackend(model, adapter, dtype, device, trust_remote_code, tokenizer, use_template, batch_size, max_length)
        log.info("hf backend on %s in %s", resolve_device(device), str(resolve_dtype(dtype, resolve_device(device))).split(".")[-1])
    meta = {"model": model, "adapter": adapter}
    if queries_from != "expert":
        meta["queries_from"] = queries_from
    counts = {}
    with record_writer(output, resume, keep_partial=True) as writer:
        if label_file is not None:
            with tqdm(desc="titok-gen label", unit="rec", mininterval=1) as progress:
                pairs = ((w, r) for i, (w, r) in enumerate(unique_ids(read_records(label_file, skip_invalid, counts)))
                         if cli.in_shard(i, shard))
                for record in label_records(pairs, engine, settings, meta, counts, progress,
                                            done=lambda r: is_done(writer, r), skip_invalid=skip_invalid):
                    writer.write(record)
                    writer.flush()  # a killed job (a Slurm time limit) keeps every label it finished
            log.info("labelled %d prompts%s%s", counts["labelled"],
                     f", {counts['empty_label']} empty answers dropped" if counts["empty_label"] else "",
                     cli.counted_suffix(counts))
            return
        existing = []
        if resume and output != "-":
            writer.flush()
            existing = [r for _, r in read_records(writer.partial)]
        with tqdm(desc="titok-gen", unit="query", total=num, initial=len(existing), mininterval=1) as progress:
            for record in generate_records(engine, tokenizer, query_template, seeds, settings, meta, existing,
                                           counts, progress):
                writer.write(record)
                writer.flush()
    log.info("kept %d queries; on-format %s of the %d read (%s); rejected %d (format), %d (duplicate), %d (empty label)",
             counts["kept"], f"{counts['on_format'] / counts['parsed']:.0%}" if counts["parsed"] else "-", counts["parsed"],
             QueryShape.from_seeds(seeds.texts).describe(), counts["format"], counts["duplicate"], counts["empty_label"])
