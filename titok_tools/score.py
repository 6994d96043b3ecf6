"""titok-score: per-token contrastive excess of an expert (base + LoRA) over its base.

    excess_i = log p_expert(y_i | x, y_<i) - log p_base(y_i | x, y_<i)

Both from ONE model in memory: the expert pass with the adapter on, the base pass under peft's
disable_adapter(). Hidden states are projected to the vocabulary only at completion positions,
and log-softmax runs in float32 chunks, so prompts and big vocabularies cost little.

With --topk N the expert pass also keeps its N most likely tokens at each completion position
(ids and log-probs): the teacher distributions of offline logit distillation, at no extra forward.
"""
import logging
import time

import click
import numpy as np
import orjson
import torch
from tqdm import tqdm

from . import cli
from .errors import TitokError
from .formatting import FormatError, encode, record_error
from .models import (adapter_sha256, completion_logprobs, decoder_and_head, load_model, load_tokenizer,
                     tokenizer_fingerprint)
from .records import (RecordError, checked, dumps, in_shard, prompt_and_completion, read_records, record_writer,
                      titok, unique_ids)

log = logging.getLogger("titok.score")


def _batches(items, batch_tokens):
    """Group (index, encoded) items, sorted by length, into batches whose padded size
    (rows x longest row) stays within batch_tokens (a longer row goes alone)."""
    batch, longest = [], 0
    for item in sorted(items, key=lambda it: len(it[1].input_ids)):
        n = len(item[1].input_ids)
        if batch and max(longest, n) * (len(batch) + 1) > batch_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(item)
        longest = max(longest, n)
    if batch:
        yield batch


@torch.inference_mode()
def score_records(pairs, model, tokenizer, *, chat_template=True, max_length=768, batch_tokens=8192, window=512,
                  scored_by=None, skip_invalid=False, counts=None, progress=None, done=None, topk=None):
    """Score (where, record) pairs; yield (position, record) pairs, the record with titok.source
    added, as their batches finish: position counts the valid records from 0, and
    RecordWriter.write_at puts them back in that order. `scored_by` (model, adapter,
    adapter_sha256, tokenizer: what titok-score loaded) heads every record's titok.source.

    Memory is bounded by `window` records: they are sorted by length inside the window so
    batches carry little padding.

    `done(position, record)` is true for a record a resumed run already wrote: it still takes its
    place in its window and batch (in bfloat16 a batch's shape and padding move the numbers, so
    the rest must be batched as in an uninterrupted run), but a batch of done records only is not
    run, and done records are not yielded again.

    `topk=N` adds the expert's N most likely token ids and their log-probs at each completion
    token (titok.source.topk_ids, topk_logp), from the expert pass itself.
    """
    body, head = decoder_and_head(model)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    counts = {} if counts is None else counts

    def check(where, record):
        messages, completion = prompt_and_completion(record, where)
        if not isinstance(record.get("titok", {}), dict):  # titok.source goes in there
            raise RecordError(where, "titok", "must be an object")
        try:
            enc = encode(tokenizer, messages, completion, chat_template, max_length)
        except FormatError as e:
            raise record_error(where, record, e)
        if enc.positions[0] == 0:
            raise RecordError(where, "prompt", "nothing precedes the completion, so its first token cannot be scored")
        return enc

    def flush(window_items):
        encs = [enc for _, _, _, enc, _ in window_items]
        for batch in _batches(list(enumerate(encs)), batch_tokens):
            index = [i for i, _ in batch]
            todo = sum(not window_items[i][4] for i in index)
            if not todo:
                continue
            batch_encs = [e for _, e in batch]
            expert = completion_logprobs(model, body, head, batch_encs, pad_id, device, topk=topk)
            expert, top_ids, top_logp = expert if topk else (expert, None, None)
            with model.disable_adapter():
                base = completion_logprobs(model, body, head, batch_encs, pad_id, device)
            if progress is not None:
                counts["seen_tokens"] = counts.get("seen_tokens", 0) + sum(len(e.input_ids) for e in batch_encs)
                progress.update(todo)
                progress.set_postfix_str(f"{counts['seen_tokens'] / progress.format_dict['elapsed']:.0f} tok/s",
                                         refresh=False)
            for j, (i, lp_e, lp_b) in enumerate(zip(index, expert, base)):
                position, where, record, enc, was_done = window_items[i]
                window_items[i] = None  # the writer holds it from here
                if was_done:
                    continue
                excess = lp_e - lp_b
                titok(record)["source"] = dict(scored_by or {}, token_ids=enc.token_ids, offsets=enc.offsets,
                                               logp_expert=lp_e, logp_base=lp_b, excess=excess,
                                               mean_excess=float(excess.mean(dtype=np.float64)),
                                               truncated=enc.truncated)
                if topk:
                    add_topk(titok(record)["source"], top_ids[j], top_logp[j], counts)
                counts["records"] = counts.get("records", 0) + 1
                counts["tokens"] = counts.get("tokens", 0) + len(excess)
                counts["sum_excess"] = counts.get("sum_excess", 0.0) + float(excess.sum(dtype=np.float64))
                counts["sum_abs_excess"] = (counts.get("sum_abs_excess", 0.0)
                                            + float(np.abs(excess).sum(dtype=np.float64)))
                counts["negative"] = counts.get("negative", 0) + int((excess < 0).sum())
                counts["truncated"] = counts.get("truncated", 0) + int(enc.truncated)
                yield position, record

    window_items = []
    for position, (where, record, enc) in enumerate(checked(pairs, check, skip_invalid, counts)):
        window_items.append((position, where, record, enc, done is not None and done(position, record)))
        if len(window_items) >= window:
            yield from flush(window_items)
            window_items = []
    if window_items:
        yield from flush(window_items)


def add_topk(part, top_ids, top_logp, counts):
    """Store one record's top-N lists in its titok.source and count their JSON bytes (the two
    values as written, without their keys) for the summary's bytes per token."""
    part["topk_ids"], part["topk_logp"] = top_ids, top_logp
    # Stored as float32 (orjson writes the shortest text that reads back as the same float32),
    # not rounded to 4 decimals: rounding saved only 17% of the top-N bytes (SmolLM2, N = 20: 301
    # bytes/token, 88 of them ids; a rounded log-prob still takes ~8 characters) and 12% on a tiny
    # random model, not the half that would pay for losing the exact match with logp_expert
    # (the same float32 number where the actual token is among the N).
    counts["topk_bytes"] = counts.get("topk_bytes", 0) + json_size(top_ids) + json_size(top_logp)


def json_size(array):
    return len(orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY))


def summary(counts):
    n, tokens = counts.get("records", 0), counts.get("tokens", 0)
    line = f"scored {n} records, {tokens} completion tokens"
    if tokens:
        line += (f", mean excess {counts['sum_excess'] / tokens:+.4f}, "
                 f"{counts['negative'] / tokens:.1%} of tokens negative")
    if tokens and "topk_bytes" in counts:
        line += (f", {counts['written_bytes'] / tokens:.0f} bytes/token written "
                 f"({counts['topk_bytes'] / tokens:.0f} of them the top-N lists)")
    return line + cli.counted_suffix(counts)


def check_topk(topk, model):
    vocab = decoder_and_head(model)[1].weight.shape[0]
    if topk is not None and topk > vocab:
        raise click.BadParameter(f"{topk} is more than the model's {vocab} tokens", param_hint="--topk")


def check_resumed(first, scored_by, topk, output):
    """A resumed file must go on as it began: the same adapter, and --topk with the same N or
    not at all (mixed records would train some tokens with distributions and some without)."""
    part = first.get("titok") if isinstance(first, dict) else None
    source = part.get("source") if isinstance(part, dict) else None
    if not isinstance(source, dict):
        return
    if source.get("adapter_sha256") not in (None, scored_by["adapter_sha256"]):
        raise TitokError(f"{output}: its records were scored with another adapter ({source.get('adapter')}): "
                         f"resume with that one, or start a new file")
    ids = source.get("topk_ids")
    written = len(ids[0]) if isinstance(ids, list) and ids and isinstance(ids[0], list) else None
    if (written or None) != (topk or None):
        was = f"--topk {written}" if written else "without --topk"
        raise TitokError(f"{output}: its records were scored {was}: resume the same way, or start a new file")


@click.command()
@cli.input_argument
@cli.model_options
@cli.adapter_option
@cli.tokenizer_options
@click.option("--batch-tokens", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Token budget of a batch (rows x longest row, padding included).")
@click.option("--window", default=512, show_default=True, type=click.IntRange(min=1),
              help="Records read ahead and sorted by length to cut padding; bounds memory.")
@click.option("--topk", type=click.IntRange(min=1), default=None, metavar="N",
              help="Also store the expert's N most likely tokens where it predicts each completion token, for offline "
                   "logit distillation (titok-train --kd-weight): titok.source.topk_ids and topk_logp (full-vocabulary "
                   "float32 log-probs at temperature 1, descending), from the expert pass itself (no extra "
                   "forward). Costs about 15 bytes per completion token per unit of N (N = 20: ~300 bytes/token with "
                   "SmolLM2); the summary reports the bytes per token written (JSON lines / completion tokens) and "
                   "the share of the top-N lists. Off by default.")
@cli.output_option
@cli.resume_option
@cli.shard_option
@cli.skip_invalid_option
@cli.command
def main(input, model, dtype, device, trust_remote_code, adapter, chat_template, no_chat_template, max_length,
         batch_tokens, window, topk, output, resume, shard, skip_invalid):
    """Add per-token contrastive excess to prompt/completion records.

    For every completion token, log p under the expert (--model + --adapter) and under the
    base (--model alone, the same weights with the adapter switched off), and their
    difference `excess`. Adds record["titok"]["source"]; every other field passes through.

    \b
    Example:
      titok-score --model HuggingFaceTB/SmolLM2-135M-Instruct --adapter lora/ data.jsonl \\
        | titok-filter -k 0.3 > kept.jsonl
    """
    if adapter is None:
        raise click.UsageError("--adapter is required: excess compares the expert (base + adapter) with the base")
    cli.check_resume(output, resume)
    tokenizer = load_tokenizer(model, chat_template, trust_remote_code)
    lm = load_model(model, adapter, dtype, device, trust_remote_code)
    check_topk(topk, lm)
    scored_by = {"model": model, "adapter": adapter, "adapter_sha256": adapter_sha256(adapter),
              "tokenizer": tokenizer_fingerprint(tokenizer)}
    counts = {}
    started = time.time()
    with (record_writer(output, resume, keep_partial=True) as writer,
          tqdm(desc="titok-score", unit="rec", mininterval=1) as progress):
        check_resumed(writer.first_done, scored_by, topk, output)
        pairs = ((w, r) for i, (w, r) in enumerate(unique_ids(read_records(input, skip_invalid, counts)))
                 if in_shard(i, shard))
        for position, record in score_records(pairs, lm, tokenizer, chat_template=not no_chat_template, max_length=max_length,
                                    batch_tokens=batch_tokens, window=window, scored_by=scored_by,
                                    skip_invalid=skip_invalid, counts=counts, progress=progress,
                                    done=writer.done_at, topk=topk):
            line = dumps(record)
            counts["written_bytes"] = counts.get("written_bytes", 0) + len(line)
            writer.write_at(position, line)
            writer.flush()  # a batch's records are on disk before the next batch runs
    elapsed = time.time() - started
    log.info("%s, %.0f tokens/s", summary(counts), counts.get("tokens", 0) / max(elapsed, 1e-9))
    if counts.get("tokens") and counts["sum_abs_excess"] / counts["tokens"] < 1e-3:
        log.warning("mean |excess| is %.2g: the adapter barely changes these tokens (is it trained, and for this task?)",
                    counts["sum_abs_excess"] / counts["tokens"])
