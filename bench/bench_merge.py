"""Seconds of greedy answers from an expert with its LoRA unmerged and merged (docs/design.md,
Generation; titok-gen and titok-eval merge it), and from the base with the adapter switched off
against the base with the LoRA layers removed (titok-gen --queries-from base keeps that copy).

For each dtype it loads --model + --adapter once, answers the prompts of the first --num
records of --data (--max-new-tokens, batches of 16, greedy, the shared generation function)
with each model --repeats times, interleaved so that a busy machine slows every variant alike,
and prints the best seconds of each, how many answers equal the unmerged expert's (or the
disabled adapter's), and, after a float32 run, how many equal the float32 answers:

    python bench/bench_merge.py --model $(python -m titok_tools.bundled smollm2) \\
        --adapter work/demo/source-expert --data work/demo/synthetic.jsonl --num 64
"""
import argparse
import contextlib
import copy
import itertools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from titok_tools.backends import generate  # noqa: E402
from titok_tools.models import load_model, load_tokenizer, merged  # noqa: E402
from titok_tools.records import prompt_and_completion, read_records  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", required=True, help="a LoRA adapter dir of --model")
    parser.add_argument("--data", required=True, help="records whose prompts are answered")
    parser.add_argument("--num", type=int, default=64, help="prompts answered per variant")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    prompts = [prompt_and_completion(record, where)[0]
               for where, record in itertools.islice(read_records(args.data), args.num)]
    print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, batches of 16, best of {args.repeats}")
    reference = {}  # the float32 answers (when float32 runs first)
    for dtype in args.dtypes.split(","):
        lm = load_model(args.model, args.adapter, dtype, "cpu", check_logits=False)
        variants = {"expert, LoRA unmerged": lm, "expert, LoRA merged": merged(copy.deepcopy(lm)),
                    "base, adapter disabled": lm, "base, LoRA removed": copy.deepcopy(lm).unload()}
        seconds, answers = {name: [] for name in variants}, {}
        for _ in range(args.repeats):
            for name, model in variants.items():
                off = name == "base, adapter disabled"
                start = time.perf_counter()
                with model.disable_adapter() if off else contextlib.nullcontext():
                    answers[name] = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                             batch_size=16)
                seconds[name].append(time.perf_counter() - start)
        for name in variants:
            like = "expert, LoRA unmerged" if name.startswith("expert") else "base, adapter disabled"
            same = sum(a == b for a, b in zip(answers[name], answers[like]))
            line = f"{dtype:9s} {name:23s} {min(seconds[name]):6.1f} s; answers equal to {like}'s: {same}/{len(prompts)}"
            if name in reference:  # how far the dtype, merged or not, moves the answers from float32's
                same = sum(a == b for a, b in zip(answers[name], reference[name]))
                line += f", to float32's: {same}/{len(prompts)}"
            print(line, flush=True)
        if dtype == "float32":
            reference = {name: answers[name] for name in ("expert, LoRA unmerged", "base, adapter disabled")}
            reference["expert, LoRA merged"] = reference["expert, LoRA unmerged"]
            reference["base, LoRA removed"] = reference["base, adapter disabled"]


if __name__ == "__main__":
    main()
