from setuptools import find_packages, setup

COMMANDS = ["gen", "score", "filter", "align", "train", "eval", "merge", "bigbench", "show"]

setup(
    name="titok-tools",
    version="0.1.0",
    description="Transplant a LoRA across LLM backbones by token-level knowledge transfer (TiTok).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["titok_tools", "titok_tools.*"]),
    package_data={"titok_tools": ["templates/*.jinja", "templates/*.txt"]},
    python_requires=">=3.10",
    # torch is deliberately unpinned below 2.1: install the build for your hardware first
    # (CPU machines here: pip install torch==2.13.0), pip will then not replace it.
    install_requires=[
        "torch>=2.1",
        "transformers>=4.56",
        "peft>=0.17",
        "accelerate>=1.0",
        "click>=8.1",
        "orjson>=3.8",
        "rouge-score>=0.1.2",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "numpy>=1.24",
        "gguf>=0.10",
        "jinja2>=3.1",  # imported directly (formatting: chat templates' TemplateError); transformers only wants it for templates
        "tokenizers>=0.20",  # imported directly (align: the target's normalizer); also a transformers dependency
        # titok-align reads only the fields it needs from each JSON line, the per-token arrays straight
        # into numpy, and splices its part into the line (bench/bench_align.py measures it)
        "pysimdjson>=6.0",
        # titok-align's MinED token map: edit distances over 49k x 262k vocabularies in C++ (vocab_map)
        "rapidfuzz>=3.0",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100"],
        "vllm": ["vllm>=0.6"],
    },
    scripts=["bin/titok-slurm"],
    entry_points={"console_scripts": [f"titok-{c}=titok_tools.{c if c != 'eval' else 'evaluate'}:main" for c in COMMANDS]},
)
