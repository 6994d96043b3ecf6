"""titok-eval: greedy answers of a model (optionally + adapter) to records with a reference completion.

Writes each record with "prediction" added; metrics (exact match after normalization,
ROUGE-1 and ROUGE-L F) go to stderr and to --metrics FILE. Generation is the shared
`generation.generate` (batched, left padding, the same chat template as every stage).

With --choices, a record with "options" also gets each option's log-likelihood as the answer,
lm-evaluation-harness's `multiple_choice` scoring: the option text is the assistant turn,
formatted by `formatting.encode` like every completion, and its log-likelihood is the sum of
log p of the option's own tokens, the token that closes the turn left out (as lm-eval leaves
out EOS: the options are alternatives the prompt lists, not whole turns the model would stop
after). The chosen option is the most likely one (acc), or the most likely per character of
its text (acc_norm); the first one in the list on ties. It is correct when it is one of the
record's references, compared as exact match compares a prediction.
"""
import dataclasses
import json
import logging

import click
import numpy as np
import torch
from tqdm import tqdm

from . import cli
from .answers import exact_match, references
from .formatting import FormatError, check_prompt, encode_many
from .backends import VllmBackend, generate
from .models import decoder_and_head, load_model, load_tokenizer, merged, shared_prompt_logprobs
from .records import (RecordError, check_numbers, checked, in_shard, is_done, prompt_and_completion, read_records,
                      record_writer, text_output, unique_ids)

log = logging.getLogger("titok.eval")



class Metrics:
    """Running means of exact match, ROUGE-1 F and ROUGE-L F (stemmed, as in docs/design.md, Evaluation),
    and with choices=True of the multiple-choice accuracies over the records that have options."""

    def __init__(self, choices=False):
        from rouge_score import rouge_scorer
        self.scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
        self.n = 0
        self.sums = {"exact_match": 0.0, "rouge1": 0.0, "rougeL": 0.0}
        self.choices = choices
        self.choice_n = 0
        self.choice_sums = {"choice_accuracy": 0.0, "choice_accuracy_norm": 0.0}
        self.unreachable = 0  # records none of whose options is a reference: their choice is never right

    def add(self, prediction, references):
        """Score one prediction against its acceptable answers (the best one counts)."""
        scores = [self.scorer.score(reference, prediction) for reference in references]
        self.sums["exact_match"] += float(any(exact_match(prediction, reference) for reference in references))
        self.sums["rouge1"] += max(s["rouge1"].fmeasure for s in scores)
        self.sums["rougeL"] += max(s["rougeL"].fmeasure for s in scores)
        self.n += 1

    def add_choice(self, options, loglikelihoods, references):
        """Count one record's choice among its options; return the chosen (index, index per character)."""
        best, best_norm = choose(options, loglikelihoods)
        for key, i in (("choice_accuracy", best), ("choice_accuracy_norm", best_norm)):
            self.choice_sums[key] += float(any(exact_match(options[i], reference) for reference in references))
        if not any(exact_match(option, reference) for option in options for reference in references):
            self.unreachable += 1
        self.choice_n += 1
        return best, best_norm

    def result(self):
        result = {"records": self.n, **{k: (v / self.n if self.n else None) for k, v in self.sums.items()}}
        if self.choices:
            result["choice_records"] = self.choice_n
            result.update({k: (v / self.choice_n if self.choice_n else None) for k, v in self.choice_sums.items()})
        return result


def choose(options, loglikelihoods):
    """The index of the most likely option and of the most likely per character of its text
    (lm-eval's acc and acc_norm); the first such option on ties."""
    best = max(range(len(options)), key=lambda i: loglikelihoods[i])
    best_norm = max(range(len(options)), key=lambda i: loglikelihoods[i] / len(options[i]))
    return best, best_norm


def options_of(record, where):
    """The record's "options" (the texts of its multiple-choice options), or None when it has none."""
    options = record.get("options")
    if options is None:
        return None
    if not (isinstance(options, list) and options and all(isinstance(o, str) and o.strip() for o in options)):
        raise RecordError(where, "options", "must be a non-empty list of non-empty strings")
    return options


def encode_options(tokenizer, messages, options, chat_template, max_length, where):
    """Each option encoded as the completion of the prompt, its positions only the option's own
    tokens (the closing token dropped; a truncated option has lost it already)."""
    encoded = []
    for i, enc in enumerate(encode_many(tokenizer, [(messages, option) for option in options], chat_template, max_length)):
        if isinstance(enc, FormatError):
            raise RecordError(where, f"options[{i}]", str(enc))
        if enc.positions[0] == 0:
            raise RecordError(where, "prompt", "nothing precedes the options, so their first token cannot be scored")
        if not enc.truncated:
            enc = dataclasses.replace(enc, positions=enc.positions[:-1], offsets=enc.offsets[:-1])
        encoded.append(enc)
    return encoded


@torch.inference_mode()
def option_loglikelihoods(model, tokenizer, encoded, batch_size):
    """Sum of log p of each encoded option's tokens (float64 sums of float32 log-probs), for a
    list of per-record lists of encodings. A record's options share its prompt, which runs once
    for every batch_size of them (shared_prompt_logprobs), so a record's numbers depend on it
    and batch_size alone."""
    body, head = decoder_and_head(model)
    device = next(model.parameters()).device
    sums = []
    for encs in encoded:
        sums.append([float(logp.sum(dtype=np.float64))
                     for start in range(0, len(encs), batch_size)
                     for logp in shared_prompt_logprobs(model, body, head, encs[start:start + batch_size],
                                                        tokenizer.pad_token_id, device)])
    return sums


def evaluate_records(pairs, model, tokenizer, *, chat_template=True, max_new_tokens=200, batch_size=8, max_length=768,
                     metrics=None, skip_invalid=False, counts=None, progress=None, done=None, choices=False, backend=None):
    """Yield the (where, record) pairs' records with "prediction", in order; add to `metrics`.

    The answers come from `model` (transformers generate), or from `backend` (backends.VllmBackend:
    its complete(), greedy) when one is given; choices need the model.

    With choices, a record with "options" also gets "choice", "choice_norm" (the options chosen
    by log-likelihood, and by it per character) and "choice_loglikelihoods" (one per option).

    Records that `done(record)` says a resumed run already wrote are generated with their batch
    (a batch's padding changes bf16 numbers) but neither yielded nor counted again; their options
    are not scored again (each record's are scored on their own)."""
    metrics = metrics if metrics is not None else Metrics(choices)
    window = []

    def flush():
        todo = [not (done and done(record)) for _, record, _ in window]
        predictions = [None] * len(window)
        loglikelihoods = [None] * len(window)
        if any(todo):
            prompts = [messages for _, _, (messages, _, _) in window]
            if backend is not None:
                predictions = backend.complete(prompts, max_new_tokens, 0.0, 1.0, 0)
            else:
                predictions = generate(model, tokenizer, prompts, chat_template=chat_template,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length)
            with_options = [i for i, (_, _, (_, _, encs)) in enumerate(window) if encs and todo[i]]
            if with_options:
                scored = option_loglikelihoods(model, tokenizer, [window[i][2][2] for i in with_options], batch_size)
                for i, lls in zip(with_options, scored):
                    loglikelihoods[i] = lls
        for (_, record, (_, reference, _)), prediction, lls, needed in zip(window, predictions, loglikelihoods, todo):
            if needed:
                metrics.add(prediction, references(record, reference))
                record["prediction"] = prediction
                if lls is not None:
                    add_choice(metrics, record, lls, reference)
                yield record
        if progress is not None:
            progress.update(len(window))
        window.clear()

    def check(where, record):
        messages, completion = prompt_and_completion(record, where)
        check_prompt(tokenizer, messages, chat_template, where, record)  # a template may refuse it (raise_exception)
        options = options_of(record, where) if choices else None
        encs = encode_options(tokenizer, messages, options, chat_template, max_length, where) if options else None
        return messages, completion, encs

    for item in checked(pairs, check, skip_invalid, counts):
        window.append(item)
        if len(window) >= batch_size:
            yield from flush()
    if window:
        yield from flush()


def add_choice(metrics, record, loglikelihoods, completion):
    """Count a record's option log-likelihoods in `metrics` and write its choice fields."""
    options = record["options"]
    best, best_norm = metrics.add_choice(options, loglikelihoods, references(record, completion))
    record["choice"], record["choice_norm"] = options[best], options[best_norm]
    record["choice_loglikelihoods"] = loglikelihoods


def summary(result):
    if not result["records"]:
        return "no records evaluated"
    line = (f"{result['records']} records: exact match {result['exact_match']:.4f}, "
            f"ROUGE-1 {result['rouge1']:.4f}, ROUGE-L {result['rougeL']:.4f}")
    if "choice_records" in result:
        n = result["choice_records"]
        if not n:
            return line + "; none has options to choose among"
        line += (f"; choice accuracy {result['choice_accuracy']:.4f} (per character "
                 f"{result['choice_accuracy_norm']:.4f}) over the {n} records with options")
        if result["records"] > n:
            line += f", {result['records'] - n} without"
    return line


def _selected(pairs, limit, shard):
    """The first `limit` records (all without), then this shard's share of them; stops reading at the limit."""
    for i, pair in enumerate(pairs):
        if limit is not None and i >= limit:
            return
        if in_shard(i, shard):
            yield pair


@click.command()
@cli.input_argument
@cli.model_options
@cli.adapter_option
@cli.tokenizer_options
@click.option("--max-new-tokens", default=200, show_default=True, type=click.IntRange(min=1),
              help="Tokens to generate per answer at most (it also stops at the end of the turn).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Prompts generated together (left padding).")
@click.option("--limit", type=click.IntRange(min=0), help="Evaluate only the first N records of the input.")
@click.option("--metrics", "metrics_file", type=click.Path(dir_okay=False), callback=cli.metrics_file,
              help="Also write the metrics here as JSON (a file: stdout carries the records).")
@click.option("--choices", is_flag=True,
              help='Also score each option of a record with "options" by its log-likelihood as the answer (its '
                   'tokens, not the closing one) and report the accuracy of the most likely option, and of the most '
                   'likely per character (lm-eval\'s acc and acc_norm): choice_accuracy, choice_accuracy_norm, '
                   'choice_records. Adds "choice", "choice_norm" and "choice_loglikelihoods" to those records.')
@cli.backend_options
@cli.output_option
@cli.resume_option
@cli.shard_option
@cli.skip_invalid_option
@cli.command
def main(input, model, dtype, device, trust_remote_code, adapter, chat_template, no_chat_template, max_length,
         max_new_tokens, batch_size, limit, metrics_file, choices, backend, tensor_parallel_size, output, resume, shard,
         skip_invalid):
    """Greedy predictions for records with a prompt and a reference completion, and their scores.

    Writes every record with "prediction" added. Metrics, on stderr and in --metrics FILE,
    against the completion (or the best of a "references" list of acceptable answers):
    exact match after normalization (case, whitespace, surrounding quotes and punctuation;
    "(A)" = "A"), and ROUGE-1 / ROUGE-L F-measures. Without --adapter the vanilla base answers.

    With --choices, records with an "options" list (titok-bigbench's multiple-choice records)
    are also answered by picking the option whose text, as the answer, is the most likely: it
    is right when it is one of the references (compared as exact match compares). Small models
    often know an answer they cannot write in the expected form.

    \b
    Example:
      titok-eval --model google/gemma-3-270m --adapter adapters/target --metrics m.json test.jsonl > predictions.jsonl
    """
    cli.check_resume(output, resume)
    if backend == "vllm" and choices:
        raise click.UsageError("--choices scores the options with the transformers model: use --backend hf")
    tokenizer = load_tokenizer(model, chat_template, trust_remote_code)
    engine, lm = None, None
    if backend == "vllm":
        engine = VllmBackend(model, adapter, dtype, trust_remote_code, tokenizer, not no_chat_template, max_length,
                             tensor_parallel_size, seed=0)
    else:  # without --choices it only generates; --choices projects hidden states to log-probs itself
        lm = merged(load_model(model, adapter, dtype, device, trust_remote_code, check_logits=choices))
    counts, metrics = {}, Metrics(choices)
    with (record_writer(output, resume, keep_partial=True) as writer,
          tqdm(desc="titok-eval", unit="rec", mininterval=1) as progress):
        if resume:  # what an interrupted run predicted counts in the metrics, read back from its file
            writer.flush()
            for where, record in read_records(writer.partial):
                if not isinstance(record.get("prediction"), str):
                    raise RecordError(where, "prediction", "missing: resume only from titok-eval's own output")
                completion = prompt_and_completion(record, where)[1]
                metrics.add(record["prediction"], references(record, completion))
                options = options_of(record, where) if choices else None
                if options:
                    lls = record.get("choice_loglikelihoods")
                    if not (isinstance(lls, list) and len(lls) == len(options)):
                        raise RecordError(where, "choice_loglikelihoods", "missing or not one per option: resume "
                                          "with the --choices setting of the interrupted run")
                    check_numbers(lls, where, "choice_loglikelihoods")
                    add_choice(metrics, record, lls, completion)
        pairs = _selected(unique_ids(read_records(input, skip_invalid, counts)), limit, shard)
        for record in evaluate_records(pairs, lm, tokenizer, chat_template=not no_chat_template,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length,
                                       metrics=metrics, skip_invalid=skip_invalid, counts=counts, progress=progress,
                                       done=lambda r: is_done(writer, r), choices=choices, backend=engine):
            writer.write(record)
            writer.flush()
    result = dict(metrics.result(), model=model, adapter=adapter, invalid=counts.get("invalid", 0))
    if lm is not None:  # what --dtype auto resolved to on this machine (vLLM resolves its own)
        result["dtype"] = str(lm.dtype).removeprefix("torch.")
    log.info("%s%s", summary(result), f", {counts['invalid']} invalid records skipped" if counts.get("invalid") else "")
    if metrics.unreachable:
        log.warning("%d records with options have no reference among them: their choice is never counted right "
                    "(the references must be option texts)", metrics.unreachable)
    if metrics_file:
        with text_output(metrics_file) as f:
            json.dump(result, f, indent=1)
