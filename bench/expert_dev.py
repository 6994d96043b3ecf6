"""The source expert's recipe (learning rate, epochs), chosen on a dev split of the TRAIN data
(never the test split).

Holds out --dev-size of each task's train.jsonl (a seeded random choice), trains the demo's expert
recipe (SmolLM2-135M-Instruct, LoRA r 16 on all linear layers, batch 8: the Makefile's DEMO_TRAIN)
on the rest at each --lrs and --epochs value (the demo: 3e-4, 2), and prints exact match on the
held-out examples, beside the floor of always giving the fit part's most common answer (what an
expert that learned only the answer prior scores), and, where the records have options
(bench/bbh_records.py gives closed-answer tasks theirs), the accuracy of picking the most likely
option (titok-eval --choices):

    python bench/expert_dev.py --data work/bbh --tasks object_counting,sports_understanding --lrs 3e-4,1e-3

Writes under --out (default work/expert-dev); a trained adapter is not re-trained, a finished
evaluation not re-run (delete its .json to evaluate again).
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
          "--target-modules", "all-linear", "--batch-size", "8", "--all-tokens", "--seed", "0"]
EVAL = ["--dtype", "auto", "--device", "cpu", "--max-new-tokens", "16", "--batch-size", "16", "--choices"]


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
    parser.add_argument("--epochs", default="2", help="comma-separated, tried with every --lrs value")
    parser.add_argument("--dev-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="picks the dev examples")
    parser.add_argument("--out", default=os.path.join(ROOT, "work", "expert-dev"))
    args = parser.parse_args(argv)
    model = bundled.smollm2()
    rows = []
    for task in args.tasks.split(","):
        fit, dev = split(os.path.join(args.data, task, "train.jsonl"), os.path.join(args.out, task),
                         args.dev_size, args.seed)
        floor = majority_floor(fit, dev)  # a constant answer: its choice accuracy is the same number
        rows.append((task, "none: the fit part's most common answer, always", floor, floor))
        for lr, epochs in ((lr, e) for lr in args.lrs.split(",") for e in args.epochs.split(",")):
            # the demo's 2 epochs keep the name of runs made before --epochs existed
            adapter = os.path.join(args.out, task, f"lr{lr}" + ("" if epochs == "2" else f"-epochs{epochs}"))
            metrics = adapter + ".json"
            if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
                subprocess.run(["titok-train", "--model", model, *RECIPE, "--lr", lr, "--epochs", epochs,
                                "--output", adapter, "--overwrite", fit], check=True)
            if not os.path.exists(metrics):
                subprocess.run(["titok-eval", "--model", model, "--adapter", adapter, *EVAL, "--metrics", metrics,
                                "-o", adapter + ".predictions.jsonl", dev], check=True)
            with open(metrics) as f:
                result = json.load(f)
            rows.append((task, f"lr {lr}, {epochs} epochs", result["exact_match"], result.get("choice_accuracy")))
    print("| task | expert recipe | dev exact match | dev choice accuracy |\n|---|---|---:|---:|")
    for task, recipe, *scores in rows:
        print(f"| {task} | {recipe} | " + " | ".join("n/a" if s is None else f"{100 * s:.1f}%" for s in scores) + " |")


if __name__ == "__main__":
    main()
