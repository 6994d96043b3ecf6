"""The MinED token map SmolLM2 (49k) -> Gemma-3 (262k): time to build it (cold) and to load it
from the cache, and how its source tokens were matched.

    cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python bench/bench_vocab_map.py

The cold run builds into a fresh temporary $TITOK_CACHE/vocab-maps (the tokenizers still come
from the repo's models/ cache), the cached run reads the file it wrote.
"""
import logging
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TITOK_CACHE", os.path.join(ROOT, "models"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from titok_tools import bundled, vocab_map  # noqa: E402
from titok_tools.models import load_tokenizer, resolve, tokenizer_fingerprint  # noqa: E402


def main():
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    source = load_tokenizer(resolve(bundled.smollm2()))
    target = load_tokenizer(bundled.gemma())
    for tokenizer in (source, target):
        tokenizer_fingerprint(tokenizer)  # computed once per tokenizer, not part of the map's cost
    maps = tempfile.mkdtemp(prefix="titok-bench-vocab-")
    real_path = vocab_map.map_path
    vocab_map.map_path = lambda s, t: os.path.join(maps, os.path.basename(real_path(s, t)))
    try:
        started = time.perf_counter()
        cold = vocab_map.token_map(source, target)
        cold_s = time.perf_counter() - started
        started = time.perf_counter()
        cached = vocab_map.token_map(source, target)
        cached_s = time.perf_counter() - started
        assert (cold == cached).all()
        from safetensors import safe_open
        with safe_open(vocab_map.map_path(tokenizer_fingerprint(source), tokenizer_fingerprint(target)), "numpy") as f:
            stats = f.metadata()["stats"]
    finally:
        vocab_map.map_path = real_path
        shutil.rmtree(maps, ignore_errors=True)
    sys.stderr.write(f"SmolLM2 ({len(source)}) -> Gemma-3 ({len(target)}): cold {cold_s:.1f}s, cached {cached_s * 1000:.1f}ms; "
                     f"{stats}\n")


if __name__ == "__main__":
    main()
