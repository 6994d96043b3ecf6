"""Seconds of the demo's own commands in float32 and in bfloat16 on this CPU (make demo's DTYPE).

bfloat16 halves memory, but a CPU without native bf16 arithmetic (AVX512-BF16 or AMX) emulates
it, and the demo's commands then run many times slower. `--dtype auto` picks bfloat16 only
where torch reports native support. For each dtype this times, as subprocesses:
- titok-train: the demo's target recipe (Gemma-3-270M, LoRA r 16 on all linear layers, batch 8)
  for --steps steps on the first records of --data (all tokens);
- titok-eval: greedy answers to --batch questions in one batch from SmolLM2-135M (the demo's
  source: generation, as in titok-gen and titok-eval).

    python bench/bench_dtype.py --data work/bbh/object_counting/train.jsonl [--steps 3]

It prints which dtype --dtype auto picks here, the CPU's bf16 flags, and a line per command.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TITOK_CACHE", os.path.join(ROOT, "models"))
sys.path.insert(0, ROOT)

from titok_tools import bundled  # noqa: E402
from titok_tools.models import resolve_dtype  # noqa: E402

TRAINED = re.compile(r"trained (\d+) steps on \d+ tokens in (\d+) s")


def run(command):
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return done.stderr, time.time() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="records with prompt and completion (a train split)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per dtype")
    parser.add_argument("--batch", type=int, default=16, help="questions answered per dtype")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args(argv)
    with open("/proc/cpuinfo") as f:
        flags = sorted({flag for flag in f.read().split() if "bf16" in flag or flag.startswith("amx")})
    print(f"--dtype auto picks {resolve_dtype('auto', 'cpu')} here; CPU bf16 flags: {', '.join(flags) or 'none'}")
    gemma, smollm2 = bundled.gemma(), bundled.smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        records = os.path.join(tmp, "records.jsonl")
        with open(args.data) as src, open(records, "w") as dst:
            dst.writelines(line for _, line in zip(range(8 * args.steps), src))
        for dtype in args.dtypes.split(","):
            run_args = ["--dtype", dtype, "--device", "cpu"]
            stderr, _ = run(["titok-train", "--model", gemma, *run_args, "--chat-template",
                             os.path.join(ROOT, "data", "templates", "gemma3-chat.jinja"), "--all-tokens",
                             "--lora-r", "16", "--lora-alpha", "16", "--target-modules", "all-linear",
                             "--epochs", "1", "--batch-size", "8", "-o", os.path.join(tmp, dtype), "--overwrite",
                             records])
            steps, seconds = map(int, TRAINED.search(stderr).groups())
            print(f"{dtype:9s} titok-train (Gemma-3-270M, LoRA, batch 8): {seconds / steps:6.1f} s/step", flush=True)
            _, seconds = run(["titok-eval", "--model", smollm2, *run_args, "--max-new-tokens", "16",
                              "--batch-size", str(args.batch), "--limit", str(args.batch),
                              "-o", os.path.join(tmp, f"{dtype}.jsonl"), args.data])
            print(f"{dtype:9s} titok-eval (SmolLM2-135M, {args.batch} answers): {seconds:6.1f} s, loading included",
                  flush=True)


if __name__ == "__main__":
    main()
