"""titok-align: character-offset alignment against a brute-force reference, on real tokenizers."""
import json
import logging
import math
import os
import unicodedata

import numpy as np
import orjson
import pytest
import simdjson
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from conftest import GEMMA_TEMPLATE, read_jsonl, run_pipe, write_jsonl
from titok_tools import align, alignment, lazy_records
from titok_tools.align import align_records, main
from titok_tools.alignment import align_values, overlap_ranges
from titok_tools.formatting import FormatError, encode
from titok_tools.models import load_tokenizer, tokenizer_fingerprint
from titok_tools.records import JsonLine, parse_line
from titok_tools.select import n_select, topk_mask, topk_masks

TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog. It's 42, isn't it? Yes: (a+b)*c = 7;",
    "accented": "Crème brûlée à la française, naïve façade — señor Ångström déjà vu, Œuvre.",
    "emoji": "Great job 👍🏽! 🎉🎉 Family: 👨\u200d👩\u200d👧\u200d👦 done 😀. Flags 🇫🇷🇯🇵 ok ✅",
    "cjk": "日本語のテキストと中文文本，还有한국어 문장。東京タワー「高さ」333ｍ",
    "whitespace": "  leading\n\n\n    indented\tcode\t\tand   many      spaces   \n\n  end \t ",
    "code": "def f(x):\n    return x**2  # square\n\nprint(f(3))\n",
}
PROMPT = [{"role": "user", "content": "Write something."}]


def brute_force(source_offsets, values, target_offsets):
    """For every target token, the source tokens whose spans overlap it, O(n*m): the reference.
    Non-empty spans overlap when they share a character; empty spans (the closing tokens) only
    match each other at the same place."""
    out = []
    for c, d in target_offsets:
        hits = [v for (a, b), v in zip(source_offsets, values)
                if ((a < d and c < b) if (a < b and c < d) else (a == b == c == d))]
        total = 0.0
        for v in hits:  # left to right, as the aligner sums
            total += v
        out.append(total / len(hits) if hits else None)
    return out


def brute_force_groups(source_offsets, values, target_offsets):
    """The paper's grouping, O(n*m): connected groups of overlapping tokens; every target token
    of a group gets the mean over the group's source tokens."""
    parent = list(range(len(source_offsets) + len(target_offsets)))

    def root(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for ranges_j, hits in enumerate(brute_force_ranges(source_offsets, target_offsets)):
        for i in hits:
            parent[root(len(source_offsets) + ranges_j)] = root(i)
    out = []
    for j in range(len(target_offsets)):
        members = [i for i in range(len(source_offsets)) if root(i) == root(len(source_offsets) + j)]
        total = 0.0
        for i in members:
            total += values[i]
        out.append(total / len(members) if members else None)
    return out


def brute_force_ranges(source_offsets, target_offsets):
    return [[i for i, (a, b) in enumerate(source_offsets)
             if ((a < d and c < b) if (a < b and c < d) else (a == b == c == d))] for c, d in target_offsets]


def random_values(n, seed):
    return np.random.default_rng(seed).normal(size=n).tolist()


def budget(scores, offsets):
    """The scores that compete for top-k: the closing token's (an empty last span) is left out
    (docs/design.md, Selection)."""
    return [*scores[:-1], None] if offsets[-1][0] == offsets[-1][1] else list(scores)


def scored(tokenizer, completion, id=0, k=0.5, seed=0, prompt=PROMPT):
    """A record as titok-score + titok-filter write it, with synthetic excess (no model run)."""
    enc = encode(tokenizer, prompt, completion)
    excess = random_values(len(enc.positions), seed)
    base = random_values(len(excess), seed + 1000)
    source = {"model": "source", "adapter": "lora", "adapter_sha256": "0" * 64,
              "tokenizer": tokenizer_fingerprint(tokenizer), "token_ids": enc.token_ids, "offsets": enc.offsets,
              "logp_expert": [b + e for b, e in zip(base, excess)], "logp_base": base, "excess": excess,
              "mean_excess": float(np.mean(excess)), "truncated": enc.truncated,
              "mask": topk_mask(budget(excess, enc.offsets), k)}
    return {"id": id, "prompt": prompt[0]["content"], "completion": completion,
            "titok": {"source": source, "filter": {"k": k, "keep": 1, "scope": "sample", "rank": id}}}


def check_against_reference(source_tok, target_tok, completion, seed=0):
    src = encode(source_tok, PROMPT, completion)
    tgt = encode(target_tok, PROMPT, completion)
    for offsets in (src.offsets, tgt.offsets):  # the sweep relies on ordered spans
        assert alignment.offsets_problem(offsets, len(completion)) is None, offsets
    values = random_values(len(src.offsets), seed)
    lo, hi = overlap_ranges(src.offsets, tgt.offsets, len(completion))
    assert [list(range(a, b)) for a, b in zip(lo.tolist(), hi.tolist())] == brute_force_ranges(src.offsets, tgt.offsets)
    assert align_values(src.offsets, values, tgt.offsets, len(completion)) == brute_force(src.offsets, values, tgt.offsets)
    mask = [int(v > 0) for v in values]
    assert (align_values(src.offsets, mask, tgt.offsets, len(completion), groups=True)
            == brute_force_groups(src.offsets, mask, tgt.offsets))
    return tgt


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_matches_brute_force_on_real_tokenizers(kind, smollm2_tokenizer, gemma_tokenizer):
    text = TEXTS[kind]
    for source, target in ((smollm2_tokenizer, gemma_tokenizer), (gemma_tokenizer, smollm2_tokenizer)):
        tgt = check_against_reference(source, target, text)
        # The closing tokens map to each other.
        src_values = random_values(len(encode(source, PROMPT, text).offsets), 0)
        assert align_values(encode(source, PROMPT, text).offsets, src_values, tgt.offsets, len(text))[-1] == src_values[-1]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=40), seed=st.integers(0, 100))
def test_matches_brute_force_on_random_unicode(text, seed, smollm2_tokenizer, gemma_tokenizer):
    assume(text.strip())
    try:
        check_against_reference(smollm2_tokenizer, gemma_tokenizer, text, seed)
        check_against_reference(gemma_tokenizer, smollm2_tokenizer, text, seed)
    except FormatError:
        assume(False)  # a template that rewrites this text is refused by encode, not our case


def test_paper_example_fractional_mask():
    # right|eou|sness with mask 1,0,1 onto righteous|ness: 2/3 and 2/3; closing tokens map 1:1.
    word = "righteousness"
    source = [[0, 5], [5, 8], [8, 13], [13, 13]]
    target = [[0, 9], [9, 13], [13, 13]]
    assert align_values(source, [1, 0, 1, 1], target, len(word), groups=True) == pytest.approx([2 / 3, 2 / 3, 1])
    assert brute_force_groups(source, [1, 0, 1, 1], target) == pytest.approx([2 / 3, 2 / 3, 1])
    # --from excess: each target token averages only the source tokens it overlaps
    assert align_values(source, [1, 0, 1, 1], target, len(word)) == pytest.approx([2 / 3, 1, 1])
    # one-to-many replicates; a target span no source token covers gets no score.
    assert align_values([[0, 9], [9, 9]], [0.5, 0.25], [[0, 3], [3, 9], [9, 9]], 9) == [0.5, 0.5, 0.25]
    assert align_values([[0, 4], [8, 9]], [1.0, 2.0], [[0, 4], [4, 8], [8, 9], [9, 9]], 9) == [1.0, None, 2.0, None]
    # groups end at shared boundaries: a|bc|d onto ab|cd is one group, x|y onto xy another
    assert align_values([[0, 1], [1, 3], [3, 4], [4, 5], [5, 6]], [1, 0, 0, 1, 0], [[0, 2], [2, 4], [4, 6]], 6,
                        groups=True) == [1 / 3, 1 / 3, 0.5]


def test_offsets_problems():
    assert alignment.offsets_problem([[0, 3], [3, 5], [5, 5]], 5) is None
    assert "outside" in alignment.offsets_problem([[0, 3], [3, 9]], 5)
    assert "order" in alignment.offsets_problem([[2, 3], [0, 5]], 5)
    assert "empty" in alignment.offsets_problem([[0, 0], [0, 5]], 5)
    assert "pairs" in alignment.offsets_problem([[0, 3, 1]], 5)
    assert "integer" in alignment.offsets_problem("nope", 5)
    # a completion made longer after scoring: every span fits, the closing one is not at the end
    assert alignment.offsets_problem([[0, 2], [2, 3], [3, 3]], 5) == ("close at 3, not at the completion's end (5): "
                                                                   "was it edited after scoring?")


offset_lists = st.lists(st.lists(st.integers(-1, 12), min_size=2, max_size=2), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(records=st.lists(st.tuples(offset_lists, st.integers(0, 12)), min_size=1, max_size=5))
def test_chunk_checks_agree_with_the_record_checks(records):
    """spans_problems (a chunk of records at once) rejects exactly the records offsets_problem
    rejects, whatever sits next to them in the chunk."""
    expected = [alignment.offsets_problem(offsets, length) is not None for offsets, length in records]
    counts = np.array([len(o) for o, _ in records])
    spans = stacked([o for o, _ in records])
    assert alignment.spans_problems(spans, np.array([length for _, length in records]), counts).tolist() == expected


def stacked(offset_lists):
    """Several records' offsets as one (n, 2) array, as titok-align lays a chunk's spans."""
    return np.array([pair for offsets in offset_lists for pair in offsets], dtype=np.int64).reshape(-1, 2)


@pytest.mark.parametrize("groups", [False, True])
def test_a_chunk_aligns_as_its_records_do_alone(groups, smollm2_tokenizer, gemma_tokenizer):
    """align_many lays the records end to end: each record's scores equal the brute-force
    reference on that record alone (closing tokens included)."""
    texts = list(TEXTS.values())
    sources = [encode(smollm2_tokenizer, PROMPT, t).offsets for t in texts]
    targets = [encode(gemma_tokenizer, PROMPT, t).offsets for t in texts]
    values = [random_values(len(s), i) for i, s in enumerate(sources)]
    if groups:
        values = [[float(v > 0) for v in vs] for vs in values]
    lengths = tuple(np.array(x) for x in ([len(t) for t in texts], [len(s) for s in sources],
                                          [len(t) for t in targets]))
    got = alignment.align_many(stacked(sources), np.concatenate(values), stacked(targets), lengths, groups=groups)
    reference = brute_force_groups if groups else brute_force
    assert got == [reference(s, v, t) for s, v, t in zip(sources, values, targets)]


def test_identity_same_tokenizer(smollm2_tokenizer):
    records = [scored(smollm2_tokenizer, text, i, seed=i) for i, text in enumerate(TEXTS.values())]
    sources = [json.loads(json.dumps(r["titok"]["source"])) for r in records]
    counts = {}
    out = list(align_records(((f"in:{i}", r) for i, r in enumerate(records)), smollm2_tokenizer, model="same",
                             k=0.3, counts=counts))
    for record, source in zip(out, sources):
        target = record["titok"]["target"]
        assert target["score"] == source["excess"]
        assert target["token_ids"] == source["token_ids"] and target["offsets"] == source["offsets"]
        assert target["coverage"] == 1.0
        assert target["mask"] == topk_mask(budget(source["excess"], source["offsets"]), 0.3)
        assert record["titok"]["source"] == source  # passes through unchanged
    assert counts["same_tokens"] == len(records)


def test_cross_family_records(smollm2_tokenizer, gemma_tokenizer):
    records = [scored(smollm2_tokenizer, text, i, seed=i) for i, text in enumerate(TEXTS.values())]
    out = list(align_records(((f"in:{i}", r) for i, r in enumerate(records)), gemma_tokenizer, model="gemma",
                             k=None, scope="batch"))
    scores = []
    for record in out:
        target, source = record["titok"]["target"], record["titok"]["source"]
        tgt = encode(gemma_tokenizer, PROMPT, record["completion"])
        assert target["token_ids"] == tgt.token_ids and target["offsets"] == tgt.offsets
        assert target["score"] == brute_force(source["offsets"], source["excess"], tgt.offsets)
        assert target["coverage"] == sum(s is not None for s in target["score"]) / len(target["score"])
        assert target["tokenizer"] == tokenizer_fingerprint(gemma_tokenizer) != source["tokenizer"]
        scores.append(budget(target["score"], target["offsets"]))
    # default k = the filter's; batch scope = groups of 4 records, the same rule as titok-filter
    masks = topk_masks(scores[:4], 0.5) + topk_masks(scores[4:], 0.5)
    assert [r["titok"]["target"]["mask"] for r in out] == masks


def test_whitespace_completion_trimmed_by_template(smollm2_tokenizer, gemma_tokenizer):
    # Gemma's template strips the completion: its untouched leading/trailing spaces get no token.
    text = TEXTS["whitespace"]
    [record] = align_records([("in:1", scored(smollm2_tokenizer, text))], gemma_tokenizer, model="g", k=0.5)
    target = record["titok"]["target"]
    assert target["offsets"][0][0] == 2 and target["score"][-1] == record["titok"]["source"]["excess"][-1]


NORMALIZERS = {  # a normalizer that changes the text, a text it changes in places, and which pieces it changes
    "lowercase": ("Lowercase", "Hello World, this is fine. ÉCOLE and école.", str.lower),
    "nfkc": ("NFKC", "The ﬁrst ① of ＡＢＣ, then plain text.", lambda piece: unicodedata.normalize("NFKC", piece)),
}


@pytest.fixture(scope="module", params=sorted(NORMALIZERS))
def normalizing_tokenizer(request, smollm2_dir, tmp_path_factory):
    """SmolLM2's tokenizer with a text-changing normalizer in front: it tokenizes a changed text."""
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    name, text, change = NORMALIZERS[request.param]
    base = load_tokenizer(smollm2_dir)
    backend = Tokenizer.from_str(base.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Sequence([getattr(normalizers, name)()])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=base.eos_token, bos_token=base.bos_token,
                                   pad_token=base.pad_token)
    fast.chat_template = base.chat_template
    directory = tmp_path_factory.mktemp(f"{request.param}-tokenizer")
    fast.save_pretrained(directory)
    return load_tokenizer(str(directory)), text, change


@pytest.mark.parametrize("form", ["dict", "line"])
def test_normalizer_that_changes_text(form, smollm2_tokenizer, normalizing_tokenizer, caplog):
    tokenizer, text, change = normalizing_tokenizer
    record = scored(smollm2_tokenizer, text, id="rec-7")
    excess, offsets = record["titok"]["source"]["excess"], record["titok"]["source"]["offsets"]
    counts = {}
    with caplog.at_level(logging.WARNING, logger="titok.align"):
        given = record if form == "dict" else JsonLine(orjson.dumps(record) + b"\n", 2)  # titok-align reads lines
        [out] = align_records([("in.jsonl:3", given)], tokenizer, model="normalizing", k=1.0, counts=counts)
    out = out if form == "dict" else orjson.loads(out)
    target = out["titok"]["target"]
    reference = brute_force(offsets, excess, target["offsets"])
    for (a, b), score, ref in zip(target["offsets"], target["score"], reference):
        piece = text[a:b]
        # a token whose text the normalizer changes gets no score; every other one is aligned as usual
        assert score == (None if change(piece) != piece else ref), piece
    changed = sum(1 for a, b in target["offsets"] if change(text[a:b]) != text[a:b])
    assert changed >= 3 and counts["normalized_records"] == 1 and counts["normalized_tokens"] == changed
    assert all(m == 0 for m, s in zip(target["mask"], target["score"]) if s is None)
    assert target["coverage"] == pytest.approx(1 - changed / len(target["score"]))
    assert "in.jsonl:3" in caplog.text and "rec-7" in caplog.text
    # A text the normalizer leaves alone aligns fully.
    [clean] = align_records([("x:1", scored(smollm2_tokenizer, "all lower case here."))], tokenizer,
                            model="normalizing", k=0.5)
    assert clean["titok"]["target"]["coverage"] == 1.0


# --- the command -------------------------------------------------------------------------------

def run(args, input_path=None):
    result = CliRunner().invoke(main, args + ([str(input_path)] if input_path else []), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def gemma_scored(gemma_tokenizer, tmp_path_factory):
    """Records scored (synthetically) on Gemma's tokens, to align onto SmolLM2 (quick to load)."""
    records = [scored(gemma_tokenizer, text, i, k=0.4, seed=i) for i, text in enumerate(TEXTS.values())]
    return write_jsonl(tmp_path_factory.mktemp("scored") / "scored.jsonl", records), records


def test_cli_aligns_and_selects(gemma_scored, smollm2_dir, smollm2_tokenizer, tmp_path):
    path, records = gemma_scored
    result = run(["--target-model", smollm2_dir, "--scope", "global", "-o", str(tmp_path / "out.jsonl")], path)
    assert result.exit_code == 0, result.output
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [r["id"] for r in records]
    scores = []
    for record, original in zip(out, records):
        target = record["titok"]["target"]
        tgt = encode(smollm2_tokenizer, PROMPT, record["completion"])
        source = original["titok"]["source"]
        assert target["score"] == brute_force(source["offsets"], source["excess"], tgt.offsets)
        assert target["model"] == smollm2_dir
        assert {k: v for k, v in record.items() if k != "titok"} == {k: v for k, v in original.items() if k != "titok"}
        scores.append(budget(target["score"], target["offsets"]))
    # global scope: one threshold over all records, k from titok-filter (0.4)
    assert [r["titok"]["target"]["mask"] for r in out] == topk_masks(scores, 0.4)
    total = sum(v is not None for s in scores for v in s)  # unscored tokens do not count
    assert sum(sum(r["titok"]["target"]["mask"]) for r in out) == n_select(total, 0.4)
    assert "aligned 6 records" in result.stderr and "coverage" in result.stderr


def test_cli_from_mask_shard_and_k(gemma_scored, smollm2_dir, smollm2_tokenizer):
    path, records = gemma_scored
    result = run(["--target-model", smollm2_dir, "--from", "mask", "-k", "0.2", "--shard", "0/2"], path)
    assert result.exit_code == 0, result.output
    out = read_jsonl(result.stdout.encode())
    assert [r["id"] for r in out] == [0, 2, 4]
    differs = 0
    for record in out:
        target, source = record["titok"]["target"], records[record["id"]]["titok"]["source"]
        tgt = encode(smollm2_tokenizer, PROMPT, record["completion"])
        assert target["score"] == brute_force_groups(source["offsets"], source["mask"], tgt.offsets)
        assert target["mask"] == topk_mask(budget(target["score"], target["offsets"]), 0.2)
        differs += target["score"] != brute_force(source["offsets"], source["mask"], tgt.offsets)
    assert differs  # these records tell the paper's groups from per-token means: --from mask reaches the groups


@pytest.mark.parametrize("scope", ["global", "batch", "sample"])
def test_records_titok_filter_did_not_keep_pass_through(scope, gemma_scored, smollm2_dir, tmp_path):
    # titok-filter --mark-only writes the dropped records too (kept: false, no mask): they pass
    # through untouched and stay out of the selection, which a global threshold would feel, and
    # a batch group would too if they took places in it (groups of 4 kept records, as titok-filter's)
    import copy
    path, records = gemma_scored
    target = ["--target-model", smollm2_dir, "--scope", scope]
    kept_only = read_jsonl(run(target, path).stdout.encode())
    dropped = []
    for i in (0, 3):
        record = copy.deepcopy(records[i])
        record["id"] = f"dropped-{i}"
        record["titok"]["filter"]["kept"] = False
        del record["titok"]["source"]["mask"]
        record["titok"]["source"]["excess"] = [10.0] * len(record["titok"]["source"]["excess"])  # would win every slot
        record["titok"]["target"] = {"stale": True}
        dropped.append(record)
    marked = records[:2] + [dropped[0]] + records[2:5] + [dropped[1]] + records[5:]
    marked_path = write_jsonl(tmp_path / "marked.jsonl", marked)
    for use in ("excess", "mask"):
        result = run(target + ["--from", use], marked_path)
        assert result.exit_code == 0, result.output
        out = read_jsonl(result.stdout.encode())
        assert [r["id"] for r in out] == [r["id"] for r in marked]
        passed = [r for r in out if str(r["id"]).startswith("dropped")]
        assert [r["titok"] for r in passed] == [{k: v for k, v in d["titok"].items() if k != "target"} for d in dropped]
        if use == "excess":
            assert [r for r in out if r not in passed] == kept_only
    assert "2 records titok-filter did not keep passed through" in result.stderr
    # no record kept at all: they all pass through (a global selection over nothing)
    result = run(target, write_jsonl(tmp_path / "dropped.jsonl", dropped))
    assert result.exit_code == 0, result.output
    assert [r["titok"] for r in read_jsonl(result.stdout.encode())] == [
        {k: v for k, v in d["titok"].items() if k != "target"} for d in dropped]


def test_shards_select_alone_only_per_sample(gemma_scored, smollm2_dir):
    path, _ = gemma_scored
    for scope in ("batch", "global"):
        result = CliRunner().invoke(main, ["--target-model", smollm2_dir, "--scope", scope, "--shard", "0/2", path])
        assert result.exit_code == 2 and "--shard selects per shard: use --scope sample" in result.output
    whole = CliRunner().invoke(main, ["--target-model", smollm2_dir, "--scope", "global", "--shard", "0/1", path])
    assert whole.exit_code == 0 and whole.stdout == run(["--target-model", smollm2_dir, "--scope", "global"], path).stdout


def test_cli_plain_format_and_max_length(gemma_scored, smollm2_dir, smollm2_tokenizer):
    path, records = gemma_scored
    result = run(["--target-model", smollm2_dir, "--no-chat-template", "--max-length", "5", "-k", "1"], path)
    assert result.exit_code == 0, result.output
    out = read_jsonl(result.stdout.encode())
    for record in out:
        target = record["titok"]["target"]
        tgt = encode(smollm2_tokenizer, PROMPT, record["completion"], chat_template=False, max_length=5)
        assert target["token_ids"] == tgt.token_ids and len(target["score"]) == 5 and target["truncated"]
    assert "6 completions truncated" in result.stderr


def test_cli_chat_template_file(gemma_gguf, smollm2_tokenizer, tmp_path):
    # A base model without a template (Gemma GGUF) gets one from a file: the target's own format.
    gemma = load_tokenizer(gemma_gguf, GEMMA_TEMPLATE)
    path = write_jsonl(tmp_path / "in.jsonl", [scored(smollm2_tokenizer, TEXTS["accented"], k=0.5)])
    result = run(["--target-model", gemma_gguf, "--chat-template", GEMMA_TEMPLATE], path)
    assert result.exit_code == 0, result.output
    [record] = read_jsonl(result.stdout.encode())
    assert record["titok"]["target"]["token_ids"] == encode(gemma, PROMPT, TEXTS["accented"]).token_ids
    assert gemma.convert_ids_to_tokens(record["titok"]["target"]["token_ids"][-1]) == "<end_of_turn>"


def bad_records(smollm2_tokenizer):
    good = scored(smollm2_tokenizer, "A fine completion.", id="good")
    unscored = {"id": "raw", "prompt": "p", "completion": "c"}
    edited = scored(smollm2_tokenizer, "A completion that was longer.", id="edited")
    edited["completion"] = "A completion"
    return good, unscored, edited


def test_bad_input(smollm2_dir, smollm2_tokenizer, tmp_path):
    good, unscored, edited = bad_records(smollm2_tokenizer)
    target = ["--target-model", smollm2_dir, "-k", "0.5"]
    result = run(target + ["-o", str(tmp_path / "out.jsonl")], write_jsonl(tmp_path / "a.jsonl", [good, unscored]))
    assert result.exit_code == 1
    assert f"{tmp_path / 'a.jsonl'}:2: titok.source: missing: run titok-score first" in result.output
    assert not os.path.exists(tmp_path / "out.jsonl")  # nothing half-written

    result = run(target, write_jsonl(tmp_path / "b.jsonl", [edited]))
    assert result.exit_code == 1
    assert "b.jsonl:1: titok.source.offsets: record 'edited'" in result.output and "completion" in result.output

    no_mask = scored(smollm2_tokenizer, "Fine.", id="nm")
    del no_mask["titok"]["source"]["mask"]
    result = run(target + ["--from", "mask"], write_jsonl(tmp_path / "c.jsonl", [no_mask]))
    assert result.exit_code == 1 and "titok.source.mask: missing: run titok-filter first" in result.output

    del no_mask["titok"]["filter"]
    result = run(["--target-model", smollm2_dir], write_jsonl(tmp_path / "d.jsonl", [no_mask]))
    assert result.exit_code == 1 and "d.jsonl:1: titok.filter.k: missing: pass -k" in result.output
    no_mask["titok"]["filter"] = None
    result = run(["--target-model", smollm2_dir], write_jsonl(tmp_path / "d.jsonl", [no_mask]))
    assert result.exit_code == 1 and "d.jsonl:1: titok.filter.k: missing: pass -k" in result.output

    nan = scored(smollm2_tokenizer, "Fine.", id="nan")
    nan["titok"]["source"]["excess"][0] = None
    result = run(target, write_jsonl(tmp_path / "e.jsonl", [nan]))
    assert result.exit_code == 1 and "titok.source.excess[0]: record 'nan': must be a number, not null" in result.output

    # numpy would read 1.5 as 1 and "1.5" as 1.5: these are errors, not numbers to guess at
    for field, value, message in (("offsets", [0, 1.5], "not a non-empty list of [start, end] integer pairs"),
                                  ("offsets", ["0", "2"], "not a non-empty list of [start, end] integer pairs"),
                                  ("excess", "1.5", 'must be a number, not "1.5"')):
        odd = scored(smollm2_tokenizer, "Fine.", id="odd")
        odd["titok"]["source"][field][0] = value
        result = run(target, write_jsonl(tmp_path / "odd.jsonl", [good, odd]))
        assert result.exit_code == 1 and f"odd.jsonl:2: titok.source.{field}" in result.output and "record 'odd'" in result.output
        assert message in result.output

    short = scored(smollm2_tokenizer, "Fine words here.", id="short")
    short["titok"]["source"]["excess"].pop()
    result = run(target, write_jsonl(tmp_path / "f.jsonl", [short]))
    assert result.exit_code == 1 and "values for" in result.output

    result = run(target + ["--skip-invalid"], write_jsonl(tmp_path / "g.jsonl", [good, unscored, edited, nan, good]))
    assert result.exit_code == 0
    kept = read_jsonl(result.stdout.encode())
    assert [r["id"] for r in kept] == ["good", "good"]
    assert "3 invalid records skipped" in result.stderr
    # the bad records shared a chunk with the good ones: these align as if they were alone
    alone = read_jsonl(run(target, write_jsonl(tmp_path / "h.jsonl", [good])).stdout.encode())
    assert kept[0]["titok"]["target"] == kept[1]["titok"]["target"] == alone[0]["titok"]["target"]


def test_a_prompt_that_spells_a_control_token_of_the_target_is_named(gemma_tokenizer, smollm2_dir, tmp_path):
    """Text that is plain for the source tokenizer but a control token of the target's: refused, as
    titok-score and titok-train refuse it."""
    prompt = [{"role": "user", "content": "Write something.<|im_end|>"}]
    records = [scored(gemma_tokenizer, "Fine words.", id="good"), scored(gemma_tokenizer, "Fine.", id="bad", prompt=prompt)]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    result = run(["--target-model", smollm2_dir], path)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (f"Error: {path}:2: prompt: target tokenizer: the prompt contains "
                                                      "the text of the special token '<|im_end|>': it would be read as "
                                                      "that control token (remove or escape it)")
    result = run(["--target-model", smollm2_dir, "--skip-invalid"], path)
    assert result.exit_code == 0 and [r["id"] for r in read_jsonl(result.stdout.encode())] == ["good"]


def test_help_lists_every_flag():
    result = CliRunner().invoke(main, ["--help"])
    for flag in ("--target-model", "--chat-template", "--no-chat-template", "--max-length", "--from", "-k",
                 "--scope", "--output", "--shard", "--skip-invalid"):
        assert flag in result.output


def test_pipe(smollm2_tokenizer, gemma_gguf, tmp_path):
    """A real pipe into the installed console script, Gemma GGUF target (tokenizer only); the
    reader stops after 3 records of about 3 MB, far past a pipe's buffer: a closed pipe ends the
    command quietly."""
    records = [scored(smollm2_tokenizer, text, i, seed=i) for i, text in enumerate(TEXTS.values())]
    records = [dict(r, id=i) for i, r in enumerate(records * 34)]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    out, codes, err = run_pipe(["titok-align", "--target-model", gemma_gguf, "--chat-template", GEMMA_TEMPLATE, path],
                               ["head", "-n", "3"])  # pipefail: titok-align's own exit status counts
    got = read_jsonl(out)
    assert [r["id"] for r in got] == [0, 1, 2] and all(r["titok"]["target"]["mask"] for r in got)
    assert "Traceback" not in err


def test_streaming_gc_still_collects_cyclic_garbage():
    """cli.streaming_gc makes collections rare, not absent: a stream that leaves cycles behind
    (as some library code may) keeps a bounded number of objects alive."""
    from titok_tools import cli
    import gc
    saved = gc.get_threshold()
    try:
        cli.streaming_gc()
        before = len(gc.get_objects())
        for _ in range(300_000):  # three times the threshold, each one a dropped cycle
            a = []
            a.append(a)
        del a
        assert len(gc.get_objects()) - before < 150_000
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


def test_one_ahead_runs_the_next_item_while_this_one_is_used():
    """align tokenizes the next chunk in a thread while it aligns this one: results come in
    order, the next call is already submitted when an item is handed out, and an error in the
    thread is raised where its item would have come."""
    from concurrent.futures import ThreadPoolExecutor
    import threading

    started, release = {i: threading.Event() for i in range(4)}, {i: threading.Event() for i in range(4)}

    def work(i):
        started[i].set()
        release[i].wait(5)
        if i == 3:
            raise ValueError("item 3")
        return i * i

    def release_all():
        for event in release.values():
            event.set()

    with ThreadPoolExecutor(1) as pool:
        items = align.one_ahead(lambda i: pool.submit(work, i).result, range(4))
        release[0].set()
        assert next(items) == (0, 0)
        assert started[1].wait(5)         # item 1 runs while the caller holds item 0
        assert not started[2].is_set()    # and no further ahead
        release_all()
        assert [next(items), next(items)] == [(1, 1), (2, 4)]
        with pytest.raises(ValueError, match="item 3"):
            next(items)


@pytest.mark.parametrize("scope", ["sample", "batch"])
def test_chunk_size_changes_nothing(scope, smollm2_tokenizer, gemma_tokenizer, monkeypatch):
    """Records go through in chunks of about CHUNK_TOKENS source tokens, the next chunk tokenized
    in a thread: one record per chunk, a few, or all at once give the same output, in input order,
    with records titok-filter did not keep and bad ones (--skip-invalid) anywhere."""
    words = "the quick brown fox jumps over a lazy dog while naïve 東京 emoji 🦊 wait".split()
    records = []
    for i in range(23):
        record = scored(smollm2_tokenizer, " ".join(words[j % len(words)] for j in range(i, i + 3 + i % 7)), id=i, seed=i)
        if i % 5 == 2:
            record["titok"]["filter"]["kept"] = False
        if i % 7 == 3:
            record["titok"]["source"]["excess"] = None  # invalid: skipped, unless not kept (17: passes through)
        records.append(record)
    not_kept = {i for i in range(23) if i % 5 == 2}
    invalid = {i for i in range(23) if i % 7 == 3} - not_kept

    def aligned(chunk_tokens):
        monkeypatch.setattr(align, "CHUNK_TOKENS", chunk_tokens)
        counts = {}
        pairs = ((f"in.jsonl:{i + 1}", json.loads(json.dumps(r))) for i, r in enumerate(records))
        out = list(align_records(pairs, gemma_tokenizer, model="gemma", scope=scope, skip_invalid=True, counts=counts))
        return out, counts

    whole, counts = aligned(10 ** 9)
    assert [r["id"] for r in whole] == [i for i in range(23) if i not in invalid] and counts["invalid"] == 2
    assert [r["id"] for r in whole if "target" not in r["titok"]] == sorted(not_kept)
    for chunk_tokens in (1, 5, 40):
        assert aligned(chunk_tokens) == (whole, counts)


@pytest.mark.parametrize("chunk_tokens", [1, 30, 10 ** 9])
def test_the_first_bad_record_is_reported_first(chunk_tokens, smollm2_tokenizer, gemma_tokenizer, monkeypatch):
    """Chunks are read ahead, and some problems show when a record is read (a missing field),
    others only when its chunk is aligned (offsets out of order): the error names the first bad
    line either way."""
    monkeypatch.setattr(align, "CHUNK_TOKENS", chunk_tokens)
    records = [scored(smollm2_tokenizer, f"Record number {i} says hello.", id=i, seed=i) for i in range(40)]
    records[10]["titok"]["source"]["offsets"].reverse()  # found when its chunk is aligned
    records[12]["titok"]["source"]["excess"] = None       # found when it is read (the same chunk or the next)
    pairs = ((f"in.jsonl:{i + 1}", r) for i, r in enumerate(records))
    with pytest.raises(align.RecordError, match="in.jsonl:11: titok.source.offsets"):
        list(align_records(pairs, gemma_tokenizer, model="gemma"))


def spy_chunk_sizes(monkeypatch):
    """The number of records in each chunk align_records makes."""
    chunk_sizes, batched = [], align.batched

    def spy(items, tokens, size):
        for chunk in batched(items, tokens, size):
            chunk_sizes.append(len(chunk))
            yield chunk

    monkeypatch.setattr(align, "batched", spy)
    return chunk_sizes


def test_records_passed_through_weigh_their_source_tokens(smollm2_tokenizer, gemma_tokenizer, monkeypatch):
    """A chunk holds about CHUNK_TOKENS source tokens, records titok-filter did not keep included
    (they carry their source lists too): a long run of them is not one huge chunk."""
    chunk_sizes = spy_chunk_sizes(monkeypatch)
    records = [scored(smollm2_tokenizer, "Ten words or so of text that are not kept here.", id=i) for i in range(12)]
    for record in records[1:]:
        record["titok"]["filter"]["kept"] = False
    tokens = len(records[0]["titok"]["source"]["offsets"])
    monkeypatch.setattr(align, "CHUNK_TOKENS", 3 * tokens)
    out = list(align_records(((str(i), r) for i, r in enumerate(records)), gemma_tokenizer, model="gemma"))
    assert [r["id"] for r in out] == list(range(12)) and chunk_sizes == [3, 3, 3, 3]


def test_present_but_wrong_fields_are_not_called_missing(smollm2_dir, smollm2_tokenizer, tmp_path):
    record = scored(smollm2_tokenizer, "Fine.", id="w")
    record["titok"]["source"]["excess"] = "abc"
    result = run(["--target-model", smollm2_dir, "-k", "0.5"], write_jsonl(tmp_path / "a.jsonl", [record]))
    assert result.exit_code == 1 and "a.jsonl:1: titok.source.excess: must be a list of numbers" in result.output
    for k, shown in ((5, "5"), ("x", '"x"'), (True, "true")):
        record = scored(smollm2_tokenizer, "Fine.", id="w")
        record["titok"]["filter"]["k"] = k
        result = run(["--target-model", smollm2_dir], write_jsonl(tmp_path / "b.jsonl", [record]))
        assert result.exit_code == 1
        assert f"b.jsonl:1: titok.filter.k: must be a number in (0, 1], not {shown}: pass -k" in result.output


def test_scores_past_float_range_average_without_overflow():
    # two source tokens of 1.7e308 onto one target token: their sum is inf (written as null by
    # orjson, yet selected); the mean is 1.7e308
    big = 1.7e308
    assert align_values([[0, 2], [2, 4], [4, 4]], [big, big, -big], [[0, 4], [4, 4]], 4) == [big, -big]
    assert align_values([[0, 2], [2, 4], [4, 4]], [big, -big, 1.0], [[0, 4], [4, 4]], 4) == [0.0, 1.0]
    assert align_values([[0, 1], [1, 2], [2, 2]], [big, big, 0.0], [[0, 2], [2, 2]], 2, groups=True) == [big, 0.0]
    biggest = np.finfo(np.float64).max  # a third of it, rounded, times three passes it
    assert align_values([[0, 1], [1, 2], [2, 3], [3, 3]], [biggest] * 3 + [0.0], [[0, 3], [3, 3]], 3) == [biggest, 0.0]


# --- JSON lines, read lazily: the command's path ---------------------------------------------

def as_lines(texts):
    return [(f"in.jsonl:{i + 1}", JsonLine(text, i)) for i, text in enumerate(texts)]


def spy_lazily(monkeypatch):
    """Whether read_lazily took each line (True) or handed it to the full parse (False)."""
    taken, original = [], align.read_lazily

    def spy(parser, text, use, fingerprint):
        result = original(parser, text, use, fingerprint)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(align, "read_lazily", spy)
    return taken


def mixed_lines(smollm2_tokenizer, gemma_tokenizer):
    """Lines of every kind align_records meets, and whether each can take the fast path."""
    words = "Some words, naïve 東京 🦊 and more words here".split()
    records = [scored(smollm2_tokenizer, " ".join(words[i % 5:]), id=i, seed=i) for i in range(10)]
    conversation = records[1]  # TRL's messages instead of prompt + completion
    records[1] = {"id": 1, "messages": [{"role": "user", "content": conversation["prompt"]},
                                        {"role": "assistant", "content": conversation["completion"]}],
                  "titok": conversation["titok"]}
    records[2]["titok"]["filter"]["kept"] = False
    del records[3]["id"]                                                   # the full parse numbers it
    records[4] = scored(smollm2_tokenizer, "Braces {like} these } close", id=4)
    records[4] = {"titok": records[4].pop("titok"), **records[4]}          # titok not last
    records[5]["titok"]["target"] = {"score": [1.0]}                       # from an earlier run
    records[6]["titok"]["filter"]["kept"] = False
    records[6]["titok"]["target"] = {"score": [1.0]}
    records[7] = scored(gemma_tokenizer, records[7]["completion"], id=7)   # the target's own tokens
    records[8] = {"id": 8, "meta": {"big": 1.0e300, "name": "é"}, **{k: v for k, v in records[8].items() if k != "id"}}
    texts = [orjson.dumps(r) + b"\n" for r in records]
    stale = {**records[9]["titok"], "filter": {**records[9]["titok"]["filter"], "k": 0.9}}
    texts[9] = b'{"titok": ' + orjson.dumps(stale) + b", " + texts[9][1:]  # a repeated key: the last one holds
    texts[2] = texts[2].rstrip() + b" \r\n"
    # an escaped é and 1e300 spelled as no orjson version writes them (3.8: 1e300, 3.13: 1e+300): bytes to keep
    texts[8] = texts[8].replace("é".encode(), b"\\u00e9").replace(orjson.dumps(1.0e300), b"1.0E+300").rstrip() + b"\r\n"
    assert b"1.0E+300" in texts[8] and b"\\u00e9" in texts[8]
    return texts, [True, True, True, False, False, False, False, False, True, False]


@pytest.mark.parametrize("scope, use", [("sample", "excess"), ("batch", "excess"), ("global", "excess"),
                                        ("sample", "mask")])
def test_lines_align_as_dicts_do(scope, use, smollm2_tokenizer, gemma_tokenizer, monkeypatch):
    """align_records on JSON lines (titok-align's path: the fields it reads taken straight from
    each line, its target part spliced in) gives the records it gives on the parsed dicts; lines
    it cannot take that way (no id, titok not last, a target of an earlier run, a repeated key,
    the target's own tokens) go through the full parse. Fields it does not own keep their bytes."""
    texts, fast = mixed_lines(smollm2_tokenizer, gemma_tokenizer)
    taken = spy_lazily(monkeypatch)
    counts = {}
    out = list(align_records(as_lines(texts), gemma_tokenizer, model="g", scope=scope, use=use, counts=counts))
    assert taken == fast and all(isinstance(line, bytes) and line.endswith(b"}\n") for line in out)
    dicts = [parse_line(where, line) for where, line in as_lines(texts)]
    expected = list(align_records(zip([w for w, _ in as_lines(texts)], dicts), gemma_tokenizer, model="g",
                                  scope=scope, use=use, counts=(dict_counts := {})))
    assert [orjson.loads(line) for line in out] == expected and counts == dict_counts
    assert [r["id"] for r in expected] == list(range(10)) and expected[5]["titok"]["target"]["score"] != [1.0]
    assert [("target" in r["titok"]) for r in expected] == [i not in (2, 6) for i in range(10)]
    assert [line.count(b'"target"') for line in out] == [i not in (2, 6) for i in range(10)]  # none left over
    assert out[2] == texts[2].rstrip() + b"\n"  # not kept: passed through as it came
    assert [line.count(b'"titok"') for line in out] == [1] * 10  # a line read whole is written with one
    for i in (0, 1, 8):        # up to titok's closing brace, the line as it came
        titok_end = texts[i].rindex(b"}", 0, texts[i].rindex(b"}"))
        assert out[i].startswith(texts[i][:titok_end] + b',"target":{')
    assert b'"name":"\\u00e9"' in out[8] and b'"big":1.0E+300' in out[8]


def test_read_lazily_hands_what_it_cannot_check_to_the_full_parse(smollm2_dir, smollm2_tokenizer, tmp_path):
    """Shapes that simdjson's flat buffers would hide (ragged or nested pairs, nested values),
    other types, and lines it reads differently from orjson go to the full parse, whose checks
    name the field; the parser is free again after each."""
    parser = simdjson.Parser()
    good = scored(smollm2_tokenizer, "Some fine words.", id="x")
    record, spans, values = lazy_records.read_lazily(parser, orjson.dumps(good), "excess", "another tokenizer")
    source = good["titok"]["source"]
    assert record == {"id": "x", "prompt": good["prompt"], "completion": good["completion"],
                      "titok": {"filter": good["titok"]["filter"], "source": {"tokenizer": source["tokenizer"]}}}
    assert spans.tolist() == source["offsets"] and values.tolist() == source["excess"]

    def variant(change):
        record = json.loads(json.dumps(good))
        change(record["titok"]["source"])
        return orjson.dumps(record)

    (a, b), (c, d) = source["offsets"][:2]
    broken = {
        "ragged pairs": variant(lambda s: s["offsets"].__setitem__(slice(0, 2), [[a, b, c], [d]])),
        "nested pair": variant(lambda s: s["offsets"].__setitem__(0, [a, [b]])),
        "flat offsets": variant(lambda s: s.__setitem__("offsets", [x for pair in s["offsets"] for x in pair])),
        "float offset": variant(lambda s: s["offsets"][0].__setitem__(1, 1.5)),
        "no offsets": variant(lambda s: s.update(offsets=[], excess=[])),
        "nested value": variant(lambda s: s["excess"].__setitem__(0, [s["excess"][0]])),
        "bool value": variant(lambda s: s["excess"].__setitem__(0, True)),
        "null value": variant(lambda s: s["excess"].__setitem__(0, None)),
        "text value": variant(lambda s: s["excess"].__setitem__(0, "1.5")),
        "short values": variant(lambda s: s["excess"].pop()),
        "no source": orjson.dumps({**good, "titok": {"filter": good["titok"]["filter"]}}),
        "titok not an object": orjson.dumps({**good, "titok": "x"}),
        "an array": b"[1, 2]",
        "a byte-order mark": b"\xef\xbb\xbf" + orjson.dumps(good),
        "an id below -2**63": orjson.dumps(good).replace(b'"id":"x"', b'"id":-9223372036854775809'),
        "an integer past 2**64": orjson.dumps(good).replace(b'"id":"x"', b'"id":123456789012345678901234567890'),
        # simdjson looks up the first of a repeated key, orjson keeps the last
        "a repeated source key": orjson.dumps(good).replace(b'"excess":', b'"excess":[true],"excess":'),
    }
    for name, text in broken.items():
        assert lazy_records.read_lazily(parser, text, "excess", "another tokenizer") is None, name
    assert lazy_records.read_lazily(parser, orjson.dumps(good), "excess", source["tokenizer"]) is None  # same tokenizer
    assert lazy_records.read_lazily(parser, orjson.dumps(good), "mask", "another")[2].tolist() == source["mask"]

    target = ["--target-model", smollm2_dir, "-k", "0.5"]
    for name, message in (("ragged pairs", "titok.source.offsets: record 'x': the offsets are not a non-empty list"),
                          ("nested value", "titok.source.excess[0]: record 'x': must be a number, not ["),
                          ("a byte-order mark", "in.jsonl:1: invalid JSON")):
        (tmp_path / "in.jsonl").write_bytes(broken[name] + b"\n")
        result = run(target, tmp_path / "in.jsonl")
        assert result.exit_code == 1 and message in result.output, (name, result.output)


@pytest.mark.parametrize("scope", ["sample", "global"])
def test_lines_stream_in_chunks_in_input_order(scope, smollm2_tokenizer, gemma_tokenizer, monkeypatch):
    """As test_chunk_size_changes_nothing, on lines: any chunk size gives the same lines, with
    records passed through, bad ones skipped (--skip-invalid) and the first bad one reported."""
    records = [scored(smollm2_tokenizer, f"Record number {i} says hello.", id=i, seed=i) for i in range(30)]
    for i in range(0, 30, 4):
        records[i]["titok"]["filter"]["kept"] = False
    records[9]["titok"]["source"]["offsets"].reverse()  # found when its chunk is aligned
    records[13]["titok"]["source"]["excess"] = None      # found when it is read
    texts = [orjson.dumps(r) + b"\n" for r in records]

    def aligned(chunk_tokens, skip_invalid=True):
        monkeypatch.setattr(align, "CHUNK_TOKENS", chunk_tokens)
        counts = {}
        out = list(align_records(as_lines(texts), gemma_tokenizer, model="g", scope=scope, skip_invalid=skip_invalid,
                                 counts=counts))
        return out, counts

    whole, counts = aligned(10 ** 9)
    assert [orjson.loads(line)["id"] for line in whole] == [i for i in range(30) if i not in (9, 13)]
    assert counts["invalid"] == 2 and counts["not_kept"] == 8
    for chunk_tokens in (1, 7, 60):
        assert aligned(chunk_tokens) == (whole, counts)
        with pytest.raises(align.RecordError, match="in.jsonl:10: titok.source.offsets"):
            aligned(chunk_tokens, skip_invalid=False)


def test_lines_passed_through_weigh_about_their_tokens(smollm2_tokenizer, gemma_tokenizer, monkeypatch):
    chunk_sizes = spy_chunk_sizes(monkeypatch)
    records = [scored(smollm2_tokenizer, "Ten words or so of text that are not kept here.", id=i) for i in range(12)]
    for record in records:
        record["titok"]["filter"]["kept"] = False
    texts = [orjson.dumps(r) + b"\n" for r in records]
    tokens = len(records[0]["titok"]["source"]["offsets"])
    assert tokens / 2 < len(texts[0]) / 64 < tokens * 2  # a scored line holds about 64 bytes a token
    monkeypatch.setattr(align, "CHUNK_TOKENS", 3 * (1 + len(texts[0]) // 64))
    assert list(align_records(as_lines(texts), gemma_tokenizer, model="g")) == texts
    assert chunk_sizes == [3, 3, 3, 3]


def test_shards_count_only_the_lines_that_are_records(gemma_scored, smollm2_dir, tmp_path):
    """--shard I/N takes every N-th record, counting only the lines that are JSON objects (as
    every stage and titok-merge --by-id count them); a line that is not one is reported in every
    shard, or skipped and counted with --skip-invalid. An integer past 64 bits (simdjson refuses
    it, orjson reads it) still makes a record."""
    path, records = gemma_scored
    lines = open(path, "rb").read().splitlines()
    huge = lines[3].replace(b'"id":3', b'"id":123456789012345678901234567890')
    assert huge != lines[3]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join([lines[0], b"not json", lines[1], b"[1]", lines[2], huge,
                                                     lines[4], lines[5]]) + b"\n")
    target = ["--target-model", smollm2_dir, "--skip-invalid"]
    ids = []
    for shard in ("0/2", "1/2"):
        result = run(target + ["--shard", shard], tmp_path / "in.jsonl")
        assert result.exit_code == 0 and "2 invalid records skipped" in result.stderr, result.output
        ids.append([r["id"] for r in read_jsonl(result.stdout.encode())])
    assert ids == [[0, 2, 4], [1, 1.2345678901234568e+29, 5]]
    result = run(["--target-model", smollm2_dir, "--shard", "1/2"], tmp_path / "in.jsonl")
    assert result.exit_code == 1 and "in.jsonl:2: invalid JSON" in result.output


def test_a_key_repeated_in_the_source_reads_as_orjson_reads_it(smollm2_dir, tmp_path):
    """orjson keeps the last of a repeated key, simdjson's lookup finds the first: such lines take
    the full parse, so titok-align reads them as every other stage does (the last copy)."""
    head = b'{"id":%d,"prompt":"Hi","completion":"ab","titok":{"filter":{"k":0.5},"source":{'
    lines = [head % 0 + b'"offsets":[[0,2],[2,2]],"excess":[9.0,9.0],"excess":[1.0,2.0]}}}',
             head % 1 + b'"offsets":[[0,9],[9,9]],"offsets":[[0,2],[2,2]],"excess":[1.0,2.0]}}}',
             head % 2 + b'"offsets":[[0,2],[2,2]],"excess":[1.0,2.0],"excess":[true,2.0]}}}']
    for i, line in enumerate(lines):  # one file each: a bad record in a chunk has every record checked whole
        (tmp_path / f"{i}.jsonl").write_bytes(line + b"\n")
        result = run(["--target-model", smollm2_dir], tmp_path / f"{i}.jsonl")
        if i == 2:
            assert result.exit_code == 1
            assert "2.jsonl:1: titok.source.excess[0]: record 2: must be a number, not true" in result.output
            continue
        assert result.exit_code == 0, result.output
        [target] = [r["titok"]["target"] for r in read_jsonl(result.stdout.encode())]
        assert target["score"] == brute_force([[0, 2], [2, 2]], [1.0, 2.0], target["offsets"])


# --- top-N distributions (titok-score --topk) onto the target vocabulary -------------------------

def brute_one_to_one(source_offsets, target_offsets):
    """The mutually unique overlaps, pair by pair (brute_force_ranges both ways)."""
    forward = brute_force_ranges(source_offsets, target_offsets)
    backward = brute_force_ranges(target_offsets, source_offsets)
    return [run[0] if len(run) == 1 and backward[run[0]] == [j] else -1 for j, run in enumerate(forward)]


def test_one_to_one_by_hand():
    # source ab|cde|f|<close>, target ab|c|de|f|<close>: "cde" overlaps two target tokens
    source, target = [[0, 2], [2, 5], [5, 6], [6, 6]], [[0, 2], [2, 3], [3, 5], [5, 6], [6, 6]]
    assert alignment.one_to_one(source, target, 6).tolist() == [0, -1, -1, 2, 3] == brute_one_to_one(source, target)
    # two source tokens inside one target token: neither pairs
    assert alignment.one_to_one(target, source, 6).tolist() == [0, -1, 3, 4] == brute_one_to_one(target, source)


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_one_to_one_matches_brute_force_on_real_tokenizers(kind, smollm2_tokenizer, gemma_tokenizer):
    text = TEXTS[kind]
    src, tgt = encode(smollm2_tokenizer, PROMPT, text), encode(gemma_tokenizer, PROMPT, text)
    assert alignment.one_to_one(src.offsets, tgt.offsets, len(text)).tolist() == brute_one_to_one(src.offsets, tgt.offsets)


def with_topk(record, n_top=4, seed=0, vocab=49152, extra_ids=()):
    """The record with synthetic top-N distributions (ids distinct per token, log-probs descending)."""
    rng = np.random.default_rng(seed)
    source = record["titok"]["source"]
    ids, logp = [], []
    for _ in source["token_ids"]:
        row = [int(i) for i in rng.choice(vocab, n_top, replace=False)]
        for k, extra in enumerate(extra_ids):
            if extra not in row:
                row[k] = extra
        ids.append(row)
        logp.append(sorted((float(v) for v in np.log(rng.dirichlet(np.ones(n_top + 1))[:n_top])), reverse=True))
    source["topk_ids"], source["topk_logp"] = ids, logp
    return record


def hand_topk(source, target, completion, mapping, closing):
    """The target's lists, computed pair by pair: map each id (the closing pair overriding the
    map), add up the probabilities of ids that meet, sort by log-prob then id."""
    out = []
    for i in brute_one_to_one(source["offsets"], target["offsets"]):
        if i < 0:
            out.append(None)
            continue
        mass = {}
        for sid, lp in zip(source["topk_ids"][i], source["topk_logp"][i]):
            tid = closing[1] if sid == closing[0] else int(mapping[sid])
            mass.setdefault(tid, []).append(lp)
        merged = {t: (lps[0] if len(lps) == 1 else math.log(sum(math.exp(v) for v in lps))) for t, lps in mass.items()}
        order = sorted(merged, key=lambda t: (-merged[t], t))
        out.append((order, [merged[t] for t in order]))
    return out


def test_topk_against_a_hand_computation(smollm2_tokenizer, smollm2_dir, gemma_tokenizer, monkeypatch):
    mapping = np.arange(smollm2_tokenizer.vocab_size, dtype=np.int64) // 2  # ids 2k and 2k+1 merge
    monkeypatch.setattr(align, "token_map", lambda s, t: mapping)
    closing_source = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    records = [with_topk(scored(smollm2_tokenizer, text, i, seed=i), seed=i, extra_ids=(closing_source, 10, 11))
               for i, text in enumerate(TEXTS.values())]
    originals = json.loads(json.dumps(records))
    counts = {}
    out = list(align_records(((f"in:{i}", r) for i, r in enumerate(records)), gemma_tokenizer, model="gemma",
                             source_model=smollm2_dir, counts=counts))
    covered = total = 0
    for record, original in zip(out, originals):
        target, source = record["titok"]["target"], original["titok"]["source"]
        closing = (source["token_ids"][-1], target["token_ids"][-1])
        assert closing == (closing_source, gemma_tokenizer.convert_tokens_to_ids("<end_of_turn>"))
        expected = hand_topk(source, target, record["completion"], mapping, closing)
        assert target["topk_ids"] == [None if e is None else e[0] for e in expected]
        logps = [None if e is None else e[1] for e in expected]
        assert [p is None for p in target["topk_logp"]] == [p is None for p in logps]
        for got, want in zip(target["topk_logp"], logps):
            if want is not None:
                assert got == pytest.approx(want, abs=1e-12)
        assert target["topk_ids"][-1] is not None and target["topk_ids"][-1][0] is not None  # the closing pair
        n = sum(e is not None for e in expected)
        assert target["topk_coverage"] == n / len(expected)
        assert target["topk_ids"] != source["topk_ids"]  # something merged or moved
        covered, total = covered + n, total + len(expected)
        assert record["titok"]["source"] == source  # the source's part passes through
    assert 0 < covered < total and (counts["topk_covered"], counts["topk_tokens"]) == (covered, total)
    assert f"top-N distributions on {covered / total:.2%} of them" in align.summary(counts)


def test_topk_with_the_real_map(smollm2_tokenizer, smollm2_dir, gemma_tokenizer):
    from titok_tools.vocab_map import token_map
    record = with_topk(scored(smollm2_tokenizer, TEXTS["ascii"], 0), n_top=6)
    source = json.loads(json.dumps(record["titok"]["source"]))
    record["titok"]["source"]["model"] = smollm2_dir  # the record names the model that scored it
    [out] = align_records([("in:1", record)], gemma_tokenizer, model="gemma")
    target = out["titok"]["target"]
    mapping = token_map(smollm2_tokenizer, gemma_tokenizer)  # cached by the run above
    closing = (source["token_ids"][-1], target["token_ids"][-1])
    assert target["topk_ids"] == [None if e is None else e[0] for e in hand_topk(source, target, out["completion"],
                                                                                 mapping, closing)]
    assert 0.5 < target["topk_coverage"] <= 1  # plain English: most tokens are spelled the same


def test_topk_same_tokenizer_passes_through(smollm2_tokenizer):
    records = [with_topk(scored(smollm2_tokenizer, text, i, seed=i), seed=i) for i, text in enumerate(TEXTS.values())]
    sources = [json.loads(json.dumps(r["titok"]["source"])) for r in records]
    counts = {}
    out = list(align_records(((f"in:{i}", r) for i, r in enumerate(records)), smollm2_tokenizer, model="same",
                             k=0.3, counts=counts))
    for record, source in zip(out, sources):
        target = record["titok"]["target"]
        assert target["topk_ids"] == source["topk_ids"] and target["topk_logp"] == source["topk_logp"]
        assert target["topk_coverage"] == 1.0
    assert counts["topk_covered"] == counts["topk_tokens"]


def test_topk_lines_align_as_dicts_do(smollm2_tokenizer, smollm2_dir, gemma_tokenizer, monkeypatch):
    mapping = np.arange(smollm2_tokenizer.vocab_size, dtype=np.int64) // 3
    monkeypatch.setattr(align, "token_map", lambda s, t: mapping)
    records = [with_topk(scored(smollm2_tokenizer, text, i, seed=i), seed=i) for i, text in enumerate(TEXTS.values())]
    lines = [JsonLine(orjson.dumps(r), i + 1) for i, r in enumerate(records)]
    assert lazy_records.read_lazily(simdjson.Parser(), lines[0].text, "excess", "x") is None  # read whole
    from_dicts = list(align_records(((f"in:{i}", json.loads(json.dumps(r))) for i, r in enumerate(records)),
                                    gemma_tokenizer, model="g", source_model=smollm2_dir))
    from_lines = [orjson.loads(b) for b in align_records(((f"in:{i}", line) for i, line in enumerate(lines)),
                                                         gemma_tokenizer, model="g", source_model=smollm2_dir)]
    assert [r["titok"]["target"] for r in from_lines] == [r["titok"]["target"] for r in from_dicts]


@pytest.mark.parametrize("change, problem", [
    (lambda s: s.pop("topk_logp"), "titok.source.topk_logp: record 0: missing, but titok.source.topk_ids is there"),
    (lambda s: s["topk_ids"].pop(), "titok.source.topk_ids: record 0: must be"),
    (lambda s: s["topk_ids"][0].append(5), "titok.source.topk_ids: record 0: must hold the same number"),
    (lambda s: s["topk_logp"].__setitem__(0, [0.0] * 3), "titok.source.topk_logp: record 0: must hold the same"),
    (lambda s: s["topk_ids"][1].__setitem__(0, 49152), "titok.source.topk_ids: record 0: ids must lie in [0, 49152)"),
    (lambda s: s["topk_ids"][1].__setitem__(0, 1.5), "titok.source.topk_ids: record 0: must hold the same number"),
])
def test_bad_topk_fields_are_named(change, problem, smollm2_tokenizer, smollm2_dir, gemma_tokenizer, monkeypatch):
    monkeypatch.setattr(align, "token_map", lambda s, t: np.arange(smollm2_tokenizer.vocab_size))
    record = with_topk(scored(smollm2_tokenizer, TEXTS["ascii"], 0))
    change(record["titok"]["source"])
    with pytest.raises(align.RecordError) as error:
        list(align_records([("in:1", record)], gemma_tokenizer, model="g", source_model=smollm2_dir))
    assert problem in str(error.value)
    counts = {}
    assert list(align_records([("in:1", record)], gemma_tokenizer, model="g", source_model=smollm2_dir,
                              skip_invalid=True, counts=counts)) == [] and counts["invalid"] == 1
