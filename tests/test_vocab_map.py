"""The MinED token map (vocab_map) against a brute-force edit-distance search, and its cache."""
import os
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, models as tk_models
from transformers import PreTrainedTokenizerFast

from titok_tools import vocab_map
from titok_tools.models import tokenizer_fingerprint
from titok_tools.vocab_map import Vocabulary, build_map, nearest_texts, token_map


def levenshtein(a, b):
    """The textbook dynamic programme: insertions, deletions and substitutions cost 1."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def brute_nearest(query, texts, ids):
    """The id of the least distance, lowest id on ties, by trying every text."""
    return min((levenshtein(query, t), i) for t, i in zip(texts, ids))[1]


def brute_map(source, target):
    """build_map's definition, written out: exact text (ordinary tokens before byte tokens, then
    the lowest id), else the least edit distance over the ordinary tokens; specials aside."""
    regular = [i for i, t in enumerate(target.texts) if t and i not in target.special]
    expected = {}
    for i, text in enumerate(source.texts):
        if i in source.special:
            continue
        exact = [j for j in regular if target.texts[j] == text]
        if exact:
            expected[i] = min(exact, key=lambda j: (j in target.byte_tokens, j))
        else:
            expected[i] = brute_nearest(text, [target.texts[j] for j in regular], regular)
    return expected


def test_nearest_matches_brute_force_with_many_ties():
    rng = random.Random(0)
    word = lambda: "".join(rng.choice("ab c") for _ in range(rng.randint(0, 7)))  # noqa: E731
    texts = [word() for _ in range(300)]
    ids = np.array(rng.sample(range(10_000), len(texts)))  # ids in no particular order
    queries = [word() for _ in range(200)] + ["abcabcabcabcabcabc", "x"]
    got = nearest_texts(queries, texts, ids)
    assert got.tolist() == [brute_nearest(q, texts, ids.tolist()) for q in queries]


def test_nearest_across_blocks(monkeypatch):
    monkeypatch.setattr(vocab_map, "QUERY_BLOCK", 3)  # blocks of queries share nothing
    texts, ids = ["hello", "help", "yellow", "he", "hello world"], np.arange(5)
    queries = ["hell", "jello", "yell", "h", "hello worl", "helper", "", "hallo"]
    assert nearest_texts(queries, texts, ids).tolist() == [brute_nearest(q, texts, range(5)) for q in queries]


def test_texts_of_byte_level_and_sentencepiece_tokens():
    assert vocab_map.byte_level_text("Ġthe") == " the"
    assert vocab_map.byte_level_text("Ċ") == "\n"
    assert vocab_map.byte_level_text("Ã©") == "é"
    assert vocab_map.byte_level_text("ã") == "\udce3"  # a stray byte of a split character
    assert vocab_map.sentencepiece_text("▁the") == (" the", False)
    assert vocab_map.sentencepiece_text("<0xE3>") == ("\udce3", True)
    assert vocab_map.sentencepiece_text("<0x41>") == ("A", True)


def test_build_map_by_hand():
    source = Vocabulary(["<eos>", " the", "\udce3", "A", "thw", "<sep>"], special={0, 5}, roles={"eos": 0})
    target = Vocabulary(["<pad>", "<end>", "\udce3", "A", "A", " the", "the", "<sp>"],
                        special={0, 1, 7}, byte_tokens={2, 3}, roles={"eos": 1})
    mapped, how = build_map(source, target)
    # eos by role; " the" exact; a stray byte onto the byte token; "A" onto the ordinary "A" (4), not
    # the byte token (3); "thw" at distance 1 from "the"; "<sep>" to the nearest special, "<sp>"
    assert mapped.tolist() == [1, 5, 2, 4, 6, 7]
    assert how.tolist() == [2, 0, 0, 0, 1, 3]


@pytest.fixture(scope="module")
def vocabularies(smollm2_tokenizer, gemma_tokenizer):
    return Vocabulary.of(smollm2_tokenizer), Vocabulary.of(gemma_tokenizer)


def sub_vocabulary(vocab, keep):
    """The same vocabulary with only the ids in `keep` left (the others name no token)."""
    keep = set(keep)
    return Vocabulary([t if i in keep else "" for i, t in enumerate(vocab.texts)], vocab.special & keep,
                      vocab.byte_tokens & keep, {r: i for r, i in vocab.roles.items() if i in keep})


def test_real_sub_vocabularies_match_brute_force(vocabularies):
    smollm2, gemma = vocabularies
    rng = random.Random(1)
    source = Vocabulary(smollm2.texts[:300] + smollm2.texts[300::400], smollm2.special, (), smollm2.roles)
    full = build_map(source, gemma)[0]  # half the sample's exact partners, kept so that some match exactly
    keep = set(full[::2].tolist()) | set(rng.sample(range(len(gemma.texts)), 600)) | gemma.byte_tokens | set(range(10))
    target = sub_vocabulary(gemma, keep)
    mapped, how = build_map(source, target)
    expected = brute_map(source, target)
    assert {i: mapped[i] for i in expected} == expected
    assert (how[list(expected)] == 0).sum() > 50 and (how[list(expected)] == 1).sum() > 50  # both routes ran
    # SmolLM2's chat turn tokens onto Gemma's
    assert mapped[smollm2.roles["turn_end"]] == gemma.roles["turn_end"]
    assert mapped[smollm2.roles["turn_start"]] == gemma.roles["turn_start"]


def word_level(words, special=()):
    """A small hand-built fast tokenizer: one token per word."""
    backend = Tokenizer(tk_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    return tokenizer


def test_cache_builds_once_per_pair(tmp_path, monkeypatch):
    monkeypatch.setenv("TITOK_CACHE", str(tmp_path))
    one = word_level(["<unk>", "cat", "dog", "bird", "fish"], ["<end>"])
    two = word_level(["<unk>", "cats", "dig", "bird", "<0x41>"], ["<eot>"])
    builds = []
    real_build = vocab_map.build_map
    monkeypatch.setattr(vocab_map, "build_map", lambda s, t: builds.append(1) or real_build(s, t))
    first = token_map(one, two)
    assert first.tolist() == [0, 1, 2, 3, 2, 5]  # cat -> cats (1 edit), fish -> dig (3), <end> -> <eot>
    assert len(builds) == 1
    second = token_map(one, two)
    assert len(builds) == 1 and second.dtype == np.int64 and (second == first).all()
    back = token_map(two, one)  # another pair, another file
    assert len(builds) == 2
    files = sorted(os.listdir(tmp_path / "vocab-maps"))
    assert len(files) == 2 and all(f.endswith(".safetensors") and not f.startswith(".tmp") for f in files)
    assert back.tolist() == [0, 1, 2, 3, 1, 5]  # "<0x41>" reads as "A": 3 edits from cat and dog, cat's id is lower
    # a file under the pair's name that another pair wrote is never trusted
    path = vocab_map.map_path(tokenizer_fingerprint(one), tokenizer_fingerprint(two))
    vocab_map.save_map(path, np.zeros(6, dtype=np.int64), np.zeros(6, dtype=np.int8), "sha256:other", "sha256:else")
    assert (token_map(one, two) == first).all() and len(builds) == 3
    assert (token_map(one, one) == np.arange(len(one))).all() and len(builds) == 3  # the same tokenizer: identity
