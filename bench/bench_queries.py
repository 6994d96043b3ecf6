"""How often does each query writer produce task-shaped queries? (issue 21, docs/design.md, Query shape)

For each task directory (train.jsonl: the seed examples; never a test split), each --template and
each writer (the base model, or the expert with --adapter-dir), each --shots, --top-p and
--queries-per-prompt, runs titok-gen with --no-shape-check for --num queries and prints the share
of the queries it read that have the seeds' shape, the share it rejected as near-duplicates, and
the seconds it took:

    python bench/bench_queries.py --data work/demo/data --tasks object_counting \\
        --model $(python -m titok_tools.bundled smollm2) --templates default,continuation --num 32

--adapter-dir DIR adds the expert writer, with DIR/TASK as each task's adapter. Sampling settings
are a choice on the seed examples (train data) alone: the paper tuned top-p per task.

    python bench/bench_queries.py --data work/bbh --tasks object_counting --model ... --shots 3,8 --top-p 0.9,0.7
"""
import argparse
import itertools
import os
import re
import subprocess
import sys
import time

SUMMARY = re.compile(r"on-format (\S+) of the (\d+) read.*?rejected \d+ \(format\), (\d+) \(duplicate\)")


def measure(args, task, template, adapter, queries_from, shots, top_p, per_prompt, out):
    command = ["titok-gen", "--model", args.model, "--seed-examples", os.path.join(args.data, task, "train.jsonl"),
               "--template", template, "--num", str(args.num), "--shots", shots, "--top-p", top_p,
               "--queries-per-prompt", per_prompt,
               "--no-shape-check", "--seed", str(args.seed),
               "--dtype", "auto", "--device", "cpu", "--max-new-tokens", args.max_new_tokens, "--label-max-new-tokens", "16",
               "--batch-size", "16", "-o", out]
    if adapter:
        command += ["--adapter", adapter, "--queries-from", queries_from]
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    found = SUMMARY.search(done.stderr)
    read = int(found.group(2))
    return found.group(1), read, int(found.group(3)) / read, time.time() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a directory with TASK/train.jsonl")
    parser.add_argument("--tasks", required=True, help="comma-separated task directories under --data")
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter-dir", help="DIR/TASK is each task's expert adapter: adds the expert writer")
    parser.add_argument("--templates", default="default,continuation")
    parser.add_argument("--num", type=int, default=32, help="queries per cell")
    parser.add_argument("--shots", default="3", help="comma-separated titok-gen --shots values")
    parser.add_argument("--top-p", default="0.9", help="comma-separated titok-gen --top-p values")
    parser.add_argument("--queries-per-prompt", default="1", help="comma-separated titok-gen --queries-per-prompt values")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", default="auto", help="titok-gen's query budget: a number or auto")
    parser.add_argument("--out", default=os.path.join("work", "bench-queries"), help="where the queries are written")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    writers = [("base", None, "base")] + ([("expert", args.adapter_dir, "expert")] if args.adapter_dir else [])
    print(f"query budget: --max-new-tokens {args.max_new_tokens}", file=sys.stderr)
    print("| task | template | writer | shots | top-p | queries per prompt | on-format | duplicates | queries read | seconds |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for task in args.tasks.split(","):
        for template in args.templates.split(","):
            for (name, adapter_dir, queries_from), shots, top_p, per_prompt in itertools.product(
                    writers, args.shots.split(","), args.top_p.split(","), args.queries_per_prompt.split(",")):
                adapter = os.path.join(adapter_dir, task) if adapter_dir else None
                out = os.path.join(args.out, f"{task}-{os.path.basename(template)}-{name}-s{shots}-p{top_p}-q{per_prompt}.jsonl")
                rate, read, duplicates, seconds = measure(args, task, template, adapter, queries_from, shots, top_p,
                                                          per_prompt, out)
                print(f"| {task} | {template} | {name} | {shots} | {top_p} | {per_prompt} | {rate} | {duplicates:.0%} | {read} | "
                      f"{seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
