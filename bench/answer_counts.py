"""What a model answers, counted: the most common predictions of titok-eval output files, so a
score near the floor can be read as "answers one thing" or not.

    python bench/answer_counts.py work/demo-bbh-boolean_expressions/eval/*.jsonl --top 3

Each file: its records and its --top predictions with their counts (compared after exact
match's normalization, so "True." and "true" count as one; shown as first written).
"""
import argparse
import json
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from titok_tools.answers import normalize  # noqa: E402
from titok_tools.errors import TitokError  # noqa: E402
from titok_tools.records import RecordError, read_records  # noqa: E402


def answer_counts(predictions, top):
    """[(answer, count)] of the `top` most common, ties in first-seen order; an answer is shown
    as it was first written."""
    counts, shown = Counter(), {}
    for prediction in predictions:
        key = normalize(prediction)
        shown.setdefault(key, prediction.strip())
        counts[key] += 1
    return [(shown[key], n) for key, n in counts.most_common(top)]


def prediction(where, record):
    if not isinstance(record.get("prediction"), str):
        raise RecordError(where, "prediction", "missing or not a string (is this titok-eval output?)")
    return record["prediction"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="titok-eval -o files (records with a prediction)")
    parser.add_argument("--top", type=int, default=3)
    args = parser.parse_args(argv)
    print("| file | records | most common answers |\n|---|---:|---|")
    for path in args.files:
        try:
            predictions = [prediction(where, record) for where, record in read_records(path)]
        except TitokError as e:
            sys.exit(f"answer_counts: {e}")
        top = ", ".join(f"{json.dumps(answer)} {n}" for answer, n in answer_counts(predictions, args.top))
        print(f"| {path} | {len(predictions)} | {top} |")


if __name__ == "__main__":
    main()
