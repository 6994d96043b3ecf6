"""titok-eval: greedy answers of a model (optionally + adapter) to records with a reference completion.

Writes each record with "prediction" added; metrics (exact match after normalization,
ROUGE-1 and ROUGE-L F) go to stderr and to --metrics FILE. Generation is the shared
`generation.generate` (batched, left padding, the same chat template as every stage).
"""
import json
import logging

import click
from tqdm import tqdm

from . import cli
from .answers import exact_match
from .formatting import check_prompt
from .generation import generate
from .models import load_model, load_tokenizer
from .records import (RecordError, check_resume, checked, is_done, prompt_and_completion, read_records, record_writer,
                      text_output)

log = logging.getLogger("titok.eval")



class Metrics:
    """Running means of exact match, ROUGE-1 F and ROUGE-L F (stemmed, as in docs/design.md, Evaluation)."""

    def __init__(self):
        from rouge_score import rouge_scorer
        self.scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
        self.n = 0
        self.sums = {"exact_match": 0.0, "rouge1": 0.0, "rougeL": 0.0}

    def add(self, prediction, references):
        """Score one prediction against its acceptable answers (the best one counts)."""
        scores = [self.scorer.score(reference, prediction) for reference in references]
        self.sums["exact_match"] += float(any(exact_match(prediction, reference) for reference in references))
        self.sums["rouge1"] += max(s["rouge1"].fmeasure for s in scores)
        self.sums["rougeL"] += max(s["rougeL"].fmeasure for s in scores)
        self.n += 1

    def result(self):
        return {"records": self.n, **{k: (v / self.n if self.n else None) for k, v in self.sums.items()}}


def references(record, completion):
    """The acceptable answers: the record's "references" list when it has one (BIG-bench's
    "three" and "3"), else its completion."""
    extra = record.get("references")
    if isinstance(extra, list) and extra and all(isinstance(r, str) for r in extra):
        return extra
    return [completion]


def evaluate_records(pairs, model, tokenizer, *, chat_template=True, max_new_tokens=200, batch_size=8, max_length=768,
                     metrics=None, skip_invalid=False, counts=None, progress=None, done=None):
    """Yield the (where, record) pairs' records with "prediction", in order; add to `metrics`.

    Records that `done(record)` says a resumed run already wrote are generated with their batch
    (a batch's padding changes bf16 numbers) but neither yielded nor counted again."""
    metrics = metrics if metrics is not None else Metrics()
    window = []

    def flush():
        todo = [not (done and done(record)) for _, record, _ in window]
        predictions = [None] * len(window)
        if any(todo):
            predictions = generate(model, tokenizer, [messages for _, _, (messages, _) in window],
                                   chat_template=chat_template, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   max_length=max_length)
        for (_, record, (_, reference)), prediction, needed in zip(window, predictions, todo):
            if needed:
                metrics.add(prediction, references(record, reference))
                record["prediction"] = prediction
                yield record
        if progress is not None:
            progress.update(len(window))
        window.clear()

    def check(where, record):
        messages, completion = prompt_and_completion(record, where)
        check_prompt(tokenizer, messages, chat_template, where)  # a template may refuse it (raise_exception)
        return messages, completion

    for item in checked(pairs, check, skip_invalid, counts):
        window.append(item)
        if len(window) >= batch_size:
            yield from flush()
    if window:
        yield from flush()


def summary(result):
    if not result["records"]:
        return "no records evaluated"
    return (f"{result['records']} records: exact match {result['exact_match']:.4f}, "
            f"ROUGE-1 {result['rouge1']:.4f}, ROUGE-L {result['rougeL']:.4f}")


def _selected(pairs, limit, shard):
    """The first `limit` records (all without), then this shard's share of them; stops reading at the limit."""
    for i, pair in enumerate(pairs):
        if limit is not None and i >= limit:
            return
        if cli.in_shard(i, shard):
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
@cli.output_option
@cli.resume_option
@cli.shard_option
@cli.skip_invalid_option
@cli.command
def main(input, model, dtype, device, trust_remote_code, adapter, chat_template, no_chat_template, max_length,
         max_new_tokens, batch_size, limit, metrics_file, output, resume, shard, skip_invalid):
    """Greedy predictions for records with a prompt and a reference completion, and their scores.

    Writes every record with "prediction" added. Metrics, on stderr and in --metrics FILE,
    against the completion (or the best of a "references" list of acceptable answers):
    exact match after normalization (case, whitespace, surrounding quotes and punctuation;
    "(A)" = "A"), and ROUGE-1 / ROUGE-L F-measures. Without --adapter the vanilla base answers.

    \b
    Example:
      titok-eval --model google/gemma-3-270m --adapter adapters/target --metrics m.json test.jsonl > predictions.jsonl
    """
    check_resume(output, resume)
    tokenizer = load_tokenizer(model, chat_template, trust_remote_code)
    lm = load_model(model, adapter, dtype, device, trust_remote_code, check_logits=False)  # generates only
    counts, metrics = {}, Metrics()
    with (record_writer(output, resume, keep_partial=True) as writer,
          tqdm(desc="titok-eval", unit="rec", mininterval=1) as progress):
        if resume:  # what an interrupted run predicted counts in the metrics, read back from its file
            writer.flush()
            for where, record in read_records(writer.partial):
                if not isinstance(record.get("prediction"), str):
                    raise RecordError(where, "prediction", "missing: resume only from titok-eval's own output")
                metrics.add(record["prediction"], references(record, prompt_and_completion(record, where)[1]))
        pairs = _selected(read_records(input, skip_invalid, counts), limit, shard)
        for record in evaluate_records(pairs, lm, tokenizer, chat_template=not no_chat_template,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length,
                                       metrics=metrics, skip_invalid=skip_invalid, counts=counts, progress=progress,
                                       done=lambda r: is_done(writer, r)):
            writer.write(record)
            writer.flush()
    result = dict(metrics.result(), model=model, adapter=adapter, invalid=counts.get("invalid", 0))
    log.info("%s%s", summary(result), f", {counts['invalid']} invalid records skipped" if counts.get("invalid") else "")
    if metrics_file:
        with text_output(metrics_file) as f:
            json.dump(result, f, indent=1)
