"""titok-tools: move a LoRA adapter between LLM backbones through token-level knowledge (TiTok)."""
__version__ = "0.1.0"
