"""GPU smoke check: what the CPU test suite cannot show, on a CUDA machine, in about a minute.

    python bench/gpu_check.py TOKENIZER_DIR [--device cuda]

1. The load-time logits check (models.check_project_logits) accepts tiny random models of the
   common families in bfloat16 and float16 on the GPU, where matmuls run other kernels than on
   CPU: a false refusal there would stop titok-score and titok-train on a cluster.
2. titok-score -> titok-filter -> titok-train on a tiny random Llama (TOKENIZER_DIR: a real
   tokenizer, e.g. SmolLM2's) on the GPU: bf16 scores agree with a float32 CPU run, and float16
   training (GradScaler) gives finite losses, a step that matches bf16's, and the same adapter
   twice for the same seed.
Prints one line per check and exits non-zero if one fails.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FAILED = []


def report(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def tiny_config(model_type, vocab=512):
    from transformers import AutoConfig
    extra = {"gemma3_text": dict(head_dim=16, sliding_window=64, final_logit_softcapping=30.0),
             "gemma2": dict(head_dim=16, sliding_window=64, final_logit_softcapping=30.0),
             "granite": dict(logits_scaling=8.0), "cohere": dict(logit_scale=0.0625)}.get(model_type, {})
    return AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


def check_logits(device):
    from transformers import AutoModelForCausalLM
    from titok_tools.models import check_project_logits
    for model_type in ("llama", "mistral", "qwen2", "phi3", "gemma2", "gemma3_text", "granite", "cohere"):
        for dtype in (torch.bfloat16, torch.float16):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(model_type)).to(device, dtype)
            try:
                check_project_logits(model, model_type)
                report(f"logits check {model_type} {str(dtype)[6:]}", True)
            except Exception as e:  # noqa: BLE001  (the check's refusal is what we look for)
                report(f"logits check {model_type} {str(dtype)[6:]}", False, str(e)[:200])


def cli(module, *args):
    code = f"import sys; sys.argv[0] = 'titok-{module}'; from titok_tools.{module} import main; main()"
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"titok-{module} failed: {done.stderr[-1500:]}")
    return done.stderr


def pipeline(tokenizer_dir, device, tmp):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from titok_tools.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model_dir, lora_dir = os.path.join(tmp, "tiny"), os.path.join(tmp, "lora")
    base = AutoModelForCausalLM.from_config(config)
    base.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                    init_lora_weights=False)).save_pretrained(lora_dir)
    data = os.path.join(tmp, "data.jsonl")
    with open(data, "w") as f:
        for i in range(24):
            f.write(json.dumps({"id": i, "prompt": f"How many legs do {i} cats have?",
                                "completion": f"{i} cats have {4 * i} legs, since every cat has four."}) + "\n")

    scored = {}
    for where, dtype in ((device, "bfloat16"), ("cpu", "float32")):
        out = os.path.join(tmp, f"scored-{where}-{dtype}.jsonl")
        cli("score", "--model", model_dir, "--adapter", lora_dir, "--device", where, "--dtype", dtype, "-o", out, data)
        scored[where, dtype] = [json.loads(line)["titok"]["source"]["excess"] for line in open(out)]
    worst = max(abs(a - b) for ra, rb in zip(scored[device, "bfloat16"], scored["cpu", "float32"]) for a, b in zip(ra, rb))
    report(f"titok-score on {device} bf16 vs cpu float32", worst < 0.05, f"(largest excess difference {worst:.4f})")

    filtered = os.path.join(tmp, "filtered.jsonl")
    cli("filter", "-k", "0.5", "--keep", "1.0", "-o", filtered, os.path.join(tmp, f"scored-{device}-bfloat16.jsonl"))
    weights, losses = {}, {}
    for name, dtype in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp16-again", "float16")):
        out = os.path.join(tmp, f"lora-{name}")
        cli("train", "--model", model_dir, "--device", device, "--dtype", dtype, "--epochs", 1, "--batch-size", 4,
            "--lr", "1e-3", "--seed", 0, "-o", out, filtered)
        weights[name] = load_file(os.path.join(out, "adapter_model.safetensors"))
        losses[name] = json.load(open(os.path.join(out, "titok_train.json")))["loss"]
    finite = all(torch.isfinite(torch.tensor(losses[n])).all() for n in losses)
    report("titok-train losses finite (bf16, fp16 with GradScaler)", finite, f"(fp16 {losses['fp16'][:3]} ...)")
    same = all(torch.equal(weights["fp16"][k], weights["fp16-again"][k]) for k in weights["fp16"])
    report("titok-train fp16: same seed, same adapter", same)
    first = abs(losses["fp16"][0] - losses["bf16"][0]) / abs(losses["bf16"][0])
    report("titok-train fp16 vs bf16 first-step loss", first < 0.02, f"(relative difference {first:.4f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizer_dir")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}", flush=True)
    check_logits(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline(args.tokenizer_dir, args.device, tmp)
    print(f"{len(FAILED)} checks failed" if FAILED else "all checks passed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
