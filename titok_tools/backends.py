"""Generation backends: batched transformers generate with the shared formatting (titok-gen's
queries and labels, titok-eval's answers), and titok-gen's HF and vLLM backends over it.

Prompts are rendered by formatting.render_prompt (the same chat template as every stage),
left-padded, and generation stops at EOS or the template's end-of-turn token (Gemma's
<end_of_turn>, not only <eos>), or a model runs on past its answer.
"""
import contextlib
import copy
import hashlib
import inspect
import os

import torch
from transformers import DynamicCache, GenerationConfig

from .errors import TitokError
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


def shared_prompt_cache(model, input_ids, attention):
    """The KV cache of every row's prompt but its last token, with each distinct prompt run
    through the model once; None when the rows are all different.

    titok-gen samples several queries from one prompt of eight exemplars, and on a CPU that
    prompt's forward pass is a large share of writing them (docs/design.md, Generation).
    generate() given this cache only runs the last prompt token. The positions are those
    generate() derives from the attention mask, so the rows continue exactly as without it.
    """
    distinct, keep, owner = {}, [], []  # keep: one row per distinct prompt; owner: each row's index into keep
    for i, row in enumerate(map(tuple, input_ids.tolist())):
        if row not in distinct:
            distinct[row] = len(keep)
            keep.append(i)
        owner.append(distinct[row])
    if len(keep) == len(owner) or input_ids.shape[1] < 2:
        return None
    ids, mask = input_ids[keep, :-1], attention[keep, :-1]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
          **{cache_argument(model): cache})
    cache.reorder_cache(torch.tensor(owner, device=input_ids.device))
    return cache


def cache_argument(model):
    """The name a model's forward (and generate) takes a KV cache by: transformers 5.x renamed
    past_key_values to cache; setup.py admits 4.56 too."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


@torch.inference_mode()
def generate(model, tokenizer, prompts, *, chat_template=True, max_new_tokens=200, temperature=0.0, top_p=1.0,
             batch_size=8, seed=0, max_length=768, stop_strings=None):
    """Complete each prompt (a list of messages); return the completions' texts, in order.

    temperature 0 is greedy; otherwise sampling with temperature and top_p, seeded with `seed`
    per call, so the same call gives the same texts. A row also ends after it writes one of
    `stop_strings` (kept in its text). Identical prompts in a batch share one prompt pass.
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
        stopping = {"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}
        with contiguous_head_input(model), only_these_settings(model):
            cache = shared_prompt_cache(model, input_ids, attention)
            out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                 eos_token_id=stops, pad_token_id=pad, top_k=None, **{cache_argument(model): cache},
                                 **stopping, **sampling)
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return texts


def derive_seed(*parts):
    """A 31-bit seed that depends only on `parts` (never on what ran before in the process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") >> 1


# ---------------------------------------------------------------------------------------------
# Backends: complete a list of prompts (message lists) with one seed per call

class HfBackend:
    """transformers generate via the shared generation.generate (CPU or one GPU)."""

    def __init__(self, model, adapter, dtype, device, trust_remote_code, tokenizer, chat_template, batch_size, max_length,
                 keep_base=False):
        """keep_base: without_adapter() is wanted, so the base stays beside the merged expert (a
        second copy of the weights)."""
        from .models import load_model, merged

        lm = load_model(model, adapter, dtype, device, trust_remote_code, check_logits=False)  # generates only
        # unload() drops the LoRA layers without touching the base weights: exactly the base
        self.base = lm if adapter is None else copy.deepcopy(lm).unload() if keep_base else None
        self.lm = self.expert = merged(lm)
        self.tokenizer, self.chat_template, self.batch_size, self.max_length = tokenizer, chat_template, batch_size, max_length

    @contextlib.contextmanager
    def without_adapter(self):
        """The base model alone inside the block (the model itself when no adapter was loaded)."""
        if self.base is None:
            raise TitokError("internal: without_adapter() needs HfBackend(keep_base=True)")
        self.lm = self.base
        try:
            yield
        finally:
            self.lm = self.expert

    def complete(self, prompts, max_new_tokens, temperature, top_p, seed, plain=False, stop=None):
        """plain: the prompts are documents to continue, rendered without the chat template;
        stop: strings after which a completion ends (kept in its text)."""
        return generate(self.lm, self.tokenizer, prompts, chat_template=self.chat_template and not plain,
                        max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, batch_size=self.batch_size, seed=seed,
                        max_length=self.max_length, stop_strings=stop)


class VllmBackend:
    """vLLM with the adapter as a LoRARequest; prompts are token ids from the shared formatting."""

    def __init__(self, model, adapter, dtype, trust_remote_code, tokenizer, chat_template, max_length,
                 tensor_parallel_size, seed):
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
        except ImportError:
            raise TitokError("--backend vllm needs vLLM: pip install 'titok-tools[vllm]'")
        from .formatting import stop_token_ids
        from .models import adapter_config, resolve

        rank = int(adapter_config(adapter).get("r", 16)) if adapter else 16
        # vLLM accepts only these maximum ranks: take the smallest that fits the adapter.
        max_rank = next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), 512)
        self.llm = LLM(model=resolve(model, trust_remote_code=trust_remote_code), dtype=dtype, seed=seed,
                       trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
                       enable_lora=adapter is not None, max_lora_rank=max_rank)
        self.lora = LoRARequest("expert", 1, os.path.abspath(adapter)) if adapter else None
        self.tokenizer, self.chat_template, self.max_length = tokenizer, chat_template, max_length
        self.stops = stop_token_ids(tokenizer, chat_template)
        self.base_only = False

    @contextlib.contextmanager
    def without_adapter(self):
        self.base_only = True
        try:
            yield
        finally:
            self.base_only = False

    def complete(self, prompts, max_new_tokens, temperature, top_p, seed, plain=False, stop=None):
        from vllm import SamplingParams

        from .formatting import prompt_ids, stop_token_ids

        chat_template = self.chat_template and not plain
        stops = self.stops if chat_template else stop_token_ids(self.tokenizer, False)
        params = [SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0, max_tokens=max_new_tokens,
                                 seed=derive_seed(seed, i), stop_token_ids=stops, skip_special_tokens=True,
                                 stop=stop, include_stop_str_in_output=True)
                  for i in range(len(prompts))]
        inputs = [{"prompt_token_ids": prompt_ids(self.tokenizer, m, chat_template, self.max_length)} for m in prompts]
        outputs = self.llm.generate(inputs, params, lora_request=None if self.base_only else self.lora, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]
