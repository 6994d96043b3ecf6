"""The record checker (tests/record_contract.py): good records pass, each kind of broken record
is named, files are checked line by line. The stages' tests run it on the records they produce."""
import copy
import json
import math
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner
from hypothesis import given, settings as hsettings, strategies as st

from conftest import GEMMA_TEMPLATE, ROOT
from record_contract import file_problems, problems

SHA = "d13886b8a8fe1af04b018dde3f70f9722581204a17204f5c5801d01a182831a8"
SOURCE_FP, TARGET_FP = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def readme_example():
    """The full record the README's "Record format" section shows."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## Record format"):]
    return json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))


def aligned():
    """The README's record aligned onto a tokenizer that splits "four" into "fo" + "ur": both take
    the excess of "four", the closing tokens map to each other; k = 0.5 of 3 tokens is one, the
    tie between "fo" and "ur" goes to the earlier."""
    record = readme_example()
    record["titok"]["target"] = {"model": "gemma", "tokenizer": TARGET_FP, "token_ids": [10, 11, 1],
                                 "offsets": [[0, 2], [2, 4], [4, 4]], "score": [-0.0872, -0.0872, -2.0667],
                                 "coverage": 1.0, "truncated": False, "mask": [1, 0, 0]}
    return record


def truncated():
    """A conversation whose source side was cut after two tokens (no closing token): the target's
    " cd" overlaps the source's " c" and is scored, its closing token overlaps nothing (null)."""
    return {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Letters?"},
                         {"role": "assistant", "content": "ab cd"}],
            "titok": {"source": {"model": "m", "adapter": "a", "adapter_sha256": SHA, "tokenizer": SOURCE_FP,
                                 "token_ids": [5, 6], "offsets": [[0, 2], [2, 4]], "logp_expert": [-1.0, -3.0],
                                 "logp_base": [-2.0, -2.5], "excess": [1.0, -0.5], "mean_excess": 0.25,
                                 "truncated": True, "mask": [1, 1]},
                      "filter": {"k": 1.0, "keep": 3, "scope": "batch", "rank": 3, "kept": True},
                      "target": {"model": "t", "tokenizer": TARGET_FP, "token_ids": [7, 8, 1],
                                 "offsets": [[0, 2], [2, 5], [5, 5]], "score": [1.0, -0.5, None],
                                 "coverage": 2 / 3, "truncated": False, "mask": [1, 1, 0]}}}


def with_topk():
    """aligned() after titok-score --topk 3 and titok-align: the source's "four" has its own id
    among its top 3, its closing token not (its logp_expert is below the third); on the target,
    "fo" and "ur" share one source token (no distribution), the closing tokens map to each other,
    and source ids 7 and 9 both map to target id 20 (their probabilities summed)."""
    record = aligned()
    source(record).update(topk_ids=[[30, 31, 13996], [7, 8, 9]],
                          topk_logp=[[-0.1, -2.5, -10.7602], [-0.05, -3.2, -5.0]])
    target(record).update(topk_ids=[None, None, [20, 21]], topk_logp=[None, None, [-0.0429, -3.2]], topk_coverage=1 / 3)
    return record


def same_tokenizer():
    """with_topk() aligned onto the source's own tokenizer: the target's tokens are the source's,
    and so are its top-N lists (they pass through)."""
    record = with_topk()
    record["titok"]["target"] = {"model": "m", "tokenizer": source(record)["tokenizer"], "token_ids": [13996, 2],
                                 "offsets": [[0, 4], [4, 4]],
                                 "score": [-0.0872, -2.0667], "coverage": 1.0, "truncated": False, "mask": [1, 0],
                                 "topk_ids": copy.deepcopy(source(record)["topk_ids"]),
                                 "topk_logp": copy.deepcopy(source(record)["topk_logp"]), "topk_coverage": 1.0}
    return record


def test_good_records_pass():
    assert problems(readme_example()) == []
    assert problems(aligned()) == []
    assert problems(truncated()) == []
    plain = {"id": 3, "prompt": [{"role": "user", "content": "Hi"}], "completion": "Hello", "extra": [1]}
    assert problems(plain) == []  # an input record: no titok yet, other fields are free
    record = aligned()
    record["titok"]["filter"].update(rank=4, keep=3, kept=False)  # titok-filter --mark-only's dropped record
    del record["titok"]["source"]["mask"], record["titok"]["target"]
    assert problems(record) == []
    record = readme_example()
    record["titok"]["filter"].update(k=0.9, k_auto={"mass": 0.9, "share": 0.95}, rank_by="random", seed=3)
    record["titok"]["source"]["mask"] = [1, 0]  # max(1, floor(0.9 * 2)) = 1
    assert problems(record) == []
    assert problems([readme_example()]) == problems("four") == ["a record must be a JSON object"]


def test_good_records_with_top_n_lists_pass():
    assert problems(with_topk()) == []
    assert problems(same_tokenizer()) == []
    record = with_topk()
    del target(record)["topk_ids"], target(record)["topk_logp"], target(record)["topk_coverage"]
    assert problems(record) == []  # titok-score --topk, then an align that did not carry them
    record = with_topk()
    source(record)["topk_logp"][1] = [-0.0001, -12.0, -13.9]  # (the closing token still below the third)
    assert problems(record) == []  # the top token alone near probability 1


def source(r):
    return r["titok"]["source"]


def target(r):
    return r["titok"]["target"]


def setting(r):
    return r["titok"]["filter"]


BROKEN = {
    "completion not a string": (lambda r: r.update(completion=4), "completion: must be a string"),
    "no completion": (lambda r: r.pop("completion"), "completion: missing"),
    "no prompt": (lambda r: r.pop("prompt"), "prompt: missing"),
    "prompt a number": (lambda r: r.update(prompt=3), "prompt: must be a string or a list of {role, content}"),
    "messages without the answer": (lambda r: r.update(messages=[{"role": "user", "content": "x"}]) or r.pop("completion"),
                                    "messages: the last message must be the assistant's completion"),
    "titok a string": (lambda r: r.update(titok="x"), "titok: must be an object"),
    "titok part unknown": (lambda r: r["titok"].update(extra={}),
                           'titok: has parts outside the contract (source, filter, target): "extra"'),
    "source a list": (lambda r: r["titok"].update(source=[]), "titok.source: must be an object"),
    "source key missing": (lambda r: source(r).pop("logp_base"), "titok.source: lacks logp_base"),
    "source key unknown": (lambda r: source(r).update(dtype="f32"),
                           'titok.source: has keys outside the contract: "dtype"'),
    "adapter hash": (lambda r: source(r).update(adapter_sha256="abc"), "titok.source.adapter_sha256: must be 64"),
    "source fingerprint": (lambda r: source(r).update(tokenizer="gpt2"),
                           "titok.source.tokenizer: must be a fingerprint"),
    "model empty": (lambda r: source(r).update(model=""), "titok.source.model: must be a non-empty string"),
    "truncated a string": (lambda r: source(r).update(truncated="no"), "titok.source.truncated: must be true or false"),
    "token id negative": (lambda r: source(r).update(token_ids=[13996, -2]), "titok.source.token_ids: must be"),
    "logp too short": (lambda r: source(r)["logp_base"].pop(), "titok.source.logp_base: 1 values for 2 tokens"),
    "logp above 0": (lambda r: source(r).update(logp_expert=[0.5, -13.9514], excess=[11.173, -2.0667]),
                     "titok.source.logp_expert: holds a value above 0"),
    "excess the wrong way round": (lambda r: source(r).update(excess=[0.0872, 2.0667], mean_excess=1.0769),
                                   "titok.source.excess: is not logp_expert - logp_base at token 0"),
    "excess null": (lambda r: source(r).update(excess=[None, -2.0667]),
                    "titok.source.excess: must be a list of finite"),
    "excess true": (lambda r: source(r).update(excess=[True, -2.0667]),
                    "titok.source.excess: must be a list of finite"),
    "excess nan": (lambda r: source(r).update(excess=[math.nan, -2.0667]),
                   "titok.source.excess: must be a list of finite"),
    "mean not the mean": (lambda r: source(r).update(mean_excess=-2.0667),
                          "titok.source.mean_excess: -2.0667 is not the mean"),
    "mean a string": (lambda r: source(r).update(mean_excess="-1"),
                      "titok.source.mean_excess: must be a finite number"),
    "span past the end": (lambda r: source(r).update(offsets=[[0, 5], [5, 5]]),
                          "titok.source.offsets: span 0 [0, 5] is not inside the completion (length 4)"),
    "span backwards": (lambda r: source(r).update(offsets=[[3, 2], [4, 4]]),
                       "titok.source.offsets: span 0 [3, 2] ends before it starts"),
    "spans out of order": (lambda r: source(r).update(offsets=[[2, 4], [0, 4]]),
                           "titok.source.offsets: span 1 [0, 4] comes before span 0 [2, 4]: not in order"),
    "spans not pairs": (lambda r: source(r).update(offsets=[[0, 4, 1], [4, 4]]),
                        "titok.source.offsets: must be a non-empty list"),
    "empty span inside": (lambda r: source(r).update(offsets=[[0, 0], [0, 4]]),
                          "titok.source.offsets: span 0 is empty; only the closing token"),
    "closing not at the end": (lambda r: source(r).update(offsets=[[0, 3], [3, 3]]),
                               "titok.source.offsets: span 1 is empty; only the closing token, last, has the empty span [4, 4]"),
    "no closing token": (lambda r: source(r).update(offsets=[[0, 2], [2, 4]]),
                         "titok.source.offsets: no closing token (the empty span [4, 4] last), yet truncated is false"),
    "truncated yet closed": (lambda r: source(r).update(truncated=True),
                             "titok.source.offsets: truncated is true, yet the closing token"),
    "span count": (lambda r: source(r).update(offsets=[[0, 2], [2, 4], [4, 4]]),
                   "titok.source.offsets: 3 spans for 2 tokens"),
    "mask of 2": (lambda r: source(r).update(mask=[2, 0]), "titok.source.mask: must be a list of 0 and 1"),
    "mask of true": (lambda r: source(r).update(mask=[True, False]), "titok.source.mask: must be a list of 0 and 1"),
    "mask too long": (lambda r: source(r).update(mask=[1, 0, 0]), "titok.source.mask: 3 values for 2 tokens"),
    "mask the closing token": (lambda r: source(r).update(mask=[0, 1]),
                               "titok.source.mask: selects the closing token, which is outside the k budget"),
    "mask too many": (lambda r: source(r).update(mask=[1, 1]),
                      "titok.source.mask: selects 2 of 1 tokens that compete; k = 0.5 in scope sample selects "
                      "max(1, floor(k * n)) = 1"),
    "mask none": (lambda r: source(r).update(mask=[0, 0]), "titok.source.mask: selects 0 of 1 tokens that compete"),
    "mask not the top": (lambda r: source(r).update(offsets=[[0, 2], [2, 4]], excess=[-2.0, -0.0872],
                                                    logp_expert=[-3.0, -12.0], logp_base=[-1.0, -11.9128],
                                                    mean_excess=-1.0436, mask=[1, 0]) and r["titok"].pop("target"),
                         "titok.source.mask: selects token 0 (excess -2.0) over token 1 (excess -0.0872)"),
    "mask without filter": (lambda r: r["titok"].pop("filter") and r["titok"].pop("target"),
                            "titok.source.mask: present without titok.filter"),
    "filter without source": (lambda r: r["titok"].pop("source") and r["titok"].pop("target"),
                              "titok.filter: present without titok.source"),
    "filter key missing": (lambda r: setting(r).pop("rank"), "titok.filter: lacks rank"),
    "filter key unknown": (lambda r: setting(r).update(top=3), 'titok.filter: has keys outside the contract: "top"'),
    "k of 0": (lambda r: setting(r).update(k=0), "titok.filter.k: must be a number in (0, 1], not 0"),
    "k above 1": (lambda r: setting(r).update(k=1.5), "titok.filter.k: must be a number in (0, 1], not 1.5"),
    "keep a fraction": (lambda r: setting(r).update(keep=0.5), "titok.filter.keep: must be an integer count"),
    "scope unknown": (lambda r: setting(r).update(scope="token"),
                      "titok.filter.scope: must be one of sample, batch, global"),
    "rank 0": (lambda r: setting(r).update(rank=0), "titok.filter.rank: must be an integer from 1"),
    "kept a string": (lambda r: setting(r).update(kept="yes"), "titok.filter.kept: must be true or false"),
    "kept past keep": (lambda r: setting(r).update(rank=2),
                       "titok.filter.kept: is true for rank 2 with keep 1 (the top `keep` ranks are kept)"),
    "dropped within keep": (lambda r: setting(r).update(kept=False),
                            "titok.filter.kept: is false for rank 1 with keep 1"),
    "rank_by unknown": (lambda r: setting(r).update(rank_by="length"),
                        "titok.filter.rank_by: must be excess, answer-excess, confidence or random"),
    "kept without a mask": (lambda r: source(r).pop("mask"),
                            "titok.source.mask: missing, yet titok.filter.kept is true"),
    "dropped with a mask": (lambda r: setting(r).update(rank=2, kept=False) or r["titok"].pop("target"),
                            "titok.source.mask: present, yet titok.filter.kept is false"),
    "target on a dropped record": (lambda r: setting(r).update(rank=2, kept=False) or source(r).pop("mask"),
                                   "titok.target: present on a record titok-filter did not keep"),
    "target without source": (lambda r: r["titok"].pop("source") and r["titok"].pop("filter"),
                              "titok.target: present without titok.source"),
    "target key missing": (lambda r: target(r).pop("truncated"), "titok.target: lacks truncated"),
    "target key unknown": (lambda r: target(r).update(k=0.5), 'titok.target: has keys outside the contract: "k"'),
    "target fingerprint": (lambda r: target(r).update(tokenizer="sha256:XYZ"),
                           "titok.target.tokenizer: must be a fingerprint"),
    "target ids not a list": (lambda r: target(r).update(token_ids=10), "titok.target.token_ids: must be"),
    "target spans outside": (lambda r: target(r).update(offsets=[[0, 2], [2, 6], [6, 6]]),
                             "titok.target.offsets: span 1 [2, 6] is not inside the completion (length 4)"),
    "target not closed": (lambda r: target(r).update(offsets=[[0, 1], [1, 2], [2, 4]]),
                          "titok.target.offsets: no closing token"),
    "score too short": (lambda r: target(r)["score"].pop(), "titok.target.score: 2 values for 3 tokens"),
    "score a string": (lambda r: target(r)["score"].__setitem__(0, "high"),
                       "titok.target.score: must be a list of numbers or nulls"),
    "coverage not the share": (lambda r: target(r).update(coverage=0.5),
                               "titok.target.coverage: 0.5 is not the share of scored tokens (1)"),
    "coverage above 1": (lambda r: target(r).update(coverage=1.5), "titok.target.coverage: must be a number in [0, 1]"),
    "target mask of 2": (lambda r: target(r).update(mask=[2, 0, 0]), "titok.target.mask: must be a list of 0 and 1"),
    "target mask short": (lambda r: target(r).update(mask=[1, 0]), "titok.target.mask: 2 values for 3 tokens"),
    "target tie to the later token": (lambda r: target(r).update(mask=[0, 1, 0]),
                                      "titok.target.mask: selects token 1 (score -0.0872) over token 0 (score -0.0872)"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_each_broken_record_is_named(name):
    break_it, expected = BROKEN[name]
    record = aligned()
    break_it(record)
    found = problems(record)
    assert any(p.startswith(expected) for p in found), found


def topk(r, part="source"):
    return r["titok"][part]["topk_ids"], r["titok"][part]["topk_logp"]


BROKEN_TOPK = {
    "logp without ids": (lambda r: source(r).pop("topk_ids"), "titok.source.topk_ids: missing, yet topk_logp is there"),
    "ids not a list": (lambda r: source(r).update(topk_ids=3), "titok.source.topk_ids: must be a list with one entry"),
    "null in the source": (lambda r: topk(r)[0].__setitem__(0, None) or topk(r)[1].__setitem__(0, None),
                           "titok.source.topk_ids: must be a list with one entry per token: a non-empty list of token "
                           "ids (integers from 0)"),
    "empty entry": (lambda r: topk(r)[0].__setitem__(1, []) or topk(r)[1].__setitem__(1, []),
                    "titok.source.topk_ids: must be a list with one entry"),
    "negative id": (lambda r: topk(r)[0][1].__setitem__(0, -7), "titok.source.topk_ids: must be a list with one entry"),
    "logp a string": (lambda r: topk(r)[1][1].__setitem__(0, "-0.05"),
                      "titok.source.topk_logp: must be a list with one entry per token: a non-empty list of finite"),
    "logp nan": (lambda r: topk(r)[1][1].__setitem__(0, math.nan), "titok.source.topk_logp: must be a list"),
    "an entry short": (lambda r: topk(r)[0].pop() and topk(r)[1].pop(), "titok.source.topk_ids: 1 entries for 2 tokens"),
    "id twice": (lambda r: topk(r)[0].__setitem__(1, [7, 7, 9]), "titok.source.topk_ids: token 1 lists an id twice (7)"),
    "ids and logps differ in number": (lambda r: topk(r)[1][1].pop(), "titok.source.topk_ids: token 1 has 3 ids and 2 log-probs"),
    "logp above 0": (lambda r: topk(r)[1][1].__setitem__(0, 0.5), "titok.source.topk_logp: token 1 holds 0.5, above 0"),
    "not descending": (lambda r: topk(r)[1].__setitem__(1, [-3.2, -0.05, -5.0]),
                       "titok.source.topk_logp: token 1 holds -3.2 before -0.05: not in descending order"),
    "more than probability 1": (lambda r: topk(r)[1].__setitem__(1, [-0.05, -0.5, -5.0]),
                                "titok.source.topk_logp: token 1 holds log-probs whose probabilities sum to 1.56"),
    "N varies": (lambda r: topk(r)[0].__setitem__(1, [7, 8]) or topk(r)[1].__setitem__(1, [-0.05, -3.2]),
                 "titok.source.topk_ids: lists of 2 to 3 ids: N must be the same at every token"),
    "own id with another log-prob": (lambda r: topk(r)[1][0].__setitem__(2, -10.5),
                                     "titok.source.topk_logp: token 0's own id 13996 has log-prob -10.5 in the top N, "
                                     "not its logp_expert -10.7602"),
    "own id missing, yet above the N-th": (lambda r: topk(r)[0].__setitem__(0, [30, 31, 32])
                                           or topk(r)[1].__setitem__(0, [-0.1, -2.5, -12.0]),
                                           "titok.source.topk_ids: token 0's own id 13996 is not among them, yet its "
                                           "logp_expert -10.7602 is above the N-th log-prob -12.0"),
    "target without coverage": (lambda r: target(r).pop("topk_coverage"),
                                "titok.target: has topk_ids, topk_logp without topk_coverage"),
    "target without the source's": (lambda r: source(r).pop("topk_ids") and source(r).pop("topk_logp"),
                                    "titok.target.topk_ids: present, yet titok.source has no valid topk_ids"),
    "target entries short": (lambda r: topk(r, "target")[0].pop(0) and topk(r, "target")[1].pop(0),
                             "titok.target.topk_ids: 2 entries for 3 tokens"),
    "target null in one list": (lambda r: topk(r, "target")[1].__setitem__(0, [-1.0]),
                                "titok.target.topk_ids: token 0 is null in only one of topk_ids and topk_logp"),
    "target id twice": (lambda r: topk(r, "target")[0].__setitem__(2, [20, 20]),
                        "titok.target.topk_ids: token 2 lists an id twice (20)"),
    "target not descending": (lambda r: topk(r, "target")[1].__setitem__(2, [-3.2, -0.0429]),
                              "titok.target.topk_logp: token 2 holds -3.2 before -0.0429"),
    "target wider than the source": (lambda r: topk(r, "target")[0].__setitem__(2, [20, 21, 22, 23])
                                     or topk(r, "target")[1].__setitem__(2, [-0.1, -3.3, -5.0, -6.0]),
                                     "titok.target.topk_ids: token 2 lists 4 ids, more than the source's N = 3"),
    "target distribution on a shared source token": (
        lambda r: topk(r, "target")[0].__setitem__(0, [20]) or topk(r, "target")[1].__setitem__(0, [-0.5])
        or target(r).update(topk_coverage=2 / 3),
        "titok.target.topk_ids: token 0 [0, 2] has a distribution, yet it does not overlap exactly one source token "
        "that overlaps only it"),
    "target coverage not the share": (lambda r: target(r).update(topk_coverage=0.5),
                                      "titok.target.topk_coverage: 0.5 is not the share of tokens with a distribution "
                                      "(0.333333)"),
    "target coverage above 1": (lambda r: target(r).update(topk_coverage=1.5),
                                "titok.target.topk_coverage: must be a number in [0, 1], not 1.5"),
}


@pytest.mark.parametrize("name", BROKEN_TOPK)
def test_each_broken_top_n_list_is_named(name):
    """titok-score --topk N's lists and titok-align's carried ones (README, Record format)."""
    break_it, expected = BROKEN_TOPK[name]
    record = with_topk()
    break_it(record)
    found = problems(record)
    assert any(p.startswith(expected) for p in found), found


def test_the_same_tokenizer_passes_the_lists_through():
    """With the source's tokenizer and tokens the target keeps the source's lists, at every token,
    even where pieces of one character share its span (not one to one)."""
    record = same_tokenizer()
    topk(record, "target")[0][1] = [8, 7, 9]
    assert problems(record) == ["titok.target.topk_ids: differ from titok.source's, though the tokenizer and the tokens "
                                "are the same (the source's lists pass through)"]
    record = same_tokenizer()
    record["completion"] = "🗼"  # two byte pieces of one character, then the closing token
    for part in (source(record), target(record)):
        part.update(token_ids=[13996, 5, 2], offsets=[[0, 1], [0, 1], [1, 1]])
    source(record).update(logp_expert=[-10.7602, -0.0501, -13.9514], logp_base=[-10.673, -0.1, -11.8846],
                          excess=[-0.0872, 0.0499, -2.0667], mean_excess=-0.7013, mask=[0, 1, 0])
    target(record).update(score=source(record)["excess"], mask=[0, 1, 0])
    for part in (source(record), target(record)):
        part["topk_ids"].insert(1, [5, 6, 3])
        part["topk_logp"].insert(1, [-0.0501, -3.5, -4.0])
    assert problems(record) == []
    target(record)["tokenizer"] = TARGET_FP  # another tokenizer: a distribution needs a one-to-one token
    assert problems(record) == ["titok.target.topk_ids: token 0 [0, 1] has a distribution, yet it does not overlap "
                                "exactly one source token that overlaps only it"]


@pytest.mark.parametrize("break_it, expected", [
    (lambda r: target(r)["score"].__setitem__(2, -0.5) or target(r).update(coverage=1.0),
     "titok.target.score: token 2 [5, 5] has a score, yet no source token overlaps it"),
    (lambda r: target(r).update(mask=[1, 1, 1]), "titok.target.mask: selects a token that has no score"),
    (lambda r: target(r).update(mask=[0, 1, 0]),
     "titok.target.mask: selects token 1 (score -0.5) over token 0 (score 1.0)"),
    (lambda r: source(r).update(offsets=[[0, 2], [5, 5]]),
     "titok.source.offsets: truncated is true, yet the closing token (cut off by truncation) is there"),
    (lambda r: source(r).update(offsets=[[0, 2], [2, 2]]), "titok.source.offsets: span 1 is empty"),
])
def test_broken_truncated_records_are_named(break_it, expected):
    """Scores need a source token under them (the source's cut-off tail has none), the mask picks
    scored tokens only and the highest of them, in any scope."""
    record = truncated()
    break_it(record)
    assert any(p.startswith(expected) for p in problems(record)), problems(record)


def test_the_mask_count_is_checked_only_where_the_record_alone_decides_it():
    """With scope batch or global the top-k runs over several records: one record may hold any
    number of the selected tokens (none included), but still only its highest ones."""
    for scope in ("batch", "global"):
        for mask in ([1, 0], [0, 0]):
            record = aligned()
            setting(record)["scope"] = scope
            source(record)["mask"] = mask
            assert problems(record) == []
        source(record)["mask"] = [0, 1]  # the closing token is outside the budget in every scope
        assert [p for p in problems(record) if p.startswith("titok.source.mask: selects the closing token")]


def test_stored_numbers_may_be_rounded_but_not_wrong():
    """The README's example keeps four decimals: -13.9514 - -11.8846 is -2.0668, stored -2.0667."""
    record = readme_example()
    assert source(record)["excess"][1] != source(record)["logp_expert"][1] - source(record)["logp_base"][1]
    assert problems(record) == []
    source(record)["excess"][1] = -2.07
    assert problems(record) == [
        f"titok.source.excess: is not logp_expert - logp_base at token 1 (-2.07 vs {-13.9514 + 11.8846})",
        "titok.source.mean_excess: -1.0769 is not the mean of excess (-1.0786)"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


def paths(value, path=()):
    """Every place in a JSON value, as a tuple of keys and indices."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        yield from paths(inner, path + (key,))


ALIGNED_PATHS = list(paths(aligned()))[1:]
TOPK_PATHS = [p for p in paths(with_topk()) if any(str(key).startswith("topk") for key in p)]


@hsettings(max_examples=400, deadline=None)
@given(place=st.sampled_from([(aligned, p) for p in ALIGNED_PATHS] + [(with_topk, p) for p in TOPK_PATHS]),
       value=JSON_VALUES, delete=st.booleans())
def test_any_value_anywhere_gives_problems_not_an_exception(place, value, delete):
    make, place = place
    record = make()
    *parents, last = place
    holder = record
    for key in parents:
        holder = holder[key]
    if delete:
        holder.pop(last)
    else:
        holder[last] = value
    found = problems(record)
    assert isinstance(found, list) and all(isinstance(p, str) and "\n" not in p for p in found)


def test_a_file_is_checked_line_by_line(tmp_path):
    bad = aligned()
    target(bad)["coverage"] = 0.5
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join([json.dumps(aligned()), "", json.dumps(bad), "{not json", '{"completion": NaN}',
                               "[1]", json.dumps({"prompt": "p", "completion": "c", "titok": None})]) + "\n")
    found = file_problems(str(path))
    assert [p.split(": ", 1)[0] for p in found] == [f"{path}:{n}" for n in (3, 4, 5, 6)]
    assert found[0] == f"{path}:3: titok.target.coverage: 0.5 is not the share of scored tokens (1)"
    assert found[1].startswith(f"{path}:4: invalid JSON") and found[2].startswith(f"{path}:5: invalid JSON")
    assert found[3] == f"{path}:6: a record must be a JSON object"
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    assert file_problems(str(tmp_path / "empty.jsonl")) == [f"{tmp_path / 'empty.jsonl'}: no records"]


def test_ranks_across_a_file_follow_mean_excess(tmp_path):
    """titok.filter.rank 1 is the highest mean excess of the run, and no two records share a rank;
    a --rank-by random run's ranks follow no order."""
    def ranked(rank, mean, rank_by=None):
        record = aligned()
        setting(record).update(rank=rank, keep=3, **({"rank_by": rank_by} if rank_by else {}))
        base = source(record)["logp_base"]
        source(record).update(excess=[mean + 0.5, mean - 0.5], mean_excess=mean,
                              logp_expert=[base[0] + mean + 0.5, base[1] + mean - 0.5])
        return json.dumps(record)

    path = tmp_path / "ranked.jsonl"
    path.write_text("\n".join([ranked(2, 0.25), ranked(1, 0.75), ranked(3, 0.25)]) + "\n")
    assert file_problems(str(path)) == []  # a tie: ranked in input order
    path.write_text("\n".join([ranked(2, 0.25), ranked(1, -0.25), ranked(2, -0.5)]) + "\n")
    assert file_problems(str(path)) == [
        f"{path}:1: titok.filter.rank: 2 for mean excess 0.25, above rank 1's -0.25 (line 2): "
        "ranks follow mean excess, highest first",
        f"{path}:3: titok.filter.rank: 2 again (line 1 has it)"]
    path.write_text("\n".join([ranked(2, 0.25, "random"), ranked(1, -0.25, "random")]) + "\n")
    assert file_problems(str(path)) == []


def test_the_checker_runs_as_a_script(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps(aligned()) + "\n")
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    script = os.path.join(ROOT, "tests", "record_contract.py")
    ok = subprocess.run([sys.executable, script, str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout == ""
    failed = subprocess.run([sys.executable, script, str(good), str(bad)], capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stdout == f"{bad}:1: completion: missing (need prompt + completion, or messages)\n"


def test_records_stay_unchanged():
    record = aligned()
    before = copy.deepcopy(record)
    problems(record)
    assert record == before


STUDY_SCORED = os.path.join(ROOT, "results", "study-m64", "object_counting", "scored.jsonl")  # 128 records titok-score wrote


@pytest.mark.parametrize("scope, k", [("sample", "0.3"), ("batch", "0.5"), ("global", "0.7"), ("sample", "auto")])
def test_real_records_keep_the_contract_through_filter_and_align(scope, k, gemma_gguf, tmp_path):
    """The study's scored pool (SmolLM2 with its expert) passes, and so does every record
    titok-filter --mark-only and titok-align onto Gemma's tokenizer make of it: an independent
    check of their masks (top-k, kept by rank), spans and null scores."""
    from titok_tools import align, filter
    assert file_problems(STUDY_SCORED) == []
    filtered, aligned = tmp_path / "filtered.jsonl", tmp_path / "aligned.jsonl"
    done = CliRunner().invoke(filter.main, ["-k", k, "--keep", "0.5", "--scope", scope, "--mark-only",
                                            "-o", str(filtered), STUDY_SCORED])
    assert done.exit_code == 0, done.output
    assert file_problems(str(filtered)) == []
    done = CliRunner().invoke(align.main, ["--target-model", gemma_gguf, "--chat-template", GEMMA_TEMPLATE,
                                           "--scope", scope, "-o", str(aligned), str(filtered)])
    assert done.exit_code == 0, done.output
    assert file_problems(str(aligned)) == []
    records = [json.loads(line) for line in open(aligned)]
    assert sum("target" in r["titok"] for r in records) == 64 and len(records) == 128
