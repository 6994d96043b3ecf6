"""How right are the labels an arm trains on? On BIG-bench's boolean_expressions a query's true
answer can be computed, so a pool's labels (the expert's answers) can be checked one by one:

    python bench/bool_labels.py work/demo-bbh-boolean_expressions/{synthetic,random,filtered}.jsonl

For each file: its records, those whose prompt is a well-formed expression ("<expression> is",
made of True, False, not, and, or and parentheses only), and the share of those whose completion
is the expression's value. The top-M samples TiTok keeps (filtered.jsonl) against the M random
ones KD trains on (random.jsonl) says whether ranking by the expert's excess over its base picks
right labels, without a test question.
"""
import argparse
import os
import re
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from titok_tools.records import read_records  # noqa: E402

WORDS = re.compile(r"\(|\)|True|False|not|and|or")


def value(query):
    """The query's truth value, or None when it is not a well-formed boolean expression ending in "is"."""
    if not query.endswith(" is"):
        return None
    expression = query[: -len(" is")]
    if not expression.strip() or " ".join(WORDS.findall(expression)) != " ".join(expression.split()):
        return None
    try:  # only the words above reach eval: no names or literals but True and False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # "True ( False )": a call of a bool
            result = eval(expression, {"__builtins__": {}}, {})  # noqa: S307
    except (SyntaxError, TypeError):
        return None
    return result if isinstance(result, bool) else None


def label_accuracy(records):
    """(records, well-formed, right): how many records, how many well-formed, how many labelled right."""
    n = formed = right = 0
    for record in records:
        n += 1
        truth = value(record["prompt"].strip())
        if truth is not None:
            formed += 1
            right += record["completion"].strip() == str(truth)
    return n, formed, right


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="record files with prompt and completion")
    args = parser.parse_args(argv)
    print("| file | records | well-formed | labels right |\n|---|---:|---:|---:|")
    for path in args.files:
        n, formed, right = label_accuracy(record for _, record in read_records(path))
        share = f"{100 * right / formed:.1f}%" if formed else "n/a"
        print(f"| {path} | {n} | {formed} | {right} ({share}) |")


if __name__ == "__main__":
    main()
