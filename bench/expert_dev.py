"""The source expert's learning rate, chosen on a dev split of the TRAIN data (never the test split).

Holds out --dev-size of each task's train.jsonl (a seeded random choice), trains the demo's expert
recipe (SmolLM2-135M-Instruct, LoRA r 16 on all linear layers, 2 epochs, batch 8: the Makefile's
DEMO_TRAIN) on the rest at each --lrs value, and prints exact match on the held-out examples,
beside the floor of always giving the fit part's most common answer (what an expert that learned
only the answer prior scores):

    python bench/expert_dev.py --data work/bbh --tasks object_counting,sports_understanding --lrs 3e-4,1e-3

Writes under --out (default work/expert-dev); a finished run is not re-run.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TITOK_CACHE", os.path.join(ROOT, "models"))  # as the Makefile sets it
sys.path.insert(0, ROOT)
from titok_tools import bundled  # noqa: E402
from titok_tools.bigbench import split as held_out  # noqa: E402
from study import majority_floor  # noqa: E402  (bench/ is this script's own directory)

RECIPE = ["--dtype", "auto", "--device", "cpu", "--lora-r", "16", "--lora-alpha", "16",
          "--target-modules", "all-linear", "--epochs", "2", "--batch-size", "8", "--all-tokens", "--seed", "0"]
EVAL = ["--dtype", "auto", "--device", "cpu", "--max-new-tokens", "16", "--batch-size", "16"]


def split(train, out, dev_size, seed):
    """(fit, dev) files under `out`: titok-bigbench's seeded split, applied to the train lines."""
    with open(train, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    os.makedirs(out, exist_ok=True)
    for name, part in zip(("fit", "dev"), held_out(lines, seed=seed, test_size=dev_size)):
        with open(os.path.join(out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(part)
    return os.path.join(out, "fit.jsonl"), os.path.join(out, "dev.jsonl")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="DIR/TASK/train.jsonl")
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--lrs", default="3e-4,1e-3")
    parser.add_argument("--dev-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="picks the dev examples")
    parser.add_argument("--out", default=os.path.join(ROOT, "work", "expert-dev"))
    args = parser.parse_args(argv)
    model = bundled.smollm2()
    rows = []
    for task in args.tasks.split(","):
        fit, dev = split(os.path.join(args.data, task, "train.jsonl"), os.path.join(args.out, task),
                         args.dev_size, args.seed)
        rows.append((task, "none: the fit part's most common answer, always", majority_floor(fit, dev)))
        for lr in args.lrs.split(","):
            adapter = os.path.join(args.out, task, f"lr{lr}")
            metrics = adapter + ".json"
            if not os.path.exists(metrics):
                subprocess.run(["titok-train", "--model", model, *RECIPE, "--lr", lr, "--output", adapter,
                                "--overwrite", fit], check=True)
                subprocess.run(["titok-eval", "--model", model, "--adapter", adapter, *EVAL, "--metrics", metrics,
                                "-o", adapter + ".predictions.jsonl", dev], check=True)
            with open(metrics) as f:
                rows.append((task, lr, json.load(f)["exact_match"]))
    print("| task | lr | dev exact match |\n|---|---:|---:|")
    for task, lr, em in rows:
        print(f"| {task} | {lr} | {'n/a' if em is None else f'{100 * em:.1f}%'} |")


if __name__ == "__main__":
    main()
