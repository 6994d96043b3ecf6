"""Benchmark titok-score against one plain forward pass and against two loaded model copies.

    python bench/bench_score.py [--models smollm2,gemma] [--dtype bfloat16] [--records 200]

For each model: 200 records of ~300 tokens (prompt ~200, completion ~100), a random LoRA (r=8,
q_proj/v_proj). Each measurement runs in its own process so peak resident memory (ru_maxrss)
is its own:
  plain  one model, one forward pass with full logits over the same batches (no grad)
  score  titok-score's core: one model + adapter, expert and base passes, logits only at
         completion positions
  two    the official code's way: two loaded copies (base, and base + adapter), full logits
Targets (issue 3): score throughput >= 0.6x plain; score memory <= 1.15x plain.
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TITOK_CACHE", os.path.join(ROOT, "models"))

WORDS = ("the of and to in is was for on that with as by at from his her it an are were which this be or "
         "river mountain market engine signal theory garden letter window number answer question people city "
         "count apples seven blue quickly under before after between seventeen reason history music paper").split()


def model_path(name):
    from titok_tools import bundled
    return bundled.smollm2() if name == "smollm2" else bundled.gemma()


def records(n, seed=0):
    rng = random.Random(seed)
    # ~1.1 tokens a word with these tokenizers: 180 words of prompt, 90 of completion.
    return [{"id": i, "prompt": " ".join(rng.choices(WORDS, k=180)) + "?",
             "completion": " ".join(rng.choices(WORDS, k=90)) + "."} for i in range(n)]


def lora_for(name, model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    out = os.path.join(os.environ["TITOK_CACHE"], f"bench-lora-{name}")
    if not os.path.exists(os.path.join(out, "adapter_config.json")):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                               LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.save_pretrained(out)
    return out


def measure(mode, name, dtype, n, batch_tokens):
    """Runs in a child process; prints one JSON line."""
    import torch
    from titok_tools.formatting import encode
    from titok_tools.models import load_model, load_tokenizer, resolve
    from titok_tools.records import prompt_and_completion
    from titok_tools.score import _batches, score_records

    torch.set_num_threads(os.cpu_count())
    model_dir = resolve(model_path(name))
    adapter = lora_for(name, model_dir)
    tokenizer = load_tokenizer(model_dir)
    data = records(n)
    encs = [encode(tokenizer, *prompt_and_completion(r, "bench")) for r in data]
    tokens = sum(len(e.input_ids) for e in encs)
    completion_tokens = sum(len(e.positions) for e in encs)

    def forward_full(model, batch):
        width = max(len(e.input_ids) for _, e in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        for b, (_, e) in enumerate(batch):
            ids[b, :len(e.input_ids)] = torch.tensor(e.input_ids)
        # Right padding, causal attention: no mask needed, as in titok-score (same kernels).
        return model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)

    if mode == "score":
        model = load_model(model_dir, adapter, dtype=dtype, device="cpu")
        start = time.time()
        for _ in score_records([(str(i), r) for i, r in enumerate(data)], model, tokenizer, batch_tokens=batch_tokens,
                               window=n, scored_by={}):
            pass
    else:
        models = [load_model(model_dir, None, dtype=dtype, device="cpu")]
        if mode == "two":
            models.append(load_model(model_dir, adapter, dtype=dtype, device="cpu"))
        start = time.time()
        with torch.inference_mode():
            for batch in _batches(list(enumerate(encs)), batch_tokens):
                for model in models:
                    forward_full(model, batch)
    elapsed = time.time() - start
    print(json.dumps({"mode": mode, "model": name, "dtype": dtype, "seconds": elapsed, "tokens": tokens,
                      "completion_tokens": completion_tokens, "tok_s": tokens / elapsed,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,gemma")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--batch-tokens", type=int, default=2400, help="8 rows of ~300 tokens")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure(args.child[0], args.child[1], args.dtype, args.records, args.batch_tokens)
    print(f"titok-score benchmark: {args.records} records of ~300 tokens, dtype {args.dtype}, "
          f"{os.cpu_count()} CPU threads, batch budget {args.batch_tokens} tokens", flush=True)
    print(f"{'model':8} {'mode':6} {'tok/s':>8} {'seconds':>8} {'peak RSS MB':>12}", flush=True)
    for name in args.models.split(","):
        results = {}
        for mode in ("plain", "score", "two"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, name, "--dtype", args.dtype,
                                  "--records", str(args.records), "--batch-tokens", str(args.batch_tokens)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-2000:])
            r = results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:8} {mode:6} {r['tok_s']:8.0f} {r['seconds']:8.1f} {r['peak_rss_mb']:12.0f}", flush=True)
        speed = results["score"]["tok_s"] / results["plain"]["tok_s"]
        memory = results["score"]["peak_rss_mb"] / results["plain"]["peak_rss_mb"]
        two = results["two"]["peak_rss_mb"] / results["plain"]["peak_rss_mb"]
        print(f"{name}: score throughput {speed:.2f}x one plain forward (target >= 0.6) "
              f"{'OK' if speed >= 0.6 else 'MISSED'}; peak memory {memory:.2f}x one model (target <= 1.15) "
              f"{'OK' if memory <= 1.15 else 'MISSED'}; two copies {two:.2f}x", flush=True)


if __name__ == "__main__":
    main()
