"""Convert BIG-bench JSON tasks into prompt/completion records: data/bigbench/<task>/{train,test}.jsonl.

The data comes from the `bigbench==1.0.0` sdist on PyPI (about 360 MB), downloaded once into the
cache with `pip download --no-deps`. Only the requested tasks' `task.json` members are read, by
streaming through the tar.gz; nothing else is extracted.

Task names: a task (`object_counting`) or one subtask (`logical_deduction/three_objects`). A task
whose examples live in subtasks (its own task.json holds none) is converted as the union of its
subtasks, each record naming its subtask in "task". Programmatic tasks (task.py, no task.json, e.g.
boolean_expressions) are not data files and are refused with a clear message.

Each record: {"id", "task", "prompt", "completion", "references"[, "options"], "task_description"}.
- id: "<task>:<index of the example in its task.json>", task: the (sub)task it comes from.
- prompt: the task's `task_prefix`, then `example_input_prefix` + input, then (multiple choice)
  "Options:\\n(A) ..." (or "- ..." lines when the options are letters themselves, as in hyperbaton:
  labels would collide with them), then `example_output_prefix` when it is more than whitespace. BIG-bench's
  default "Q:"/"A:" wrappers are not added: the chat template marks the turns.
- completion: a free-text `target` as it is (the first one when it is a list); for multiple choice
  (`target_scores`) the text of the highest-scored option (the first such one on ties).
- references: every acceptable completion (all targets; all top-scored options), for evaluation.
- options (multiple choice): the option texts in prompt order. They are shuffled per example, with
  a generator seeded by --seed and the example's id: several tasks list the correct option first.
An example with both `target` and `target_scores` is converted as multiple choice. Examples whose
completion would be empty are skipped (counted on stderr).
"""
import difflib
import hashlib
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile

import click
import orjson

from .errors import TitokError
from . import cli
from .answers import choice_letter
from .models import cache_dir
from .records import record_writer

log = logging.getLogger("titok.bigbench")

SDIST = "bigbench==1.0.0"
SDIST_FILE = "bigbench-1.0.0.tar.gz"
TASKS_DIR = "bigbench/benchmark_tasks/"


def fetch_sdist(cache):
    """The path of the bigbench sdist in `cache`, downloading it there once with pip."""
    path = os.path.join(cache, SDIST_FILE)
    if os.path.exists(path):
        return path
    os.makedirs(cache, exist_ok=True)
    log.warning("downloading the %s sdist (about 360 MB) into %s (once; later runs reuse it)", SDIST, cache)
    # Into a temp dir first, so an interrupted download never looks like a finished one.
    tmp = tempfile.mkdtemp(prefix=".tmp-bigbench-", dir=cache)
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               "-d", tmp, SDIST], stdout=sys.stderr)
        if done.returncode != 0 or not os.path.exists(os.path.join(tmp, SDIST_FILE)):
            raise TitokError(f"pip download {SDIST} failed (exit {done.returncode}); "
                                       f"download {SDIST_FILE} by hand and pass --sdist PATH")
        os.replace(os.path.join(tmp, SDIST_FILE), path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _task_of_member(name):
    """'bigbench-1.0.0/bigbench/benchmark_tasks/a/b/task.json' -> ('a/b', 'task.json'), else None."""
    at = name.find(TASKS_DIR)
    if at < 0:
        return None
    rel = name[at + len(TASKS_DIR):]
    directory, _, filename = rel.rpartition("/")
    return (directory, filename) if directory else None


def read_tasks(sdist, names):
    """Read the task.json of each requested task (and of its subtasks) in one pass over the sdist.

    Returns {name: [(task_name, task_json), ...]}: one entry for a task with its own examples,
    one per subtask (sorted by name) for a task made of subtasks. Raises a ClickException naming
    close matches for a name that is not a JSON task.
    """
    wanted = set(names)
    found, known, programmatic = {}, set(), set()
    try:
        with tarfile.open(sdist, mode="r|gz") as tar:
            for member in tar:
                where = _task_of_member(member.name)
                if where is None or not member.isfile():
                    continue
                task, filename = where
                if filename == "task.py":
                    programmatic.add(task)
                if filename != "task.json":
                    continue
                known.add(task)
                top = task.split("/")[0]
                if task in wanted or top in wanted:
                    found[task] = orjson.loads(tar.extractfile(member).read())
    except (OSError, tarfile.TarError, orjson.JSONDecodeError) as e:
        raise TitokError(f"{sdist}: cannot read the BIG-bench sdist: {e}")

    tasks = {}
    for name in names:
        if name not in known:
            if name in programmatic:
                raise TitokError(f"{name} is a programmatic BIG-bench task (task.py): it has no task.json "
                                           "examples to convert")
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise TitokError(f"{name} is not a BIG-bench JSON task{hint}")
        if "examples" in found[name]:
            tasks[name] = [(name, found[name])]
        else:
            subtasks = sorted(t for t in found if t.startswith(name + "/") and "examples" in found[t])
            if not subtasks:
                raise TitokError(f"{name}: its task.json has no examples and it has no subtasks")
            tasks[name] = [(t, found[t]) for t in subtasks]
    return tasks


def option_label(i):
    """A, B, ..., Z, AA, AB, ... (some tasks have over 100 options)."""
    label = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        label = chr(ord("A") + r) + label
    return label


def option_lines(options):
    """The lines listing the options: "(A) text", "(B) text", ... When an option's text is itself
    one of those labels' letters (hyperbaton's "a"/"b", snarks' "(a)"/"(b)": the input names its
    sentences so), the labels would collide with it ("(A) b", "(B) a") and exact match would
    credit "(A)" as "a": such options are listed unlabelled, "- text". (misconceptions' T/F do
    not collide with (A)/(B): they keep their labels.)"""
    letters = {choice_letter(text) for text in options} - {None}
    if any(ord(letter) - ord("a") < len(options) for letter in letters):
        return [f"- {text}" for text in options]
    return [f"({option_label(i)}) {text}" for i, text in enumerate(options)]


def _shuffle_rng(seed, example_id):
    # Seeded by the id, not by position in a stream, so an example's option order does not
    # depend on which other tasks or examples were converted with it.
    digest = hashlib.sha256(f"{seed}\0{example_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def example_record(task_json, example, example_id, task_name, seed):
    """One BIG-bench example as a prompt/completion record, or None if it has no usable answer."""
    task_prefix = example.get("task_prefix", task_json.get("task_prefix")) or ""
    input_prefix = task_json.get("example_input_prefix") or ""
    output_prefix = task_json.get("example_output_prefix") or ""
    body = input_prefix.lstrip("\n") + str(example.get("input", ""))
    options = None
    scores = example.get("target_scores")
    if isinstance(scores, dict) and scores:
        options = [text for text in scores if text.strip()]
        if not options:
            return None
        best = max(scores[text] for text in options)
        references = [text for text in options if scores[text] == best]
        _shuffle_rng(seed, example_id).shuffle(options)
        body = body.rstrip() + "\n\nOptions:\n" + "\n".join(option_lines(options))
    else:
        target = example.get("target")
        references = [t for t in (target if isinstance(target, list) else [target]) if isinstance(t, str) and t.strip()]
        if not references:
            return None
    if output_prefix.strip():
        body = body.rstrip() + "\n" + output_prefix.strip()
    prompt = body.strip()
    if task_prefix.strip():
        prompt = task_prefix.strip() + "\n\n" + prompt
    record = {"id": example_id, "task": task_name, "prompt": prompt, "completion": references[0], "references": references}
    if options is not None:
        record["options"] = options
    record["task_description"] = task_json.get("description", "")
    return record


def task_records(entries, seed=0, counts=None):
    """All records of a task: its (task_name, task_json) entries, examples in file order."""
    counts = {} if counts is None else counts
    records = []
    for task_name, task_json in entries:
        for i, example in enumerate(task_json["examples"]):
            record = example_record(task_json, example, f"{task_name}:{i}", task_name, seed)
            if record is None:
                counts["skipped"] = counts.get("skipped", 0) + 1
                continue
            records.append(record)
    return records


def split(records, seed=0, test_fraction=0.2, test_size=None, train_size=None):
    """(train, test): a seeded random choice of test records, then of at most train_size train
    records from the rest; both keep the file order."""
    n_test = round(len(records) * test_fraction) if test_size is None else test_size
    if n_test > len(records):
        raise TitokError(f"--test-size {n_test} is more than the {len(records)} examples")
    rng = random.Random(seed)
    test_index = set(rng.sample(range(len(records)), n_test))
    rest = [i for i in range(len(records)) if i not in test_index]
    if train_size is not None and train_size < len(rest):
        rest = sorted(rng.sample(rest, train_size))
    return [records[i] for i in rest], [records[i] for i in sorted(test_index)]


def convert(sdist, names, out, seed=0, test_fraction=0.2, test_size=None, train_size=None):
    """Write out/<name>/{train,test}.jsonl for every task name; return {name: (n_train, n_test)}.

    Every name is checked before anything is written."""
    tasks = read_tasks(sdist, names)
    splits = {}
    for name, entries in tasks.items():  # every split first: a task that cannot be split stops the run before any write
        counts = {}
        splits[name] = split(task_records(entries, seed, counts), seed, test_fraction, test_size, train_size), counts
    sizes = {}
    for name, ((train, test), counts) in splits.items():
        for part, rows in (("train", train), ("test", test)):
            with record_writer(os.path.join(out, name, f"{part}.jsonl")) as writer:
                for record in rows:
                    writer.write(record)
        sizes[name] = (len(train), len(test))
        skipped = f", {counts['skipped']} examples without an answer skipped" if counts.get("skipped") else ""
        log.info("%s: %d train, %d test records in %s%s", name, len(train), len(test), os.path.join(out, name), skipped)
    return sizes


def _names(ctx, param, value):
    names = [n.strip().strip("/") for n in value.split(",") if n.strip()]
    if not names:
        raise click.BadParameter("name at least one task")
    return list(dict.fromkeys(names))


@click.command()
@click.option("--tasks", required=True, callback=_names, metavar="NAME[,NAME...]",
              help="BIG-bench task names, comma-separated; TASK/SUBTASK for one subtask.")
@click.option("--out", default=os.path.join("data", "bigbench"), show_default=True, type=click.Path(file_okay=False),
              help="Write OUT/<task>/train.jsonl and OUT/<task>/test.jsonl.")
@click.option("--sdist", type=click.Path(exists=True, dir_okay=False),
              help=f"A local {SDIST_FILE} (default: download it once into the cache).")
@click.option("--cache", type=click.Path(file_okay=False),
              help="Where the sdist is downloaded (default $TITOK_CACHE, else ~/.cache/titok-tools).")
@click.option("--test-fraction", default=0.2, show_default=True, type=cli.Finite(0, 1),
              help="Share of each task's examples that go to test.jsonl.")
@click.option("--test-size", type=click.IntRange(min=0), help="Exact number of test examples per task (overrides --test-fraction).")
@click.option("--train-size", type=click.IntRange(min=1), help="At most this many train examples per task (a seeded choice).")
@cli.seed_option
@cli.command
def main(tasks, out, sdist, cache, test_fraction, test_size, train_size, seed):
    """Convert BIG-bench tasks into prompt/completion records for titok-train, titok-gen and titok-eval.

    \b
    Example:
      python -m titok_tools.bigbench --tasks object_counting,logical_deduction/three_objects
    """
    sdist = sdist or fetch_sdist(cache or cache_dir())
    convert(sdist, tasks, out, seed, test_fraction, test_size, train_size)


if __name__ == "__main__":
    main()
