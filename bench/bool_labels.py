"""How right are the labels an arm trains on? On BIG-bench's boolean_expressions a query's true
answer can be computed, so a pool's labels (the expert's answers) can be checked one by one:

    python bench/bool_labels.py work/demo-bbh-boolean_expressions/{synthetic,random,filtered}.jsonl

For each file: its records, those whose prompt is a well-formed expression ("<expression> is",
made of True, False, not, and, or and parentheses only), and the share of those whose completion
is the expression's value. The top-M samples TiTok keeps (filtered.jsonl) against the M random
ones KD trains on (random.jsonl) says whether ranking by the expert's excess over its base picks
right labels, without a test question.

    python bench/bool_labels.py --seeds work/bbh/boolean_expressions/train.jsonl FILE...

adds how many of a file's queries have the seed examples' shape (titok-gen's check, docs/design.md,
Query shape) and how many of those are well-formed: how well the check finds the task's inputs.

    python bench/bool_labels.py --auc work/demo-bbh-boolean_expressions/scored.jsonl

asks which sample score ranks right labels above wrong ones, over the scored pool's well-formed
queries: the AUC (the chance that a right label outscores a wrong one; 0.5 is chance) of TiTok's
mean excess, of the mean excess of the answer's tokens alone (titok-filter --rank-by answer-excess)
and of the expert's confidence (titok-filter --rank-by confidence).
"""
import argparse
import os
import re
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from titok_tools.filter import answer_excess  # noqa: E402
from titok_tools.queries import load_seeds  # noqa: E402
from titok_tools.query_shape import QueryShape  # noqa: E402
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


def label_accuracy(records, shape=None):
    """(records, well-formed, right), and with a QueryShape (on shape, well-formed of those): how
    many records, how many well-formed, how many labelled right."""
    n = formed = right = fits = fits_formed = 0
    for record in records:
        n += 1
        truth = value(record["prompt"].strip())
        if truth is not None:
            formed += 1
            right += record["completion"].strip() == str(truth)
        if shape is not None and shape.fits(record["prompt"]):
            fits += 1
            fits_formed += truth is not None
    return (n, formed, right) if shape is None else (n, formed, right, fits, fits_formed)


def auc(right, wrong):
    """The chance that a score from `right` is above one from `wrong`, ties counting half."""
    pairs = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong)
    return pairs / (len(right) * len(wrong)) if right and wrong else None


def ranking_auc(records):
    """{score name: AUC} over the well-formed scored records, right labels against wrong ones."""
    scores = {"mean excess (TiTok's sample rank)": lambda s: s["mean_excess"],
              "answer tokens' mean excess, closing token left out (--rank-by answer-excess)": answer_excess,
              "expert confidence, mean log p_expert (--rank-by confidence)":
                  lambda s: sum(s["logp_expert"]) / len(s["logp_expert"])}
    right, wrong = {name: [] for name in scores}, {name: [] for name in scores}
    for record in records:
        truth = value(record["prompt"].strip())
        if truth is None:
            continue
        side = right if record["completion"].strip() == str(truth) else wrong
        for name, score in scores.items():
            side[name].append(score(record["titok"]["source"]))
    return {name: auc(right[name], wrong[name]) for name in scores}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="record files with prompt and completion")
    parser.add_argument("--seeds", help="the seed examples (train.jsonl): add the queries with their shape")
    parser.add_argument("--auc", action="store_true", help="files are scored pools: the AUC of each sample score")
    args = parser.parse_args(argv)
    if args.auc:
        print("| file | sample score | AUC, right labels above wrong ones |\n|---|---|---:|")
        for path in args.files:
            for name, area in ranking_auc(record for _, record in read_records(path)).items():
                print(f"| {path} | {name} | {'n/a' if area is None else f'{area:.3f}'} |")
        return
    shape = QueryShape.from_seeds(load_seeds(args.seeds, None).texts) if args.seeds else None
    if shape is None:
        print("| file | records | well-formed | labels right |\n|---|---:|---:|---:|")
    else:
        print(f"seeds' shape: {shape.describe()}")
        print("| file | records | on the seeds' shape | well-formed of those | well-formed | labels right |\n"
              "|---|---:|---:|---:|---:|---:|")
    for path in args.files:
        n, formed, right, *on_shape = label_accuracy((record for _, record in read_records(path)), shape)
        share = f"{100 * right / formed:.1f}%" if formed else "n/a"
        fits = f" {on_shape[0]} ({100 * on_shape[0] / n:.0f}%) | {on_shape[1]} |" if on_shape else ""
        print(f"| {path} | {n} |{fits} {formed} | {right} ({share}) |")


if __name__ == "__main__":
    main()
