"""titok-tools: move a LoRA adapter between LLM backbones through token-level knowledge (TiTok).

Each stage's core is a plain function over (where, record) pairs, importable without its command:

    from titok_tools import read_records, filter_records, TitokError

    read = lambda: read_records("scored.jsonl")
    kept = list(filter_records(read, k=0.3, keep=250, scope="sample"))

Errors in the input raise TitokError (RecordError, a subclass, names file:line and field); only
the commands turn them into one-line messages and exit codes. Names are imported on first use, so
`import titok_tools` loads neither torch nor transformers.
"""
import importlib

__version__ = "0.1.0"

API = {
    "TitokError": "errors", "RecordError": "records", "read_records": "records", "record_writer": "records",
    "generate_records": "gen", "label_records": "gen", "load_template": "queries", "load_seeds": "queries",
    "GenSettings": "gen", "QueryShape": "query_shape",
    "score_records": "score", "filter_records": "filter", "align_records": "align",
    "prepare_examples": "train", "add_lora": "train", "write_adapter": "train",
    "evaluate_records": "evaluate", "load_model": "models", "load_tokenizer": "models",
}
__all__ = sorted(API)


def __getattr__(name):
    if name not in API:
        raise AttributeError(f"module 'titok_tools' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{API[name]}", __name__), name)
