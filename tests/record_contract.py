"""The record contract (README, "Record format"; docs/design.md, Records) as a checker for tests.

problems(record) lists every way one record breaks the contract, file_problems(path) does so for a
JSON lines file ("path:line: problem"). It checks the structure and the relations between fields
(keys, lengths, spans inside the completion and in order, 0/1 masks that pick the top tokens,
excess = logp_expert - logp_base, mean_excess, coverage, null scores where no source token
overlaps, top-N lists of distinct ids with descending log-probs that agree with logp_expert and
sit only on target tokens aligned one to one), not whether the numbers are right: the stages' own tests compare those with
independent references. It is written apart from the package on purpose, a second reading of
the contract, so it imports nothing from titok_tools.

    python tests/record_contract.py FILE.jsonl [...]   prints the problems, exits 1 if any
"""
import json
import math
import re
import sys

SOURCE_KEYS = ("model", "adapter", "adapter_sha256", "tokenizer", "token_ids", "offsets", "logp_expert", "logp_base",
               "excess", "mean_excess", "truncated")
FILTER_KEYS = ("k", "keep", "scope", "rank", "kept")
FILTER_EXTRAS = ("k_auto", "rank_by", "seed")  # titok-filter -k auto, --rank-by answer-excess|confidence|random --seed
TARGET_KEYS = ("model", "tokenizer", "token_ids", "offsets", "score", "coverage", "truncated", "mask")
SOURCE_TOPK = ("topk_ids", "topk_logp")  # titok-score --topk N
TARGET_TOPK = ("topk_ids", "topk_logp", "topk_coverage")  # titok-align, from the source's
SCOPES = ("sample", "batch", "global")
SHA256 = re.compile(r"[0-9a-f]{64}")
# Stored numbers may be rounded (the README's example keeps four decimals): relations between them
# must hold to 1e-4 of the largest magnitude involved, far less than a wrong formula is off by.
TOLERANCE = 1e-4


def problems(record):
    """Every way `record` (a parsed JSON value) breaks the contract, as one-line strings naming
    the field; [] for a good record."""
    if not isinstance(record, dict):
        return ["a record must be a JSON object"]
    found = []
    completion = completion_of(record, found)
    titok = record.get("titok")
    if titok is None:
        return found
    if not isinstance(titok, dict):
        return found + ["titok: must be an object"]
    unknown = sorted(set(titok) - {"source", "filter", "target"})
    if unknown:
        found.append(f"titok: has parts outside the contract (source, filter, target): {quoted(unknown)}")
    parts = {}
    for name in ("source", "filter", "target"):
        if name in titok:
            if isinstance(titok[name], dict):
                parts[name] = titok[name]
            else:
                found.append(f"titok.{name}: must be an object")
    if completion is None:
        return found  # spans cannot be checked without the completion they point into
    source, settings, target = parts.get("source"), parts.get("filter"), parts.get("target")
    if source is not None:
        source_problems(source, completion, found)
    if settings is not None:
        filter_problems(settings, source, completion, found)
    elif source is not None and "mask" in source:
        found.append("titok.source.mask: present without titok.filter (titok-filter adds both)")
    if target is not None:
        target_problems(target, completion, source, settings, found)
    return found


def completion_of(record, found):
    """The completion string ("completion", or the last message of "messages"), or None after
    noting why there is none."""
    if "completion" in record:
        if not isinstance(record["completion"], str):
            found.append("completion: must be a string")
            return None
        if "prompt" not in record:
            found.append("prompt: missing")
        elif not (isinstance(record["prompt"], str) or is_messages(record["prompt"])):
            found.append("prompt: must be a string or a list of {role, content} messages")
        return record["completion"]
    if "messages" in record:
        messages = record["messages"]
        if not is_messages(messages):
            found.append("messages: must be a list of {role, content} messages")
        elif len(messages) < 2 or messages[-1]["role"] != "assistant":
            found.append("messages: the last message must be the assistant's completion, after a prompt")
        else:
            return messages[-1]["content"]
        return None
    found.append("completion: missing (need prompt + completion, or messages)")
    return None


def is_messages(value):
    return isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                           and isinstance(m.get("content"), str) for m in value)


# --- the parts -------------------------------------------------------------------------------

def source_problems(source, completion, found):
    keys_problems("titok.source", source, SOURCE_KEYS, ("mask",) + SOURCE_TOPK, found)
    text_field(source, "titok.source", "model", found)
    text_field(source, "titok.source", "adapter", found)
    if "adapter_sha256" in source and not (isinstance(source["adapter_sha256"], str)
                                           and SHA256.fullmatch(source["adapter_sha256"])):
        found.append("titok.source.adapter_sha256: must be 64 lowercase hex digits")
    fingerprint_field(source, "titok.source", found)
    truncated = flag_field(source, "titok.source", "truncated", found)
    n = token_ids_problems(source, "titok.source", found)
    spans = spans_problems(source.get("offsets"), completion, truncated, "titok.source.offsets", found)
    lists = {}
    for key in ("logp_expert", "logp_base", "excess"):
        lists[key] = numbers_field(source, "titok.source", key, n, found)
    for key in ("logp_expert", "logp_base"):
        if lists[key] is not None and any(v > 0 for v in lists[key]):
            found.append(f"titok.source.{key}: holds a value above 0, not a log-probability")
    if spans is not None and n is not None and len(spans) != n:
        found.append(f"titok.source.offsets: {len(spans)} spans for {n} tokens")
    expert, base, excess = lists["logp_expert"], lists["logp_base"], lists["excess"]
    if excess is not None and expert is not None and base is not None and len(excess) == len(expert) == len(base):
        bad = [i for i, (x, e, b) in enumerate(zip(excess, expert, base)) if not close(x, e - b, e, b)]
        if bad:
            found.append(f"titok.source.excess: is not logp_expert - logp_base at token {bad[0]} "
                         f"({excess[bad[0]]} vs {expert[bad[0]] - base[bad[0]]})")
    if "mean_excess" in source:
        mean = source["mean_excess"]
        if not is_number(mean):
            found.append("titok.source.mean_excess: must be a finite number")
        elif excess:
            actual = math.fsum(excess) / len(excess)
            if not close(mean, actual, *excess):
                found.append(f"titok.source.mean_excess: {mean} is not the mean of excess ({actual:.6g})")
    if "mask" in source:
        mask_field(source, "titok.source", n, found)
    source_topk_problems(source, n, expert, found)


def filter_problems(settings, source, completion, found):
    keys_problems("titok.filter", settings, FILTER_KEYS, FILTER_EXTRAS, found)
    if source is None:
        found.append("titok.filter: present without titok.source (titok-filter reads the source's excess)")
    k, keep, rank, kept = (settings.get(key) for key in ("k", "keep", "rank", "kept"))
    k_ok = is_number(k) and 0 < k <= 1
    if "k" in settings and not k_ok:
        found.append(f"titok.filter.k: must be a number in (0, 1], not {json.dumps(k)}")
    if "keep" in settings and not (is_integer(keep) and keep >= 1):
        found.append(f"titok.filter.keep: must be an integer count of kept samples (M), not {json.dumps(keep)}")
    if "scope" in settings and settings["scope"] not in SCOPES:
        found.append(f"titok.filter.scope: must be one of {', '.join(SCOPES)}, not {json.dumps(settings['scope'])}")
    if "rank" in settings and not (is_integer(rank) and rank >= 1):
        found.append(f"titok.filter.rank: must be an integer from 1 (the highest mean excess), not {json.dumps(rank)}")
    if "kept" in settings and not isinstance(kept, bool):
        found.append(f"titok.filter.kept: must be true or false, not {json.dumps(kept)}")
    elif isinstance(kept, bool) and is_integer(keep) and is_integer(rank) and kept is not (rank <= keep):
        found.append(f"titok.filter.kept: is {json.dumps(kept)} for rank {rank} with keep {keep} "
                     "(the top `keep` ranks are kept)")
    if "rank_by" in settings and settings["rank_by"] not in ("excess", "answer-excess", "confidence", "random"):
        found.append("titok.filter.rank_by: must be excess, answer-excess, confidence or random, "
                     f"not {json.dumps(settings['rank_by'])}")
    if source is None or not isinstance(kept, bool):
        return
    if kept and "mask" not in source:
        found.append("titok.source.mask: missing, yet titok.filter.kept is true")
    elif not kept and "mask" in source:
        found.append("titok.source.mask: present, yet titok.filter.kept is false (a dropped sample has no mask)")
    mask, excess = source.get("mask"), source.get("excess")
    if kept and is_mask(mask) and is_numbers(excess) and len(mask) == len(excess):
        competing = outside_closing(len(mask), source.get("offsets"), completion, mask, "titok.source.mask", found)
        order_problem([mask[i] for i in competing], [excess[i] for i in competing], "titok.source.mask", "excess",
                      found, positions=competing)
        if settings.get("scope") == "sample" and k_ok:
            want = max(1, math.floor(k * len(competing) + 1e-9))
            if sum(mask) != want:
                found.append(f"titok.source.mask: selects {sum(mask)} of {len(competing)} tokens that compete; k = {k} "
                             f"in scope sample selects max(1, floor(k * n)) = {want}")


def target_problems(target, completion, source, settings, found):
    keys_problems("titok.target", target, TARGET_KEYS, TARGET_TOPK, found)
    if source is None:
        found.append("titok.target: present without titok.source (titok-align carries the source's scores)")
    if settings is not None and settings.get("kept") is False:
        found.append("titok.target: present on a record titok-filter did not keep")
    text_field(target, "titok.target", "model", found)
    fingerprint_field(target, "titok.target", found)
    truncated = flag_field(target, "titok.target", "truncated", found)
    n = token_ids_problems(target, "titok.target", found)
    spans = spans_problems(target.get("offsets"), completion, truncated, "titok.target.offsets", found)
    if spans is not None and n is not None and len(spans) != n:
        found.append(f"titok.target.offsets: {len(spans)} spans for {n} tokens")
    score = target.get("score")
    if "score" in target:
        if not (isinstance(score, list) and all(s is None or is_number(s) for s in score)):
            found.append("titok.target.score: must be a list of numbers or nulls, one per token")
            score = None
        elif n is not None and len(score) != n:
            found.append(f"titok.target.score: {len(score)} values for {n} tokens")
            score = None
    if "coverage" in target:
        coverage_field(target["coverage"], score, "titok.target.coverage", "scored tokens", found)
    source_spans = valid_spans((source or {}).get("offsets"), completion)
    if score is not None and spans is not None and source_spans is not None and len(score) == len(spans):
        for i, (a, b) in enumerate(spans):
            if score[i] is not None and not any(overlaps(a, b, c, d) for c, d in source_spans):
                found.append(f"titok.target.score: token {i} [{a}, {b}] has a score, yet no source token overlaps it")
                break
    if "mask" in target:
        mask = mask_field(target, "titok.target", n, found)
        if mask is not None and score is not None and len(mask) == len(score):
            if any(m and s is None for m, s in zip(mask, score)):
                found.append("titok.target.mask: selects a token that has no score")
            else:
                competing = outside_closing(len(mask), target.get("offsets"), completion, mask, "titok.target.mask", found)
                scored = [i for i in competing if score[i] is not None]
                order_problem([mask[i] for i in scored], [score[i] for i in scored], "titok.target.mask", "score",
                              found, positions=scored)
    target_topk_problems(target, source, spans, source_spans, n, found)


# --- top-N distributions (titok-score --topk, carried by titok-align) -------------------------

def source_topk_problems(source, n, expert, found):
    """titok-score --topk N: per token the expert's N most likely ids and their log-probs, the
    same N at every token; where the token itself is among them its log-prob is logp_expert,
    and where it is not, logp_expert is no higher than the N-th."""
    lists = topk_lists(source, "titok.source", SOURCE_TOPK, n, False, found)
    if lists is None:
        return
    ids, logps = lists
    if len({len(entry) for entry in ids}) > 1:
        found.append(f"titok.source.topk_ids: lists of {min(map(len, ids))} to {max(map(len, ids))} ids: "
                     "N must be the same at every token")
    token_ids = source.get("token_ids")
    if not (expert is not None and is_ids(token_ids) and len(token_ids) == len(expert) == len(ids)):
        return
    for i, (token, top, top_logp) in enumerate(zip(token_ids, ids, logps)):
        if token in top and not close(top_logp[top.index(token)], expert[i], expert[i]):
            found.append(f"titok.source.topk_logp: token {i}'s own id {token} has log-prob {top_logp[top.index(token)]} "
                         f"in the top N, not its logp_expert {expert[i]}")
            return
        if token not in top and not expert[i] <= top_logp[-1] + TOLERANCE * max(1.0, abs(top_logp[-1])):
            found.append(f"titok.source.topk_ids: token {i}'s own id {token} is not among them, yet its logp_expert "
                         f"{expert[i]} is above the N-th log-prob {top_logp[-1]}")
            return


def target_topk_problems(target, source, spans, source_spans, n, found):
    """titok-align's carried top-N: per target token null or N' <= N target ids, a distribution
    only where the target token overlaps exactly one source token and that one overlaps only it,
    topk_coverage the share of tokens with one; a target of the source's tokenizer and tokens
    keeps the source's lists."""
    present = [key for key in TARGET_TOPK if key in target]
    if not present:
        return
    if len(present) < len(TARGET_TOPK):
        found.append(f"titok.target: has {', '.join(present)} without "
                     f"{', '.join(k for k in TARGET_TOPK if k not in present)} (titok-align adds the three together)")
    source_lists = topk_lists(source or {}, "", SOURCE_TOPK, None, False, [])
    if source is not None and source_lists is None:
        found.append("titok.target.topk_ids: present, yet titok.source has no valid topk_ids and topk_logp to carry")
    lists = topk_lists(target, "titok.target", TARGET_TOPK[:2], n, True, found)
    if "topk_coverage" in target:
        coverage_field(target["topk_coverage"], lists and lists[0], "titok.target.topk_coverage",
                       "tokens with a distribution", found)
    if lists is None:
        return
    ids, logps = lists
    widest = max(map(len, source_lists[0])) if source_lists and source_lists[0] else None
    too_wide = [i for i, entry in enumerate(ids) if entry is not None and widest is not None and len(entry) > widest]
    if too_wide:
        found.append(f"titok.target.topk_ids: token {too_wide[0]} lists {len(ids[too_wide[0]])} ids, more than the "
                     f"source's N = {widest}")
    same_tokens = (source is not None and source_lists is not None and target.get("tokenizer") == source.get("tokenizer")
                   and target.get("token_ids") == source.get("token_ids"))
    if same_tokens:
        if not (ids == source_lists[0] and all(len(a) == len(b) and all(close(x, y, y) for x, y in zip(a, b))
                                               for a, b in zip(logps, source_lists[1]))):
            found.append("titok.target.topk_ids: differ from titok.source's, though the tokenizer and the tokens are "
                         "the same (the source's lists pass through)")
    elif spans is not None and source_spans is not None and len(spans) == len(ids):
        # (with the same tokens, pieces of one character share its span, and still pass through)
        for i, entry in enumerate(ids):
            if entry is not None and not one_to_one(i, spans, source_spans):
                a, b = spans[i]
                found.append(f"titok.target.topk_ids: token {i} [{a}, {b}] has a distribution, yet it does not "
                             "overlap exactly one source token that overlaps only it")
                break


def one_to_one(i, spans, source_spans):
    """Whether target token i overlaps exactly one source token, and that one overlaps only target token i."""
    a, b = spans[i]
    hits = [(c, d) for c, d in source_spans if overlaps(a, b, c, d)]
    if len(hits) != 1:
        return False
    c, d = hits[0]
    return [j for j, (x, y) in enumerate(spans) if overlaps(x, y, c, d)] == [i]


def topk_lists(part, name, keys, n, nullable, found):
    """The (ids, log-probs) lists of a part's top-N keys, or None (noted when present but broken):
    one entry per token, each a non-empty list of distinct token ids with as many log-probs, in
    descending order, each <= 0 and together <= 1 in probability (a share of one full-vocabulary
    softmax); with nullable, an entry may be null in both lists instead."""
    ids_key, logp_key = keys
    if ids_key not in part and logp_key not in part:
        return None
    if ids_key not in part or logp_key not in part:
        have, lack = (ids_key, logp_key) if ids_key in part else (logp_key, ids_key)
        found.append(f"{name}.{lack}: missing, yet {have} is there (they come together)")
        return None
    ids, logps = part[ids_key], part[logp_key]
    null = " or null" if nullable else ""
    if not (isinstance(ids, list) and all((nullable and e is None) or (is_ids(e) and e) for e in ids)):
        found.append(f"{name}.{ids_key}: must be a list with one entry per token: a non-empty list of token ids "
                     f"(integers from 0){null}")
        return None
    if not (isinstance(logps, list) and all((nullable and e is None) or (is_numbers(e) and e) for e in logps)):
        found.append(f"{name}.{logp_key}: must be a list with one entry per token: a non-empty list of finite "
                     f"numbers{null}")
        return None
    for key, values in ((ids_key, ids), (logp_key, logps)):
        if n is not None and len(values) != n:
            found.append(f"{name}.{key}: {len(values)} entries for {n} tokens")
            return None
    if len(ids) != len(logps):
        found.append(f"{name}.{logp_key}: {len(logps)} entries for {len(ids)} in {ids_key}")
        return None
    for i, (top, top_logp) in enumerate(zip(ids, logps)):
        problem = topk_entry_problem(top, top_logp)
        if problem:
            found.append(f"{name}.{logp_key if problem.startswith('holds') else ids_key}: token {i} {problem}")
            return None
    return ids, logps


def topk_entry_problem(top, top_logp):
    """What is wrong with one token's top-N entry (ids, log-probs), or None."""
    if (top is None) != (top_logp is None):
        return "is null in only one of topk_ids and topk_logp"
    if top is None:
        return None
    if len(top) != len(top_logp):
        return f"has {len(top)} ids and {len(top_logp)} log-probs"
    if len(set(top)) != len(top):
        return f"lists an id twice ({next(x for x in top if top.count(x) > 1)})"
    if any(v > TOLERANCE for v in top_logp):
        return f"holds {max(top_logp)}, above 0: not a log-probability"
    falls = [j for j in range(1, len(top_logp)) if top_logp[j] > top_logp[j - 1] + TOLERANCE * max(1.0, abs(top_logp[j - 1]))]
    if falls:
        return f"holds {top_logp[falls[0] - 1]} before {top_logp[falls[0]]}: not in descending order"
    total = math.fsum(math.exp(min(v, 0.0)) for v in top_logp)
    if total > 1 + TOLERANCE:
        return f"holds log-probs whose probabilities sum to {total:.6g}, above 1: not from one softmax"
    return None


# --- fields ------------------------------------------------------------------------------------

def keys_problems(name, part, required, extras, found):
    missing = [k for k in required if k not in part]
    if missing:
        found.append(f"{name}: lacks {', '.join(missing)}")
    unknown = sorted(set(part) - set(required) - set(extras))
    if unknown:
        found.append(f"{name}: has keys outside the contract: {quoted(unknown)}")


def quoted(keys):
    return ", ".join(map(json.dumps, keys))  # as JSON strings: a key may hold anything, a newline too


def text_field(part, name, key, found):
    if key in part and not (isinstance(part[key], str) and part[key]):
        found.append(f"{name}.{key}: must be a non-empty string")


def fingerprint_field(part, name, found):
    value = part.get("tokenizer")
    if "tokenizer" in part and not (isinstance(value, str) and value.startswith("sha256:")
                                    and SHA256.fullmatch(value[len("sha256:"):])):
        found.append(f"{name}.tokenizer: must be a fingerprint, sha256: and 64 lowercase hex digits")


def flag_field(part, name, key, found):
    """The boolean, or None (noted) when it is not one."""
    if key not in part:
        return None
    if not isinstance(part[key], bool):
        found.append(f"{name}.{key}: must be true or false")
        return None
    return part[key]


def token_ids_problems(part, name, found):
    """The number of tokens, or None when token_ids are missing or broken (noted)."""
    ids = part.get("token_ids")
    if "token_ids" not in part:
        return None
    if not (isinstance(ids, list) and ids and all(is_integer(i) and i >= 0 for i in ids)):
        found.append(f"{name}.token_ids: must be a non-empty list of token ids (integers from 0)")
        return None
    return len(ids)


def numbers_field(part, name, key, n, found, valid=None, what="finite numbers"):
    """The list of `what` (is_numbers, or `valid`), one per token, or None (noted when present but broken)."""
    if key not in part:
        return None
    values = part[key]
    if not (valid or is_numbers)(values):
        found.append(f"{name}.{key}: must be a list of {what}, one per token")
        return None
    if n is not None and len(values) != n:
        found.append(f"{name}.{key}: {len(values)} values for {n} tokens")
        return None
    return values


def coverage_field(coverage, values, name, what, found):
    """A share in [0, 1] that must equal the share of non-null entries of `values` (when known)."""
    if not (is_number(coverage) and 0 <= coverage <= 1):
        found.append(f"{name}: must be a number in [0, 1], not {json.dumps(coverage)}")
    elif values:
        share = sum(v is not None for v in values) / len(values)
        if abs(coverage - share) > 1e-9:
            found.append(f"{name}: {coverage} is not the share of {what} ({share:.6g})")


def mask_field(part, name, n, found):
    return numbers_field(part, name, "mask", n, found, is_mask, "0 and 1")


def spans_problems(offsets, completion, truncated, name, found):
    """The spans as (start, end) pairs, or None (noted) when they break the rules: [start, end)
    inside the completion, starts and ends in order, every span but one non-empty (a token
    overlaps the completion), the one empty span being the closing token's [len, len] at the
    end, there unless the completion was truncated (which cuts the closing token off)."""
    if offsets is None:
        return None
    if not (isinstance(offsets, list) and offsets and all(
            isinstance(p, list) and len(p) == 2 and all(is_integer(x) for x in p) for p in offsets)):
        found.append(f"{name}: must be a non-empty list of [start, end] integer pairs")
        return None
    spans, length = [tuple(p) for p in offsets], len(completion)
    for i, (a, b) in enumerate(spans):
        if a > b:
            found.append(f"{name}: span {i} [{a}, {b}] ends before it starts")
            return None
        if a < 0 or b > length:
            found.append(f"{name}: span {i} [{a}, {b}] is not inside the completion (length {length})")
            return None
    for i in range(1, len(spans)):
        if spans[i][0] < spans[i - 1][0] or spans[i][1] < spans[i - 1][1]:
            found.append(f"{name}: span {i} {list(spans[i])} comes before span {i - 1} {list(spans[i - 1])}: "
                         "not in order")
            return None
    empty = [i for i, (a, b) in enumerate(spans) if a == b]
    if empty and (empty != [len(spans) - 1] or spans[-1] != (length, length)):
        found.append(f"{name}: span {empty[0]} is empty; only the closing token, last, has the empty span "
                     f"[{length}, {length}]")
        return None
    if truncated is False and not empty:
        found.append(f"{name}: no closing token (the empty span [{length}, {length}] last), "
                     "yet truncated is false")
    elif truncated and empty:
        found.append(f"{name}: truncated is true, yet the closing token (cut off by truncation) is there")
    return spans


def valid_spans(offsets, completion):
    """The spans if they pass spans_problems' checks (those are reported once, where they belong)."""
    return spans_problems(offsets, completion, None, "", []) if offsets is not None else None


def overlaps(a, b, c, d):
    """Whether target span [a, b) and source span [c, d) overlap: they share a character, or both
    are the closing token's empty span at the same place."""
    if a == b or c == d:
        return a == b == c == d
    return c < b and a < d


def outside_closing(n, offsets, completion, mask, name, found):
    """The token positions that compete for the k budget: all but the closing token (an empty
    span at the completion's end, last), which is never selected (titok-train trains it anyway)."""
    end = [len(completion), len(completion)]
    closing = isinstance(offsets, list) and len(offsets) == n > 0 and offsets[-1] == end
    if closing and mask[-1]:
        found.append(f"{name}: selects the closing token, which is outside the k budget")
    return list(range(n - 1 if closing else n))


def order_problem(mask, values, name, what, found, positions=None):
    """Note if a mask does not pick the highest values: every selected token ranks above every
    unselected one, by value and then by position (ties go to the earlier token)."""
    positions = range(len(mask)) if positions is None else positions
    keys = [(v, -p) for v, p in zip(values, positions)]
    chosen = [key for key, m in zip(keys, mask) if m]
    passed = [key for key, m in zip(keys, mask) if not m]
    if chosen and passed and min(chosen) < max(passed):
        low, high = min(chosen), max(passed)
        found.append(f"{name}: selects token {-low[1]} ({what} {low[0]}) over token {-high[1]} ({what} {high[0]}): "
                     f"not the top tokens by {what}")


# --- values ------------------------------------------------------------------------------------

def is_number(x):
    return type(x) in (int, float) and math.isfinite(x)  # not bool (true/false), not NaN or infinity


def is_integer(x):
    return type(x) is int


def is_ids(values):
    return isinstance(values, list) and all(is_integer(i) and i >= 0 for i in values)


def is_numbers(values):
    return isinstance(values, list) and all(is_number(v) for v in values)


def is_mask(values):
    return isinstance(values, list) and all(type(v) is int and v in (0, 1) for v in values)


def close(value, expected, *magnitudes):
    return abs(value - expected) <= TOLERANCE * max([1.0, abs(expected), *map(abs, magnitudes)])


# --- files -----------------------------------------------------------------------------------

def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def file_problems(path):
    """Every problem of every record of a JSON lines file, as "path:line: problem"; blank lines
    are skipped, a line that is not JSON is a problem, and so is a file without records. Across
    records: titok-filter's ranks are distinct and follow mean excess (1 = the highest)."""
    found, records, ranked = [], 0, []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            records += 1
            try:
                record = json.loads(line, parse_constant=_no_constant)
            except ValueError as e:
                found.append(f"{path}:{number}: invalid JSON ({e})")
                continue
            record_problems = problems(record)
            found.extend(f"{path}:{number}: {p}" for p in record_problems)
            if not record_problems and isinstance(record.get("titok"), dict) and "filter" in record["titok"]:
                settings = record["titok"]["filter"]
                if settings.get("rank_by", "excess") == "excess":
                    ranked.append((settings["rank"], record["titok"]["source"]["mean_excess"], number))
    ranked.sort(key=lambda item: (item[0], item[2]))  # by rank, then line
    for (rank, mean, number), (next_rank, next_mean, next_number) in zip(ranked, ranked[1:]):
        if rank == next_rank:
            found.append(f"{path}:{next_number}: titok.filter.rank: {rank} again (line {number} has it)")
        elif mean < next_mean:
            found.append(f"{path}:{next_number}: titok.filter.rank: {next_rank} for mean excess {next_mean}, above "
                         f"rank {rank}'s {mean} (line {number}): ranks follow mean excess, highest first")
    if not records:
        found.append(f"{path}: no records")
    return found


def main(paths):
    found = [p for path in paths for p in file_problems(path)]
    for p in found:
        print(p)
    return 1 if found else 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python tests/record_contract.py FILE.jsonl [...]")
    sys.exit(main(sys.argv[1:]))
