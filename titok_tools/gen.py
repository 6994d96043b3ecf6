"""titok-gen: synthetic task data from the source expert (docs/design.md, Generation).

Two modes:

    titok-gen --model BASE --adapter LORA --seed-examples train.jsonl --num 500 > synthetic.jsonl
    titok-gen --model BASE --adapter LORA --label prompts.jsonl > labeled.jsonl

Query synthesis runs in rounds. Round r asks the expert --batch-size times for one new query,
each time with --shots exemplars drawn afresh from the seed examples and rendered through a
template file (data/templates/query-*.txt: settings, then a str.format prompt). Replies are
parsed by the template's rules, de-duplicated by ROUGE-L F against the seed examples and every
kept query, and the round's new queries are answered by the expert (greedy) with the query as
the user turn, the same formatting training uses.

All randomness of round r is a function of (--seed, r): the exemplars of every call, the
sampling seed of the round's generate calls. The state a round depends on (the kept queries) is
exactly what the output file holds, so `--resume` rebuilds it from the file and replays the
last round it finds, skipping the records already written: the result equals an uninterrupted
run's.
"""
import contextlib
import logging
import math
import random
from dataclasses import dataclass

import click
from tqdm import tqdm

from . import cli
from .backends import HfBackend, VllmBackend, derive_seed
from .dedup import RougeDedup
from .errors import TitokError
from .formatting import check_prompt
from .queries import load_seeds, load_template, query_budget
from .query_shape import QueryShape
from .records import checked, in_shard, is_done, prompt_messages, read_records, record_writer, unique_ids

log = logging.getLogger("titok.gen")

# ---------------------------------------------------------------------------------------------
# Query synthesis and labelling

# docs/design.md, Generation: 8 exemplars lifted a 135M writer's on-format rate from 49-98% to 87-100%
# on three BBH tasks' train seeds (bench/bench_queries.py); the paper does not publish its number.
DEFAULT_SHOTS = 8


@dataclass
class GenSettings:
    num: int
    shots: int = None  # None: DEFAULT_SHOTS, or every seed example when there are fewer
    batch_size: int = 8
    max_rounds: int = None
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = None  # None: queries.query_budget of the seeds
    label_temperature: float = 0.0
    label_max_new_tokens: int = 200
    rouge_threshold: float = 0.7
    dedup: bool = True
    seed: int = 0
    queries_from: str = "expert"
    shape_check: bool = True
    queries_per_prompt: int = 1

    def rounds(self):
        # Default cap: 20 times the rounds --num needs if every reply were kept.
        return self.max_rounds if self.max_rounds is not None else 20 * math.ceil(self.num / self.batch_size) + 10


def record_id(seed, index):
    return f"gen-{seed}-{index}"


def label_prompt(seeds, query):
    return seeds.system + [{"role": "user", "content": query}]


def generate_records(backend, tokenizer, template, seeds, settings, meta, existing=(), counts=None, progress=None):
    """Yield synthetic records until settings.num are kept or the round cap is reached.

    `existing` are the records an interrupted run wrote (in order): the rounds before the last
    one they reach rebuild the dedup pool, and that last round is replayed without yielding
    the records already written.
    """
    counts = {} if counts is None else counts
    budget = settings.max_new_tokens or query_budget(seeds.texts, tokenizer)
    shots = settings.shots or min(DEFAULT_SHOTS, len(seeds.texts))
    log.info("query replies: up to %d new tokens%s", budget, "" if settings.max_new_tokens else " (auto: the longest seed and a quarter, + 16)")
    for key in ("format", "duplicate", "empty_label", "kept", "parsed", "on_format"):
        counts.setdefault(key, 0)
    template = template.for_seeds(seeds.texts)
    shape = QueryShape.from_seeds(seeds.texts)
    pool = RougeDedup(settings.rouge_threshold) if settings.dedup else None
    if pool is not None:
        for text in seeds.texts:
            pool.add(template.dedup_key(text))
    existing = list(existing)
    for record in existing:
        if not isinstance(record.get("titok_gen"), dict) or not isinstance(record["titok_gen"].get("round"), int):
            raise TitokError(f"--resume: record {record.get('id')!r} of the output has no titok_gen.round "
                                       f"(was the file written by titok-gen?)")
        if record["titok_gen"].get("seed") != settings.seed:
            raise TitokError(f"--resume: the output was written with --seed {record.get('titok_gen', {}).get('seed')}, "
                                       f"not {settings.seed}")
    start_round = max((r["titok_gen"]["round"] for r in existing), default=0)
    earlier = [r for r in existing if r["titok_gen"]["round"] < start_round]
    if pool is not None:
        for record in earlier:
            pool.add(template.dedup_key(_query_of(record)))
    already = {r["id"]: _query_of(r) for r in existing}
    kept = len(earlier)
    counts["kept"] = len(existing)

    for round_ in range(start_round, settings.rounds()):
        if kept >= settings.num:
            return
        # One exemplar draw per --queries-per-prompt slots: those slots sample from the same prompt.
        draws = [random.Random(derive_seed(settings.seed, "shots", round_, group)).sample(range(len(seeds.texts)), shots)
                 for group in range(math.ceil(settings.batch_size / settings.queries_per_prompt))]
        picks = [draws[slot // settings.queries_per_prompt] for slot in range(settings.batch_size)]
        prompts = [[{"role": "user", "content": template.prompt(seeds.task_description, [seeds.texts[i] for i in pick])}]
                   for pick in picks]
        # The paper writes queries with the expert; a small expert tuned on short answers may
        # answer the query prompt instead of writing a query: --queries-from base avoids that.
        with backend.without_adapter() if settings.queries_from == "base" else contextlib.nullcontext():
            replies = backend.complete(prompts, budget, settings.temperature, settings.top_p,
                                       derive_seed(settings.seed, "queries", round_), plain=template.turn == "none",
                                       stop=template.stop_strings())
        new = []
        for pick, reply in zip(picks, replies):
            whole = len(tokenizer(reply, add_special_tokens=False)["input_ids"]) >= budget - 3
            query, why = template.parse(reply, used_whole_budget=whole)
            if query is None:
                counts["format"] += 1
                log.debug("reply rejected (%s): %r", why, reply[:200])
                continue
            counts["parsed"] += 1
            if shape.fits(query):
                counts["on_format"] += 1
            elif settings.shape_check:
                counts["format"] += 1
                log.debug("query rejected (not the seeds' shape: %s): %r", shape.describe(), query[:200])
                continue
            key = template.dedup_key(query) if pool is not None else None
            if pool is not None and pool.best(key)[1] is not None:  # the seed examples and earlier rounds' queries
                counts["duplicate"] += 1
                continue
            new.append((pick, query, key))
        if not new:
            continue
        labels = backend.complete([label_prompt(seeds, q) for _, q, _ in new], settings.label_max_new_tokens,
                                  settings.label_temperature, settings.top_p, derive_seed(settings.seed, "labels", round_))
        # Within the round, a query is compared with the round's queries kept before it: after
        # labelling, so that one dropped for an empty label rules nothing out.
        fresh = RougeDedup(settings.rouge_threshold) if pool is not None else None
        for (pick, query, key), label in zip(new, labels):
            if not label.strip():
                counts["empty_label"] += 1  # titok-score cannot use an empty completion
                continue
            if fresh is not None and fresh.best(key)[1] is not None:
                counts["duplicate"] += 1
                continue
            if kept >= settings.num:
                return
            prompt = label_prompt(seeds, query) if seeds.system else query
            record = {"id": record_id(settings.seed, kept), "prompt": prompt, "completion": label,
                      "titok_gen": dict(meta, shots=[seeds.ids[i] for i in pick], seed=settings.seed, round=round_)}
            kept += 1
            if pool is not None:
                pool.add(key)
                fresh.add(key)
            if record["id"] in already:
                if already[record["id"]] != query:
                    log.warning("--resume: record %s replays differently (%r, was %r): was the run's hardware or "
                                "settings changed?", record["id"], query[:80], already[record["id"]][:80])
                continue
            counts["kept"] += 1
            if progress is not None:
                progress.update(1)
            yield record
    if kept < settings.num:
        log.warning("stopped after --max-rounds %d with %d of %d queries: raise --max-rounds and --resume",
                    settings.rounds(), kept, settings.num)


def _query_of(record):
    prompt = record["prompt"]
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def label_records(pairs, backend, settings, meta, counts=None, progress=None, done=None, skip_invalid=False):
    """Answer each (where, record)'s prompt with the expert; yield the records with
    "completion" and "titok_gen" set, in input order. A record without a prompt the chat
    template accepts stops the run with a one-line error, or is skipped and counted in
    counts["invalid"] with skip_invalid.

    Prompts are answered in blocks of settings.batch_size consecutive records, one seed per
    block. A label depends on its whole block (the block's padding changes bf16 numbers, and
    sampling draws for the block at once), so records that `done(record)` says a resumed run
    already wrote are still generated with their block, only not yielded again: a resumed run
    gives the records an uninterrupted one would.
    """
    counts = {} if counts is None else counts
    counts.setdefault("labelled", 0)
    counts.setdefault("empty_label", 0)

    def answer(block):
        todo = [not (done and done(record)) for record, _ in block]
        labels = [None] * len(block)
        if any(todo):
            labels = backend.complete([m for _, m in block], settings.label_max_new_tokens, settings.label_temperature,
                                      settings.top_p, derive_seed(settings.seed, "labels", block[0][0]["id"]))
        for (record, messages), label, needed in zip(block, labels, todo):
            if not needed:
                continue
            if not label.strip():
                counts["empty_label"] += 1
                continue
            if "messages" in record:
                record.pop("messages")
                record["prompt"] = messages
            record["completion"] = label
            record["titok_gen"] = dict(meta, shots=[], seed=settings.seed)
            counts["labelled"] += 1
            yield record
        if progress is not None:
            progress.update(len(block))

    def check(where, record):
        messages = prompt_messages(record, where)
        check_prompt(backend.tokenizer, messages, backend.chat_template, where, record)
        return messages

    block = []
    for _, record, messages in checked(pairs, check, skip_invalid, counts):
        block.append((record, messages))
        if len(block) >= settings.batch_size:
            yield from answer(block)
            block = []
    if block:
        yield from answer(block)


# ---------------------------------------------------------------------------------------------
# Command line

@click.command()
@cli.model_options
@cli.adapter_option
@cli.tokenizer_options
@click.option("--seed-examples", type=click.Path(dir_okay=False),
              help="Task records (JSONL) whose prompts are the few-shot exemplars: makes new queries.")
@click.option("--label", "label_file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Prompts (JSONL, '-' = stdin) to answer with the expert instead of making new queries.")
@click.option("--num", type=click.IntRange(min=1), help="Unique queries to make (the caller asks for 2M for a pool of 2M).")
@click.option("--task-description", help="Task text for the query prompt [default: the seed records' task_description, "
                                         "else their shared system message, else a generic line].")
@click.option("--shots", type=click.IntRange(min=1), help="Exemplars per query prompt, re-drawn per call [default: 8, or "
                                                            "every seed example when there are fewer]. A prompt longer "
                                                            "than --max-length loses its first exemplars.")
@click.option("--template", default="continuation", show_default=True,
              help="Query template: a file, or the name of a bundled one in data/templates/query-NAME.txt: continuation "
                   "(the seed examples as a document the model continues with one more), default (a chat turn that asks "
                   "for a new input), multiple-choice (the same, for a question with an Options: block).")
@click.option("--temperature", default=1.0, show_default=True, type=cli.Finite(min=0), help="Sampling temperature of queries.")
@click.option("--top-p", default=0.9, show_default=True, type=cli.Finite(0, 1, min_open=True), help="Nucleus sampling of queries (and of labels when sampled).")
@click.option("--max-new-tokens", default="auto", show_default=True, callback=cli.int_or_auto, metavar="INT|auto",
              help="Token budget of a query reply. auto: the longest seed query's tokens and a quarter more, + 16 (a "
                   "query cut off by the budget is rejected, so it must fit the task's longest inputs).")
@click.option("--label-temperature", default=0.0, show_default=True, type=cli.Finite(min=0), help="0 = greedy labels.")
@click.option("--label-max-new-tokens", default=200, show_default=True, type=click.IntRange(min=1), help="Token budget of a label.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Prompts per generate call; a round of query synthesis is one batch, and --label answers blocks of this "
                   "many consecutive prompts (with --shard, of the shard's prompts).")
@click.option("--queries-per-prompt", default=1, show_default=True, type=click.IntRange(min=1),
              help="Queries sampled from each exemplar draw: this many slots of a round share one prompt, whose "
                   "forward pass the hf backend then runs once (vLLM caches it itself). 1: every query prompt has its "
                   "own exemplars.")
@click.option("--rouge-threshold", default=0.7, show_default=True, type=cli.Finite(0, 1, min_open=True),
              help="Reject a query whose ROUGE-L F with a seed example or a kept query is at least this.")
@click.option("--no-dedup", is_flag=True, help="Keep near-duplicate queries (the paper does for history tasks).")
@click.option("--max-rounds", type=click.IntRange(min=1), help="Stop after this many rounds even if fewer than --num "
                                                                "queries were kept [default: 20 x ceil(num / batch-size) + 10].")
@click.option("--queries-from", type=click.Choice(["expert", "base"]), default="expert", show_default=True,
              help="Who writes the queries: the expert (the paper), or its base model with the adapter switched off "
                   "(for an expert so specialized that it answers the query prompt). Labels always come from the expert.")
@click.option("--shape-check/--no-shape-check", default=True, show_default=True,
              help="Reject a query without the shape of the seed examples (counted as format): an Options: block when "
                   "they are multiple choice, else the wording 90%% of them share; a length within half the shortest "
                   "to twice the longest; and, where the seeds' words are a closed set (no word pair, or word, in "
                   "one seed only), only their pairs (or words). The summary reports the share of read queries that "
                   "had it either way.")
@cli.backend_options
@cli.output_option
@cli.resume_option
@cli.seed_option
@cli.shard_option
@cli.skip_invalid_option
@cli.command
def main(model, dtype, device, trust_remote_code, adapter, chat_template, no_chat_template, max_length, seed_examples,
         label_file, num, task_description, shots, template, temperature, top_p, max_new_tokens, label_temperature,
         label_max_new_tokens, batch_size, queries_per_prompt, rouge_threshold, no_dedup, max_rounds, queries_from,
         shape_check, backend, tensor_parallel_size, output,
         resume, seed, shard, skip_invalid):
    """Make task data with the source expert (--model + --adapter): new queries from a few
    real examples and the expert's answers, or answers to given prompts (--label).

    Query synthesis: each query prompt shows --shots exemplar prompts from --seed-examples
    (re-drawn per call) through --template; replies are parsed by the template's rules and
    kept if their ROUGE-L F (rouge-score, stemming) with every seed example and kept query is
    below --rouge-threshold; each kept query is answered greedily, as a user turn. Output:
    {"id", "prompt", "completion", "titok_gen": {"model", "adapter", "shots", "seed", "round"}}.

    A run is a function of its options and --seed: `-o FILE --resume` (with the same options)
    continues an interrupted run and gives the records an uninterrupted one would.

    \b
    Examples:
      titok-gen --model BASE --adapter LORA --seed-examples train.jsonl --num 500 -o synthetic.jsonl
      titok-gen --model BASE --adapter LORA --label prompts.jsonl > labeled.jsonl
    """
    from .models import load_tokenizer, resolve_device, resolve_dtype

    if (seed_examples is None) == (label_file is None):
        raise click.UsageError("give exactly one of --seed-examples FILE (make queries) and --label FILE (answer prompts)")
    if seed_examples is not None and num is None:
        raise click.UsageError("--seed-examples needs --num")
    if label_file is not None and num is not None:
        raise click.UsageError("--num goes with --seed-examples; --label answers every prompt of its file")
    if shard is not None and label_file is None:
        raise click.UsageError("--shard splits --label work; query synthesis is sequential (dedup sees every query)")
    if queries_per_prompt != 1 and label_file is not None:
        raise click.UsageError("--queries-per-prompt goes with --seed-examples; --label answers each prompt once")
    if skip_invalid and label_file is None:
        raise click.UsageError("--skip-invalid goes with --label; seed examples must all be valid")
    cli.check_resume(output, resume)
    settings = GenSettings(num=num or 0, shots=shots, batch_size=batch_size, max_rounds=max_rounds, temperature=temperature,
                           top_p=top_p, max_new_tokens=max_new_tokens, label_temperature=label_temperature,
                           label_max_new_tokens=label_max_new_tokens, rouge_threshold=rouge_threshold, dedup=not no_dedup,
                           seed=seed, queries_from=queries_from, shape_check=shape_check,
                           queries_per_prompt=queries_per_prompt)
    tokenizer = load_tokenizer(model, chat_template, trust_remote_code)
    if seed_examples is not None:
        query_template = load_template(template)
        seeds = load_seeds(seed_examples, shots, task_description, tokenizer)
    if adapter is None:
        log.warning("no --adapter: the base model writes the data, not an expert")
    use_template = not no_chat_template
    if backend == "vllm":
        vllm_dtype = "auto" if dtype == "auto" else dtype
        engine = VllmBackend(model, adapter, vllm_dtype, trust_remote_code, tokenizer, use_template, max_length,
                             tensor_parallel_size, seed)
    else:
        engine = HfBackend(model, adapter, dtype, device, trust_remote_code, tokenizer, use_template, batch_size, max_length,
                           keep_base=queries_from == "base" and label_file is None)
        log.info("hf backend on %s in %s", resolve_device(device), str(resolve_dtype(dtype, resolve_device(device))).split(".")[-1])
    meta = {"model": model, "adapter": adapter}
    if queries_from != "expert":
        meta["queries_from"] = queries_from
    counts = {}
    with record_writer(output, resume, keep_partial=True) as writer:
        if label_file is not None:
            with tqdm(desc="titok-gen label", unit="rec", mininterval=1) as progress:
                pairs = ((w, r) for i, (w, r) in enumerate(unique_ids(read_records(label_file, skip_invalid, counts)))
                         if in_shard(i, shard))
                for record in label_records(pairs, engine, settings, meta, counts, progress,
                                            done=lambda r: is_done(writer, r), skip_invalid=skip_invalid):
                    writer.write(record)
                    writer.flush()  # a killed job (a Slurm time limit) keeps every label it finished
            log.info("labelled %d prompts%s%s", counts["labelled"],
                     f", {counts['empty_label']} empty answers dropped" if counts["empty_label"] else "",
                     cli.counted_suffix(counts))
            return
        existing = []
        if resume and output != "-":
            writer.flush()
            existing = [r for _, r in read_records(writer.partial)]
        with tqdm(desc="titok-gen", unit="query", total=num, initial=len(existing), mininterval=1) as progress:
            for record in generate_records(engine, tokenizer, query_template, seeds, settings, meta, existing,
                                           counts, progress):
                writer.write(record)
                writer.flush()
    log.info("kept %d queries; on-format %s of the %d read (%s); rejected %d (format), %d (duplicate), %d (empty label)",
             counts["kept"], f"{counts['on_format'] / counts['parsed']:.0%}" if counts["parsed"] else "-", counts["parsed"],
             QueryShape.from_seeds(seeds.texts).describe(), counts["format"], counts["duplicate"], counts["empty_label"])
