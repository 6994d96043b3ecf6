"""Batched generation with the shared formatting: used by titok-gen (queries, labels) and titok-eval.

Prompts are rendered by formatting.render_prompt (the same chat template as every stage),
left-padded, and generation stops at EOS or the template's end-of-turn token (Gemma's
<end_of_turn>, not only <eos>), or a model runs on past its answer.
"""
import contextlib

import torch
from transformers import GenerationConfig

from .formatting import prompt_ids, stop_token_ids


@contextlib.contextmanager
def contiguous_head_input(model):
    """Hand the output layer a contiguous input while generating.

    At the first step generate() projects only the last position, a strided slice of the
    hidden states. With frozen weights (a loaded adapter freezes the base) torch.matmul does
    not fold such a slice into one matrix product: it broadcasts the head's weight over the
    batch and copies it, batch x hidden x vocab per prompt batch (1.3 GB at batch 4 for
    Gemma's 262k vocabulary, 10x the whole generation's time on CPU).
    """
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def only_these_settings(model):
    """Generate with the settings generate() is passed here and transformers' defaults, nothing else.

    generate() fills every setting it is not given from the checkpoint's generation_config.json
    (repetition_penalty, min_length, no_repeat_ngram_size...): "greedy" would then not be
    greedy, and the vLLM backend, which does not read that file, would answer differently.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


@torch.inference_mode()
def generate(model, tokenizer, prompts, *, chat_template=True, max_new_tokens=200, temperature=0.0, top_p=1.0,
             batch_size=8, seed=0, max_length=768):
    """Complete each prompt (a list of messages); return the completions' texts, in order.

    temperature 0 is greedy; otherwise sampling with temperature and top_p, seeded with `seed`
    per call, so the same call gives the same texts.
    """
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer, chat_template)
    pad = tokenizer.pad_token_id
    if seed is not None:
        torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    texts = []
    for start in range(0, len(prompts), batch_size):
        batch = [prompt_ids(tokenizer, m, chat_template, max_length) for m in prompts[start:start + batch_size]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        with contiguous_head_input(model), only_these_settings(model):
            out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                 eos_token_id=stops, pad_token_id=pad, top_k=None, **sampling)
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return texts
