"""BIG-Bench Hard task files (suzgunmirac/BIG-Bench-Hard, bbh/TASK.jsonl: {"input", "target"}) as
train/test records, for machines where the bigbench sdist that titok-bigbench reads is not at hand.

BBH keeps 250 examples of each of its BIG-bench tasks, in BIG-bench's wording (multiple-choice
inputs carry their "Options:" block, and the target is the option's letter). The split is a seeded
random choice of --test-size test records, as titok-bigbench makes it.

Records get "options" for `titok-eval --choices` where the answer is one of a closed set: the
letters of an input's "Options:" block ("(A)", "(B)", ...: the targets are letters, so the letters
are what is scored; a block of unlabelled "- text" lines, as navigate's, offers its texts), or,
for a task with exactly two distinct targets that are not option letters (yes/no, True/False,
valid/invalid), those two. Tasks with open answers (object_counting's numbers) get none.

    python bench/bbh_records.py bbh/object_counting.jsonl --out work/bbh --test-size 100 --seed 0
"""
import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from titok_tools.answers import choice_letter  # noqa: E402
from titok_tools.bigbench import split  # noqa: E402


OPTION_LABEL = re.compile(r"^(\([A-Z]\)) ", re.MULTILINE)
OPTION_TEXT = re.compile(r"^- (.+)$", re.MULTILINE)  # navigate's block: "- Yes", "- No"


def two_answers(targets):
    """A task's two answers when it has exactly two that are not option letters (letters without
    an options block to label them are no answers of their own), else None."""
    distinct = sorted(set(targets))
    return distinct if len(distinct) == 2 and not any(map(choice_letter, distinct)) else None


def options(text, task_answers):
    """The closed set a record's answer is chosen from (see the docstring), or None; task_answers
    is two_answers() of the task's targets."""
    if "\nOptions:\n" in text:
        block = text.rsplit("\nOptions:\n", 1)[1]
        return OPTION_LABEL.findall(block) or [o.strip() for o in OPTION_TEXT.findall(block)] or None
    return task_answers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="bbh/TASK.jsonl files")
    parser.add_argument("--out", required=True, help="writes OUT/TASK/train.jsonl and OUT/TASK/test.jsonl")
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in args.files:
        task = os.path.splitext(os.path.basename(path))[0]
        with open(path, encoding="utf-8") as f:
            examples = [json.loads(line) for line in f if line.strip()]
        records = [{"id": f"{task}:{i}", "task": task, "prompt": e["input"].strip(), "completion": e["target"].strip(),
                    "references": [e["target"].strip()]} for i, e in enumerate(examples)]
        task_answers = two_answers(r["completion"] for r in records)
        for record in records:
            closed = options(record["prompt"], task_answers)
            if closed and record["completion"] in closed:
                record["options"] = closed
        if args.test_size >= len(records):
            sys.exit(f"{path}: --test-size {args.test_size} leaves no training examples of {len(records)}")
        os.makedirs(os.path.join(args.out, task), exist_ok=True)
        for name, part in zip(("train", "test"), split(records, seed=args.seed, test_size=args.test_size)):
            with open(os.path.join(args.out, task, f"{name}.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        print(f"{task}: {len(records) - args.test_size} train, {args.test_size} test", file=sys.stderr)


if __name__ == "__main__":
    main()
