"""Seconds per training step: titok-train's masked step (k = 0.3, 0.7) vs plain completion-only SFT.

Plain SFT is the model's own forward with labels (-100 on the prompt): logits over the whole
vocabulary at every position. The masked step is titok-train's: hidden states from the body,
the vocabulary projection and float32 CE only at the selected tokens. Same batches (4 x 256
tokens: 64 prompt + 192 completion), same LoRA (r 8, q_proj+v_proj), same optimizer step,
bf16 where the CPU runs it. The methods are interleaved round by round so background load hits
them alike; the median round is reported.

    python bench/bench_train.py [--rounds 5] [--models smollm2,gemma]

Targets: masked <= 1.0x plain at k = 0.7; faster than plain at k = 0.3 on Gemma-3-270M.
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

from titok_tools.models import load_model, resolve_dtype  # noqa: E402
from titok_tools.select import topk_mask  # noqa: E402
from titok_tools.train import Example, add_lora, collate, token_losses  # noqa: E402


def model_path(name):
    """The bundled model's GGUF (converted once to safetensors under $TITOK_CACHE)."""
    from titok_tools import bundled
    return bundled.smollm2() if name == "smollm2" else bundled.gemma()


BATCH, LENGTH, PROMPT = 4, 256, 64


def make_batches(vocab, n_batches, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(10, vocab - 10, (LENGTH,), generator=g).tolist() for _ in range(BATCH)] for _ in range(n_batches)]


def masked_examples(rows, k, seed=0):
    """Examples whose trained tokens are a top-k share of random scores over the completion."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for ids in rows:
        positions = list(range(PROMPT, LENGTH))
        mask = topk_mask(torch.rand(len(positions), generator=g).tolist(), k)
        chosen = [p for p, m in zip(positions, mask) if m]
        out.append(Example("bench", ids, chosen, [1.0] * len(chosen)))
    return out


def step_masked(model, optimizer, params, examples, autocast_dtype, device):
    ce, weights = token_losses(model, collate(examples, 0), device, autocast_dtype)
    ((weights * ce).sum() / weights.sum()).backward()
    torch.nn.utils.clip_grad_norm_(params, 0.3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_plain(model, optimizer, params, rows, autocast_dtype, device):
    ids = torch.tensor(rows, device=device)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = model(input_ids=ids, labels=labels).loss  # unpadded rows: no mask, as in titok-train
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_setup(path):
    """A LoRA (q, v, r 8) on the model at `path` in training mode, on the CPU: (model, params,
    optimizer, dtype, autocast dtype, device), what every bench step takes."""
    device = torch.device("cpu")
    dtype = resolve_dtype("auto", "cpu")
    model = load_model(path, dtype={torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype], device="cpu")
    model = add_lora(model, path, r=8, alpha=8, dropout=0.05, target_modules="q_proj,v_proj", seed=0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01)
    autocast_dtype = dtype if dtype != torch.float32 else None
    return model, params, optimizer, dtype, autocast_dtype, device


def bench_model(name, path, rounds):
    model, params, optimizer, dtype, autocast_dtype, device = training_setup(path)
    vocab = model.config.vocab_size
    batches = make_batches(vocab, rounds + 1)
    methods = {
        "plain SFT (full logits)": lambda rows: step_plain(model, optimizer, params, rows, autocast_dtype, device),
        "masked k=0.7": lambda rows: step_masked(model, optimizer, params, masked_examples(rows, 0.7), autocast_dtype, device),
        "masked k=0.3": lambda rows: step_masked(model, optimizer, params, masked_examples(rows, 0.3), autocast_dtype, device),
    }
    times = {m: [] for m in methods}
    for r, rows in enumerate(batches):
        for method, run in methods.items():
            started = time.perf_counter()
            run(rows)
            if r > 0:   # round 0 warms up (allocator, kernels)
                times[method].append(time.perf_counter() - started)
    medians = {m: statistics.median(t) for m, t in times.items()}
    plain = medians["plain SFT (full logits)"]
    print(f"\n{name}: vocab {vocab}, {dtype}, batch {BATCH} x {LENGTH} ({LENGTH - PROMPT} completion tokens per row), "
          f"{torch.get_num_threads()} threads, median of {rounds} rounds")
    for method, seconds in medians.items():
        print(f"  {method:26s} {seconds:7.3f} s/step  {seconds / plain:5.2f}x plain")
    k7, k3 = medians["masked k=0.7"] / plain, medians["masked k=0.3"] / plain
    print(f"  target masked k=0.7 <= 1.0x plain: {'met' if k7 <= 1.0 else 'MISSED'} ({k7:.2f}x)")
    if name == "gemma":
        print(f"  target masked k=0.3 faster than plain: {'met' if k3 < 1.0 else 'MISSED'} ({k3:.2f}x)")
    del model, optimizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", default="smollm2,gemma")
    args = parser.parse_args()
    for name in args.models.split(","):
        bench_model(name, model_path(name), args.rounds)


if __name__ == "__main__":
    main()
