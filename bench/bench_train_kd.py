"""Seconds per training step: titok-train with logit distillation (N = 20) vs masked NLL alone.

Both steps are titok-train's own (train.token_losses; train.distill_share with --kd-weight 1):
the same batches as bench_train.py (4 x 256 tokens: 64 prompt + 192 completion), the TiTok mask at
k = 0.7, a teacher top-20 distribution at every trained token (the KD step's worst case: every
trained row pays the KL), same LoRA (r 8, q_proj+v_proj), same optimizer step, bf16 where the CPU
runs it. The methods are interleaved round by round, in an order that rotates each round, so
background load and cache warmth hit them alike; the median round is reported.

    python bench/bench_train_kd.py [--rounds 5] [--models smollm2,gemma] [--topk 20]

Target: NLL + KD <= 1.2x masked NLL at N = 20.
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TITOK_CACHE", os.path.join(ROOT, "models"))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_train import make_batches, masked_examples, model_path, step_masked, training_setup  # noqa: E402
from titok_tools.train import Distill, distill_share  # noqa: E402


def with_teacher(examples, vocab, topk, seed=0):
    """The examples, each trained token given a top-`topk` teacher distribution (distinct ids,
    descending log-probs), as make_example attaches them."""
    g = torch.Generator().manual_seed(seed)
    for e in examples:
        n = len(e.positions)
        logp, ids = torch.randn(n, vocab, generator=g).log_softmax(-1).topk(topk, dim=-1)
        e.teacher_at, e.teacher_ids, e.teacher_logp = list(range(n)), ids, logp.float()
    return examples


def step_kd(model, optimizer, params, examples, autocast_dtype, device, distill):
    norms = (sum(sum(e.weights) for e in examples), sum(e.teacher_weight for e in examples))
    share, _ = distill_share(model, examples, 0, device, autocast_dtype, distill, norms)
    share.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_model(name, path, rounds, topk):
    model, params, optimizer, dtype, autocast_dtype, device = training_setup(path)
    vocab = model.config.vocab_size
    batches = [masked_examples(rows, 0.7, seed=r) for r, rows in enumerate(make_batches(vocab, rounds + 1))]
    batches = [with_teacher(examples, vocab, topk, seed=r) for r, examples in enumerate(batches)]
    distill = Distill(weight=1.0, temperature=1.0)
    methods = {
        "masked NLL k=0.7": lambda ex: step_masked(model, optimizer, params, ex, autocast_dtype, device),
        f"NLL + KD N={topk}": lambda ex: step_kd(model, optimizer, params, ex, autocast_dtype, device, distill),
        f"KD only N={topk}": lambda ex: step_kd(model, optimizer, params, ex, autocast_dtype, device,
                                                Distill(weight=1.0, temperature=1.0, only=True)),
    }
    times = {m: [] for m in methods}
    names = list(methods)
    for r, examples in enumerate(batches):
        # the order rotates each round: a method that always ran last (after the others warmed
        # caches, or under a load that grows through a round) would carry that in its median
        for method in names[r % len(names):] + names[:r % len(names)]:
            started = time.perf_counter()
            methods[method](examples)
            if r > 0:   # round 0 warms up (allocator, kernels)
                times[method].append(time.perf_counter() - started)
    medians = {m: statistics.median(t) for m, t in times.items()}
    nll = medians["masked NLL k=0.7"]
    trained = sum(len(e.positions) for e in batches[0])
    print(f"\n{name}: vocab {vocab}, {dtype}, 4 x 256 tokens, {trained} trained tokens per step (all with a "
          f"distribution), {torch.get_num_threads()} threads, median of {rounds} rounds")
    for method, seconds in medians.items():
        print(f"  {method:20s} {seconds:7.3f} s/step  {seconds / nll:5.2f}x masked NLL")
    ratio = medians[f"NLL + KD N={topk}"] / nll
    print(f"  target NLL + KD <= 1.2x masked NLL: {'met' if ratio <= 1.2 else 'MISSED'} ({ratio:.2f}x)")
    del model, optimizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", default="smollm2")
    parser.add_argument("--topk", type=int, default=20)
    args = parser.parse_args()
    for name in args.models.split(","):
        bench_model(name, model_path(name), args.rounds, args.topk)


if __name__ == "__main__":
    main()
