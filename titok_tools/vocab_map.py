"""Source token id -> target token id (MinED), and the teacher's top-N distributions carried through it.

The MinED map (docs/design.md, Vocabulary map). Each token is read as the text it stands for:

  * byte-level BPE (GPT-2, SmolLM2): the vocabulary spells bytes as printable characters ("Ġ" is
    the space byte); the characters are turned back into bytes and the bytes decoded as UTF-8. A
    token holding part of a character (one byte of a three-byte character) keeps its stray bytes
    as lone surrogates (Python's "surrogateescape": byte 0xE3 reads as "\\udce3");
  * SentencePiece-style vocabularies (Gemma): "▁" reads as a space, and a byte-fallback token
    "<0xE3>" as that byte, the same way (so a stray byte of one tokenizer matches the other's
    byte token exactly; "<0x41>" reads as "A");
  * added tokens are raw text in every tokenizer: taken as they are ("▁" still a space).

A source token maps to the target token with exactly the same text, else to the target token at
the least Levenshtein distance (lowest target id on ties), searched with rapidfuzz over the target
strings bucketed by length (the distance is at least the length difference). Special tokens map to
special tokens: the same role (eos, bos, pad, unk, chat turn start and end) where both tokenizers
name one, else the nearest target special. The map is built once per tokenizer pair and cached as
safetensors under $TITOK_CACHE/vocab-maps, keyed by both tokenizers' fingerprints.
"""
import logging
import os
import re
import tempfile
import time

import numpy as np
import orjson

from .models import cache_dir, tokenizer_fingerprint
from .select import split_by_counts

log = logging.getLogger("titok.vocab_map")

MAP_VERSION = 1  # part of the cache file's name: a change in how maps are built invalidates old files
QUERY_BLOCK = 256  # queries per rapidfuzz.cdist call: a block x a length bucket of 30k targets is ~30 MB
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Chat control tokens of the families we know, by role: they are not eos/bos to the tokenizer but
# play the same part in every chat template (a turn's start and end).
CHAT_ROLES = {
    "turn_start": ("<|im_start|>", "<start_of_turn>", "<|start_header_id|>", "<|start|>"),
    "turn_end": ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"),
}
TOKENIZER_ROLES = ("eos_token", "bos_token", "pad_token", "unk_token")  # earlier roles win a token named twice


# --- the text of each token ----------------------------------------------------------------------

def _byte_level_alphabet():
    """GPT-2's byte -> printable character table, inverted: character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


BYTE_OF_CHAR = _byte_level_alphabet()


def _is_byte_level(tokenizer):
    backend = tokenizer.backend_tokenizer
    parts = (backend.pre_tokenizer, backend.decoder)
    return any(part is not None and b'"ByteLevel"' in part.__getstate__() for part in parts)


def _as_text(raw):
    # stray bytes of a split character become lone surrogates: comparable, never an error
    return raw.decode("utf-8", "surrogateescape")


def byte_level_text(token):
    """The text a byte-level BPE token stands for (None if it is not spelled in the byte alphabet)."""
    try:
        return _as_text(bytes(BYTE_OF_CHAR[c] for c in token))
    except KeyError:
        return None


def sentencepiece_text(token):
    """(text, is a byte-fallback token) of a SentencePiece-style token."""
    byte = BYTE_TOKEN.fullmatch(token)
    if byte:
        return _as_text(bytes([int(byte.group(1), 16)])), True
    return token.replace("\u2581", " "), False


class Vocabulary:
    """A tokenizer's tokens as text: `texts[id]` ("" for an id that names no token), `special`
    (ids of special added tokens), `byte_tokens` (ids of byte-fallback tokens), `roles`
    (role -> id of the special tokens whose role is known)."""

    def __init__(self, texts, special=(), byte_tokens=(), roles=None):
        self.texts = list(texts)
        self.special, self.byte_tokens = frozenset(special), frozenset(byte_tokens)
        self.roles = dict(roles or {})

    @classmethod
    def of(cls, tokenizer):
        byte_level = _is_byte_level(tokenizer)
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        added = {i: t for i, t in tokenizer.added_tokens_decoder.items() if i < len(tokens)}
        texts, byte_tokens = [], []
        for i, token in enumerate(tokens):
            if token is None:
                texts.append("")
            elif i in added:  # added tokens are raw text, never byte-level spellings
                texts.append(added[i].content.replace("\u2581", " "))
            elif byte_level:
                text = byte_level_text(token)
                texts.append(token if text is None else text)
            else:
                text, is_byte = sentencepiece_text(token)
                texts.append(text)
                if is_byte:
                    byte_tokens.append(i)
        special = {i for i, t in added.items() if t.special}
        return cls(texts, special, byte_tokens, _roles(tokenizer, texts, special))


def _roles(tokenizer, texts, special):
    roles = {}
    for role, spellings in CHAT_ROLES.items():
        for i in special:
            if texts[i] in spellings:
                roles[role] = i
    named = set(roles.values())
    for role in TOKENIZER_ROLES:
        i = getattr(tokenizer, role + "_id", None)
        if i is not None and i in special and i not in named:
            roles[role] = i
            named.add(i)
    return roles


# --- the map -------------------------------------------------------------------------------------

def build_map(source, target):
    """(map, how): for each source id, the target id (int64), and how it was found (0 exact text,
    1 edit distance, 2 special token by role, 3 special by text or distance among the target's
    specials). `source` and `target` are Vocabulary objects."""
    n = len(source.texts)
    mapped, how = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int8)
    regular = [i for i in range(len(target.texts)) if i not in target.special and target.texts[i]]
    # byte-fallback tokens rank after ordinary ones with the same text: "<0x41>" is "A" only
    # where the vocabulary has no "A"
    exact = {}
    for i in sorted(regular, key=lambda i: (i in target.byte_tokens, i)):
        exact.setdefault(target.texts[i], i)
    queries = []
    for i, text in enumerate(source.texts):
        if i in source.special:
            continue
        if text in exact:
            mapped[i] = exact[text]
        else:
            queries.append(i)
    mapped[queries] = nearest(source, queries, target, regular)
    how[queries] = 1
    _map_specials(source, target, mapped, how)
    return mapped, how


def _map_specials(source, target, mapped, how):
    by_role = {i: target.roles[role] for role, i in source.roles.items() if role in target.roles}
    rest = sorted(i for i in source.special if i not in by_role)
    for i, j in by_role.items():
        mapped[i], how[i] = j, 2
    specials = sorted(target.special) or [i for i in range(len(target.texts)) if target.texts[i]]
    mapped[rest] = nearest(source, rest, target, specials)
    how[rest] = 3


def nearest(source, queries, target, candidates):
    """The target ids (among `candidates`) at the least edit distance from the text of each
    source id in `queries`; the lowest id on ties."""
    return nearest_texts([source.texts[i] for i in queries], [target.texts[i] for i in candidates],
                         np.asarray(candidates, dtype=np.int64))


def nearest_texts(queries, texts, ids):
    """For each query string, the id (ids[k] of texts[k]) of the text at the least Levenshtein
    distance, the lowest id on ties; int64 array.

    The distance is at least the difference in length, so the texts are searched in buckets of
    one length, outward from the query's (ring r holds lengths L - r and L + r), until the next
    ring cannot hold a text as near as the best found (ties included: its ids may be lower).
    Queries of one length go together through rapidfuzz's cdist (many queries at once, SIMD)."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    result = np.full(len(queries), -1, dtype=np.int64)
    if not queries or not len(ids):
        return result
    buckets = _length_buckets(texts, ids)
    longest = max(buckets)
    by_length = {}
    for q, text in enumerate(queries):
        by_length.setdefault(len(text), []).append(q)
    for length, members in by_length.items():
        for start in range(0, len(members), QUERY_BLOCK):
            block = members[start:start + QUERY_BLOCK]
            strings = [queries[q] for q in block]
            best = np.full(len(block), np.iinfo(np.int64).max, dtype=np.int64)
            best_id = np.full(len(block), np.iinfo(np.int64).max, dtype=np.int64)
            ring = 0
            while ring <= max(length, longest - length):
                rows = np.flatnonzero(best >= ring)  # only these can still find a text as near
                if not rows.size:
                    break
                for size in sorted({length - ring, length + ring}):
                    if size not in buckets:
                        continue
                    bucket_texts, bucket_ids = buckets[size]
                    # distances past the cutoff read as cutoff + 1; no text is further than max(length, size)
                    cutoff = int(min(best[rows].max(), max(length, size)))
                    d = cdist([strings[r] for r in rows], bucket_texts, scorer=Levenshtein.distance,
                              score_cutoff=cutoff, dtype=np.int32, workers=1)
                    first = d.argmin(axis=1)  # the first least: the lowest id (buckets are sorted by id)
                    dist, cand = d[np.arange(len(rows)), first].astype(np.int64), bucket_ids[first]
                    better = (dist < best[rows]) | ((dist == best[rows]) & (cand < best_id[rows]))
                    best[rows[better]], best_id[rows[better]] = dist[better], cand[better]
                ring += 1
            result[block] = best_id
    return result


def _length_buckets(texts, ids):
    """length -> (texts of that length, their ids as an int64 array), in increasing id order."""
    order = np.argsort(ids, kind="stable")
    buckets = {}
    for k in order.tolist():
        bucket = buckets.setdefault(len(texts[k]), ([], []))
        bucket[0].append(texts[k])
        bucket[1].append(int(ids[k]))
    return {size: (t, np.asarray(i, dtype=np.int64)) for size, (t, i) in buckets.items()}


# --- the cache -----------------------------------------------------------------------------------

def map_path(source_fingerprint, target_fingerprint):
    def short(fingerprint):
        return fingerprint.split(":")[-1][:32]
    return os.path.join(cache_dir(), "vocab-maps",
                        f"v{MAP_VERSION}-{short(source_fingerprint)}-{short(target_fingerprint)}.safetensors")


def token_map(source_tokenizer, target_tokenizer):
    """One target id per source id (int64 numpy array, MinED): loaded from the cache, or built
    and cached (docs/design.md, Vocabulary map). The same tokenizer maps every id to itself."""
    source_fp, target_fp = tokenizer_fingerprint(source_tokenizer), tokenizer_fingerprint(target_tokenizer)
    if source_fp == target_fp:
        return np.arange(len(source_tokenizer), dtype=np.int64)
    path = map_path(source_fp, target_fp)
    cached = load_map(path, source_fp, target_fp)
    if cached is not None:
        return cached
    started = time.time()
    mapped, how = build_map(Vocabulary.of(source_tokenizer), Vocabulary.of(target_tokenizer))
    stats = map_stats(how)
    log.info("built the token map %s -> %s in %.1fs: %s", source_fp[:19], target_fp[:19], time.time() - started,
             ", ".join(f"{v} {k}" for k, v in stats.items()))
    save_map(path, mapped, how, source_fp, target_fp)
    return mapped


def map_stats(how):
    counts = np.bincount(how, minlength=4)
    return {"exact": int(counts[0]), "edit distance": int(counts[1]), "special by role": int(counts[2]),
            "special by distance": int(counts[3])}


def save_map(path, mapped, how, source_fp, target_fp):
    """Write the map atomically (a temp file beside it, renamed into place): a reader never sees a
    half-written file, and two processes building the same map both leave a whole one."""
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=os.path.dirname(path))
    os.close(handle)
    try:
        save_file({"map": mapped, "how": how}, tmp,
                  metadata={"source": source_fp, "target": target_fp, "version": str(MAP_VERSION),
                            "stats": orjson.dumps(map_stats(how)).decode()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_map(path, source_fp, target_fp):
    """The cached map, or None when there is none (or it belongs to another pair: never trust a name)."""
    from safetensors import safe_open

    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("source") != source_fp or meta.get("target") != target_fp:
                return None
            return f.get_tensor("map").astype(np.int64, copy=False)
    except Exception as e:  # a damaged file is rebuilt, not fatal
        log.warning("%s: cannot read the cached token map (%s); building it again", path, e)
        return None


# --- distributions onto the target vocabulary ----------------------------------------------------

def carry_topk(paired, topk_ids, topk_logp, mapping, closing=None):
    """The target's top-N lists: for each target token, None or (ids, logps).

    `paired[j]` is the source token of target token j (-1: none; alignment.one_to_one), `topk_ids`
    and `topk_logp` (n_source, N) arrays, `mapping` the token map, `closing` an optional
    (source id, target id) pair that overrides it (the records' closing tokens). Source ids that
    map to one target id merge (logsumexp of their log-probs); each list is sorted by log-prob,
    descending, then by id. A token whose source holds no entry (N = 0) gets an empty list."""
    paired = np.asarray(paired, dtype=np.int64)
    rows = np.flatnonzero(paired >= 0)
    out = [None] * len(paired)
    if not rows.size:
        return out
    ids = np.asarray(topk_ids, dtype=np.int64)[paired[rows]]
    logp = np.asarray(topk_logp, dtype=np.float64)[paired[rows]]
    target = mapping[ids]
    if closing is not None:
        target[ids == closing[0]] = closing[1]
    n = ids.shape[1]
    if n == 0:
        for j in rows.tolist():
            out[j] = ([], [])
        return out
    # group equal target ids within each row: sort by (row, id), merge runs
    order = np.argsort(target, axis=1, kind="stable")
    target, logp = np.take_along_axis(target, order, 1).ravel(), np.take_along_axis(logp, order, 1).ravel()
    row = np.repeat(np.arange(len(rows)), n)
    starts = np.flatnonzero(np.concatenate(([True], (target[1:] != target[:-1]) | (row[1:] != row[:-1]))))
    merged = np.logaddexp.reduceat(logp, starts)  # a run of one keeps its value bit for bit
    ids_m, row_m = target[starts], row[starts]
    order = np.lexsort((ids_m, -merged, row_m))
    counts = np.bincount(row_m, minlength=len(rows)).tolist()
    for j, i, p in zip(rows.tolist(), split_by_counts(ids_m[order].tolist(), counts),
                       split_by_counts(merged[order].tolist(), counts)):
        out[j] = (i, p)
    return out
