"""Shared fixtures: the real small models shipped in PyPI packages, tiny random models, LoRAs.

Real models are converted once into the repo's models/ cache (git-ignored), which every test
session and `make demo` reuse.
"""
import os
import signal
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TITOK_CACHE", os.path.join(ROOT, "models"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
GEMMA_TEMPLATE = os.path.join(ROOT, "data", "templates", "gemma3-chat.jinja")


def bundled(name):
    from titok_tools import bundled as b
    from titok_tools.errors import TitokError
    try:
        return getattr(b, name)()
    except TitokError as e:
        pytest.skip(e.message)


@pytest.fixture(scope="session")
def smollm2_gguf():
    return bundled("smollm2")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf):
    """SmolLM2-135M-Instruct as a local safetensors model dir (converted from its GGUF once)."""
    from titok_tools.models import resolve
    return resolve(smollm2_gguf)


@pytest.fixture(scope="session")
def gemma_gguf():
    return bundled("gemma")


@pytest.fixture(scope="session")
def gemma_tokenizer(gemma_gguf):
    from titok_tools.models import load_tokenizer
    return load_tokenizer(gemma_gguf, GEMMA_TEMPLATE)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from titok_tools.models import load_tokenizer
    return load_tokenizer(smollm2_dir)


def make_lora(model_dir, out_dir, seed=0, r=8, target_modules=("q_proj", "v_proj")):
    """A LoRA whose A and B are random and non-zero (a fresh LoRA has B = 0 and changes nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules),
                                            init_lora_weights=False))
    model.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="session")
def smollm2_lora(smollm2_dir, tmp_path_factory):
    return make_lora(smollm2_dir, tmp_path_factory.mktemp("smollm2-lora"))


def make_tiny_model(tokenizer_dir, out_dir, family="llama", chat_template=None, seed=0):
    """A tiny random causal LM (2 layers, width 64) with a real tokenizer: fast tests of the
    plumbing; the real models check the numbers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from titok_tools.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir, chat_template)
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    if family == "gemma3":
        config = AutoConfig.for_model("gemma3_text", head_dim=16, sliding_window=64, **common)
    else:
        config = AutoConfig.for_model("llama", **common)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="session")
def tiny_llama(smollm2_dir, tmp_path_factory):
    """Tiny random Llama with SmolLM2's tokenizer and chat template."""
    return make_tiny_model(smollm2_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gemma(gemma_gguf, tmp_path_factory):
    """Tiny random Gemma 3 with Gemma's tokenizer and our Gemma chat template saved into it."""
    return make_tiny_model(gemma_gguf, tmp_path_factory.mktemp("tiny-gemma"), "gemma3", GEMMA_TEMPLATE, seed=1)


@pytest.fixture(scope="session")
def tiny_llama_lora(tiny_llama, tmp_path_factory):
    return make_lora(tiny_llama, tmp_path_factory.mktemp("tiny-llama-lora"))


# A ChatML template that refuses a system message, as Gemma's and Mistral's own templates do
# (raise_exception): a record with one must be reported, not crash a stage.
NO_SYSTEM_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                      "supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def no_system_template(tmp_path):
    path = tmp_path / "no-system.jinja"
    path.write_text(NO_SYSTEM_TEMPLATE)
    return str(path)


def run_pipe(*commands, input=None, env=None, check=True):
    """Run `cmd1 | cmd2 | ...` as real subprocesses; return (stdout bytes, list of returncodes, stderr text)."""
    import shlex
    shell = " | ".join(" ".join(shlex.quote(str(a)) for a in c) for c in commands)
    full_env = dict(os.environ, **(env or {}))
    p = subprocess.run(["bash", "-o", "pipefail", "-c", shell], input=input, capture_output=True, env=full_env)
    if check and p.returncode != 0:
        raise AssertionError(f"{shell} failed ({p.returncode}):\n{p.stderr.decode()[-3000:]}")
    return p.stdout, p.returncode, p.stderr.decode()


def write_jsonl(path, records):
    import orjson
    with open(path, "wb") as f:
        for r in records:
            f.write(orjson.dumps(r) + b"\n")
    return str(path)


def read_jsonl(data):
    import orjson
    if isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as f:
            data = f.read()
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


@pytest.fixture
def one_thread():
    """torch on one thread: a tiny model's batches are too small to share, and on a busy machine
    (other jobs on the cores) two threads that wait for each other take ten times as long."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def interrupt(command, files, lines, signum, timeout=120):
    """Run a titok command as a real process and send it `signum` once `files` hold `lines`
    complete lines together; return (returncode, stderr). The child gets this process's torch
    thread count, so that its float sums match the in-process runs it is compared with."""
    import tempfile
    import time

    import torch

    def complete_lines():
        return sum(open(f, "rb").read().count(b"\n") for f in files if os.path.exists(f))

    with tempfile.TemporaryFile() as stderr:
        # SIGINT back to its default in the child: a shell without job control (a CI job started
        # with `&`) ignores it in its background commands, and the child would inherit that.
        proc = subprocess.Popen([str(a) for a in command], stdout=subprocess.DEVNULL, stderr=stderr,
                                env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + timeout
        while proc.poll() is None and time.time() < deadline and complete_lines() < lines:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signum)
        proc.wait(timeout)
        stderr.seek(0)
        return proc.returncode, stderr.read().decode()
