"""One formatting function for every stage (docs/design.md, Formatting and Completion tokens).

A record's prompt (user turn or message list) and completion (assistant turn) are rendered with
the tokenizer's own chat template, or as plain `prompt + completion + eos` when it has none (or
when the caller asks for plain text). The rendered text is tokenized once with character offsets;
the completion's tokens are those whose span overlaps the completion text, plus the token that
closes the assistant turn. Generation, scoring, alignment and training all call `encode`, so the
tokens that are scored are the tokens that are trained.
"""
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import compress
from operator import eq, itemgetter

from jinja2 import TemplateError

from .records import RecordError, prompt_field


class FormatError(ValueError):
    """A record that cannot be formatted; prompt_index: the prompt message at fault, None when
    it is the completion or the conversation as a whole."""

    def __init__(self, message, prompt_index=None):
        super().__init__(message)
        self.prompt_index = prompt_index


def record_error(where, record, error, field="completion", prefix=""):
    """The one-line RecordError for a FormatError that formatting `record` raised: it names the
    prompt message at fault, else `field`."""
    if error.prompt_index is not None:
        field = prompt_field(record, error.prompt_index)
    return RecordError(where, field, f"{prefix}{error}")


@dataclass
class Encoded:
    input_ids: list      # the whole sequence fed to the model
    positions: list      # indices into input_ids of the completion tokens (closing token last)
    offsets: list        # [start, end) of each completion token, into the completion string
    truncated: bool      # the completion was cut to max_length tokens (its closing token is lost)

    @property
    def token_ids(self):
        p = self.positions
        if len(p) > 1 and p[-2] - p[0] == len(p) - 2:  # the usual case: one run, then the closing token
            return self.input_ids[p[0]:p[-2] + 1] + [self.input_ids[p[-1]]]
        return [self.input_ids[i] for i in p]


def uses_template(tokenizer, chat_template=True):
    return bool(chat_template and tokenizer.chat_template)


def _apply_template(tokenizer, messages, add_generation_prompt=False):
    """The chat template's text for `messages` (a list of such lists: a list of texts, in one
    call). A template that refuses them (roles that must alternate, no system role: its
    raise_exception) or fails on them (a user's template adding a number to a string: a TypeError
    inside Jinja) raises FormatError, which stages report per record, not a traceback."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except TemplateError as e:
        raise FormatError(f"the chat template refused this conversation: {e}") from None
    except TypeError as e:
        raise FormatError(f"the chat template failed on this conversation: {e}") from None


def render_prompt(tokenizer, messages, chat_template=True):
    """The text a model continues to write the assistant turn (generation and evaluation)."""
    if uses_template(tokenizer, chat_template):
        return _apply_template(tokenizer, messages, add_generation_prompt=True)
    return _plain_prompt(messages)


def check_prompt(tokenizer, messages, chat_template, where, record):
    """Raise a RecordError naming the record's prompt when the chat template refuses it, or a
    prompt message spells a special token (_prompt_problem), so a command reports the record (or
    skips it with --skip-invalid) before a batch is generated."""
    try:
        text = render_prompt(tokenizer, messages, chat_template)
    except FormatError as e:
        raise RecordError(where, "prompt", str(e)) from None
    ((ids, spans),) = _tokenized(tokenizer, [text], not uses_template(tokenizer, chat_template))
    problem = _prompt_problem(tokenizer, messages, text, ids, spans, len(text))
    if problem is not None:
        raise record_error(where, record, problem)


def _plain_prompt(messages):
    return "\n\n".join(m["content"] for m in messages)


def prompt_ids(tokenizer, messages, chat_template=True, max_length=None):
    """Token ids of the rendered prompt, cut from the left to max_length."""
    text = render_prompt(tokenizer, messages, chat_template)
    ids = tokenizer(text, add_special_tokens=not uses_template(tokenizer, chat_template))["input_ids"]
    return ids[-max_length:] if max_length else ids


def stop_token_ids(tokenizer, chat_template=True):
    """Tokens that end an assistant turn: EOS and, with a template, the token that closes a
    turn (Gemma's <end_of_turn>, ChatML's <|im_end|>, Llama-3's <|eot_id|>), found by rendering."""
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if uses_template(tokenizer, chat_template):
        enc = encode(tokenizer, [{"role": "user", "content": "Hi"}], "Hello", chat_template)
        stops.add(enc.input_ids[enc.positions[-1]])
    return sorted(stops)


def _common_prefix_length(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _special_ids(tokenizer):
    """Ids of special tokens, computed once per tokenizer (Gemma has 6k special added tokens:
    collecting them costs more than tokenizing a record)."""
    ids = getattr(tokenizer, "_titok_special_ids", None)
    if ids is None:
        ids = frozenset(tokenizer.all_special_ids).union(
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
        tokenizer._titok_special_ids = ids
    return ids


def _spelled_special(tokenizer, ids, spans, text, tokens, lo, hi):
    """The first special token among `tokens` (indices into ids) whose own text lies inside
    text[lo:hi]: a record's text that the tokenizer read as that control token (to the model, a
    spelled "<|im_end|>" is a real end of turn); None if there is none. An unknown word read as
    <unk> is special too, but its text is the word, not "<unk>"."""
    special = _special_ids(tokenizer)
    for i in tokens:
        if ids[i] in special:
            token = tokenizer.convert_ids_to_tokens(ids[i])
            if text.find(token, max(spans[i][0], lo), min(spans[i][1], hi)) >= 0:
                return token
    return None


def _prompt_problem(tokenizer, messages, text, ids, spans, end):
    """A FormatError naming the first prompt message whose content spells a special token (the
    rule for completions: _spelled_special), or None. `text`, tokenized as ids and spans, renders
    the messages before character `end` (a completion may follow). Each content is looked up in
    the rendering, in order; one the template changed is tokenized alone."""
    special = _special_ids(tokenizer)
    candidates = list(compress(range(len(ids)), map(special.__contains__, ids)))
    if not candidates:
        return None
    starts = [spans[i][0] for i in candidates]
    at = 0
    for index, message in enumerate(messages):
        content = message["content"]
        if not content.strip():
            continue
        found, piece = text.find(content, at, end), content
        if found < 0:
            piece = content.strip()  # templates that trim message content
            found = text.find(piece, at, end)
        if found >= 0:
            at = found + len(piece)
            # a token's span may start before its own text (a special token that strips the space before it)
            near = candidates[max(0, bisect_left(starts, found) - 1):bisect_left(starts, at)]
            token = _spelled_special(tokenizer, ids, spans, text, near, found, at)
        else:
            alone = tokenizer(content, add_special_tokens=False, return_offsets_mapping=True)
            token = _spelled_special(tokenizer, alone["input_ids"], alone["offset_mapping"], content,
                                     range(len(alone["input_ids"])), 0, len(content))
        if token is not None:
            return _spelled_error("prompt", token, index)
    return None


def _spelled_error(part, token, prompt_index=None):
    return FormatError(f"the {part} contains the text of the special token {token!r}: it would be read as that "
                       "control token (remove or escape it)", prompt_index)


_PROBES = ("\ue000", "\ue001 \ue002")  # private-use characters: no template or text uses them


def _closing_text(tokenizer):
    """The text a chat template writes after the content of a conversation's last assistant turn
    (Gemma: "<end_of_turn>\n"), found once per tokenizer by rendering two probe completions; None
    when it depends on the content."""
    cached = getattr(tokenizer, "_titok_closing_text", None)
    if cached and cached[0] == tokenizer.chat_template:  # the template can be replaced (--chat-template)
        return cached[1]
    found = set()
    for probe in _PROBES:
        full = _apply_template(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}])
        at = full.rfind(probe)
        found.add(full[at + len(probe):] if at >= 0 else None)
    closing = found.pop() if len(found) == 1 else None
    tokenizer._titok_closing_text = (tokenizer.chat_template, closing)
    return closing


def _conversation(messages, completion):
    return messages + [{"role": "assistant", "content": completion}]


def _rendered_conversations(tokenizer, items, chat_template):
    """Each (messages, completion) item's whole conversation rendered, in one template call:
    transformers' own work per call (a fifth of a short record's time in titok-align) is paid
    once, not per record. Nones where there is no template to render, or where it refuses one
    of them: _render then renders each alone, and the one refused is reported."""
    if len(items) < 2 or not uses_template(tokenizer, chat_template):
        return [None] * len(items)
    try:
        return _apply_template(tokenizer, [_conversation(messages, completion) for messages, completion in items])
    except FormatError:
        return [None] * len(items)


def _render(tokenizer, messages, completion, chat_template, full=None):
    """Rendered text; where completion[0] stands in it; the [lo, hi) chars of the text that are
    the completion's own (smaller when the template trims it); whether to add special tokens.
    `full` is the conversation already rendered (_rendered_conversations), if it is."""
    if not uses_template(tokenizer, chat_template):
        prompt = _plain_prompt(messages)
        return prompt + completion, len(prompt), (len(prompt), len(prompt) + len(completion)), True
    if full is None:
        full = _apply_template(tokenizer, _conversation(messages, completion))
    stripped = completion.strip()  # templates that trim message content (Gemma's does)
    lead = len(completion) - len(completion.lstrip())
    # The assistant's content ends where the template's closing text begins: one rendering.
    closing = _closing_text(tokenizer)
    if closing is not None and full.endswith(closing):
        end = len(full) - len(closing)
        for text, shift in ((completion, 0), (stripped, lead)):
            if full.startswith(text, end - len(text)):
                return full, end - len(text) - shift, (end - len(text), end), False
    # Otherwise render the prompt alone: the completion is the first occurrence after the point
    # where that rendering stops matching, so it cannot be confused with a copy inside the prompt.
    prefix = _apply_template(tokenizer, messages, add_generation_prompt=True)
    search_from = _common_prefix_length(full, prefix)
    start = full.find(completion, search_from)
    if start >= 0:
        return full, start, (start, start + len(completion)), False
    found = full.find(stripped, search_from)
    if found < 0:
        raise FormatError("the chat template changes the completion text; use --no-chat-template or another template")
    return full, found - lead, (found, found + len(stripped)), False


def _tokenized(tokenizer, texts, add_special_tokens):
    """(ids, offsets) of each text, from one tokenizer call."""
    enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True, return_attention_mask=False)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


def encode(tokenizer, messages, completion, chat_template=True, max_length=None):
    """Tokenize prompt + completion; return the sequence and the completion's tokens and offsets.

    max_length caps the prompt and, separately, the completion (in tokens): the prompt loses its
    start, the completion its end (and then `truncated` is True).
    """
    (result,) = encode_many(tokenizer, [(messages, completion)], chat_template, max_length)
    if isinstance(result, FormatError):
        raise result
    return result


def encode_many(tokenizer, items, chat_template=True, max_length=None):
    """`encode` for a list of (messages, completion) with one tokenizer call; a FormatError
    stands in the result list for an item that cannot be encoded."""
    return encode_later(tokenizer, items, chat_template, max_length)()


def encode_later(tokenizer, items, chat_template=True, max_length=None, submit=None):
    """encode_many in two steps: render the items now and start the tokenizer call, return a
    function that finishes the encodings. With `submit` (an executor's submit) the call runs
    there: titok-align tokenizes a chunk in a thread (the tokenizer releases the GIL while it
    tokenizes) while it aligns the one before; rendering and finding the completion's tokens stay
    in the calling thread."""
    rendered = []
    for (messages, completion), full in zip(items, _rendered_conversations(tokenizer, items, chat_template)):
        try:
            rendered.append(_render(tokenizer, messages, completion, chat_template, full))
        except FormatError as e:
            rendered.append(e)
    ok = [r for r in rendered if not isinstance(r, FormatError)]
    if not ok:  # nothing to tokenize: every item failed to render
        tokenized = lambda: []  # noqa: E731
    elif submit is None:
        done = _tokenized(tokenizer, [r[0] for r in ok], ok[0][3])
        tokenized = lambda: done  # noqa: E731
    else:
        tokenized = submit(_tokenized, tokenizer, [r[0] for r in ok], ok[0][3]).result

    def finish():
        pieces = iter(tokenized())
        results = []
        for (messages, completion), r in zip(items, rendered):
            if isinstance(r, FormatError):
                results.append(r)
                continue
            ids, spans = next(pieces)
            try:
                problem = _prompt_problem(tokenizer, messages, r[0], ids, spans, r[1])
                if problem is not None:
                    raise problem
                results.append(_completion_tokens(tokenizer, r, completion, ids, spans, max_length))
            except FormatError as e:
                results.append(e)
        return results
    return finish


def _inside(spans, lo, hi):
    """Indices of the tokens whose (non-empty) spans overlap the characters [lo, hi).

    Tokenizers give spans in text order, so the overlapping tokens are one run, found by
    bisection: O(log n) plus the run, not a Python loop over a long prompt. Special tokens a
    post-processor adds have empty (0, 0) spans: at the end they are left out of the search;
    spans out of order anywhere else take the plain scan."""
    end = len(spans)
    while end and spans[end - 1][0] == spans[end - 1][1]:
        end -= 1
    starts, ends = list(map(itemgetter(0), spans[:end])), list(map(itemgetter(1), spans[:end]))
    if starts != sorted(starts) or ends != sorted(ends):  # sorting a sorted list is one C pass
        return [i for i, (a, b) in enumerate(spans) if b > a and a < hi and b > lo]
    first = bisect_right(ends, lo)  # the first token ending after lo
    last = bisect_left(starts, hi, first) - 1  # the last one starting before hi
    if any(map(eq, starts[first:last + 1], ends[first:last + 1])):  # an empty token amid the run
        return [i for i in range(first, last + 1) if starts[i] < ends[i]]
    return list(range(first, last + 1))


def _completion_tokens(tokenizer, rendered, completion, ids, spans, max_length):
    text, start, (lo, hi), plain = rendered
    ids = list(ids)
    inside = _inside(spans, lo, hi)
    if not inside:
        raise FormatError("the completion produced no tokens")
    first, last = inside[0], inside[-1]
    special = _special_ids(tokenizer)
    if not special.isdisjoint(ids[first:last + 1]):
        # scored or trained, a spelled "<|im_end|>" would teach the model to end its turn there
        token = _spelled_special(tokenizer, ids, spans, text, inside, lo, hi)
        if token is not None:
            raise _spelled_error("completion", token)
    if last - first + 1 == len(inside):  # the usual case: no empty token amid the completion
        offsets = [[a - start, b - start] for a, b in spans[first:last + 1]]
    else:
        offsets = [[spans[i][0] - start, spans[i][1] - start] for i in inside]
    # Only tokens at either end can reach past the completion's own characters (a template that
    # trims it, a token that joins its first character with the text before): clip those.
    for span in offsets:
        if span[0] >= lo - start:
            break
        span[0] = lo - start
    for span in reversed(offsets):
        if span[1] <= hi - start:
            break
        span[1] = hi - start
    if plain:
        if tokenizer.eos_token_id is None:
            raise FormatError("the tokenizer has no EOS token to close the completion")
        if last + 1 < len(ids) and ids[last + 1] == tokenizer.eos_token_id:
            closing = last + 1
        else:
            ids = ids[: last + 1] + [tokenizer.eos_token_id]
            closing = len(ids) - 1
    else:
        closing = last + 1
        # Only whitespace may stand between the completion and the token that closes the turn.
        while closing < len(ids) and ids[closing] not in special and not text[spans[closing][0]:spans[closing][1]].strip():
            closing += 1
        if closing >= len(ids) or ids[closing] not in special:
            raise FormatError("the chat template does not close the assistant turn with a special token")
    positions = inside + [closing]
    offsets.append([len(completion), len(completion)])
    ids = ids[: closing + 1]

    truncated = False
    if max_length and len(positions) > max_length:
        positions, offsets, truncated = positions[:max_length], offsets[:max_length], True
        ids = ids[: positions[-1] + 1]
    if max_length and first > max_length:
        cut = first - max_length
        ids = ids[cut:]
        positions = [p - cut for p in positions]
    return Encoded(ids, positions, offsets, truncated)
