"""Does titok-gen's shape check (docs/design.md, Query shape) pass the task's real inputs? The shape
is read off the first --fit train examples of each task and applied to the rest, which a good
check passes all of: a real input it rejects is a task input the writer may never keep.

    python bench/shape_check.py work/bbh/*/train.jsonl --fit 100

Prints per file the shape it found and how many held-out inputs pass. Train data only: no choice
here looks at a test split.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from titok_tools.queries import load_seeds  # noqa: E402
from titok_tools.query_shape import QueryShape  # noqa: E402


def held_out_pass(texts, fit):
    """(the shape read off texts[:fit], how many of texts[fit:] it passes, how many there are)."""
    shape = QueryShape.from_seeds(texts[:fit])
    held = texts[fit:]
    return shape, sum(shape.fits(t) for t in held), len(held)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="train.jsonl files (seed examples), one per task")
    parser.add_argument("--fit", type=int, default=100, help="read the shape off this many examples; test the rest")
    args = parser.parse_args(argv)
    print("| file | shape read off the first examples | held-out inputs that pass |\n|---|---|---:|")
    for path in args.files:
        texts = load_seeds(path, None).texts
        if len(texts) <= args.fit:
            sys.exit(f"{path}: {len(texts)} examples, none left after --fit {args.fit}")
        shape, passed, held = held_out_pass(texts, args.fit)
        print(f"| {path} | {shape.describe()} | {passed} of {held} |")


if __name__ == "__main__":
    main()
