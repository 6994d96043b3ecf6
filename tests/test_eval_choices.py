"""titok-eval --choices: each option's log-likelihood against a plain forward pass computed here,
the chosen option, the accuracies, records without options, --limit/--resume/--batch-size,
bad options, and the report's choice columns."""
import json

import pytest
import torch
from click.testing import CliRunner

from conftest import read_jsonl, write_jsonl
from titok_tools.answers import exact_match
from titok_tools.evaluate import choose, main
from titok_tools.report import main as report_main

# Multiple-choice prompts in titok-bigbench's form: labelled "(A) text" lines, or unlabelled
# "- text" lines when the options are letters themselves (hyperbaton).
QUESTIONS = [
    ("fruit", "Which one is a fruit?\n\nOptions:\n(A) a car\n(B) an apple\n(C) a stone", ["a car", "an apple", "a stone"]),
    ("order", "Which sentence has the adjectives in the right order?\n(a) a big red ball\n(b) a red big ball"
              "\n\nOptions:\n- a\n- b", ["a", "b"]),
    ("legs", "How many legs does a spider have?\n\nOptions:\n(A) six\n(B) eight\n(C) eight legs, as every arachnid has",
     ["six", "eight", "eight legs, as every arachnid has"]),
]


def reference_loglikelihoods(model_dir, adapter, prompt, options):
    """Independent reference, lm-eval's way: the prompt rendered by the chat template up to the
    assistant turn is the context, the option text appended to it the continuation; the sum of
    log p of the continuation's tokens from one unpadded float32 forward pass and a full
    log-softmax (no closing token)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    context = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=False)
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    out = []
    for option in options:
        ids = tokenizer(context + option, add_special_tokens=False)["input_ids"]
        assert ids[:len(context_ids)] == context_ids and len(ids) > len(context_ids)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        out.append(sum(logp[p - 1, ids[p]].item() for p in range(len(context_ids), len(ids))))
    return out


@pytest.fixture(scope="module")
def choice_data(tiny_llama, tiny_llama_lora, tmp_path_factory):
    """The questions with references set from the reference log-likelihoods: "fruit" is right
    (its reference the most likely option, written otherwise: "An apple." = "an apple"), "order"
    is wrong (its reference the least likely option), "legs" is right by its second reference;
    and a record without options."""
    lls = {qid: reference_loglikelihoods(tiny_llama, tiny_llama_lora, prompt, options) for qid, prompt, options in QUESTIONS}
    records = []
    for qid, prompt, options in QUESTIONS:
        ranked = sorted(range(len(options)), key=lambda i: -lls[qid][i])
        refs = {"fruit": [options[ranked[0]].capitalize() + "."], "order": [options[ranked[-1]]],
                "legs": [options[ranked[1]], options[ranked[0]]]}[qid]
        records.append({"id": qid, "prompt": prompt, "completion": refs[0], "references": refs, "options": options})
    records.insert(1, {"id": "free", "prompt": "What is 2 + 2?", "completion": "4"})
    return records, lls, write_jsonl(tmp_path_factory.mktemp("choices") / "mc.jsonl", records)


def run_eval(*args):
    result = CliRunner().invoke(main, ["--max-new-tokens", "3", "--dtype", "float32", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def test_option_loglikelihoods_match_a_plain_forward_pass(tiny_llama, tiny_llama_lora, choice_data, tmp_path):
    records, lls, data = choice_data
    # --batch-size 2: one record's options share batches with the next record's.
    result = run_eval("--model", tiny_llama, "--adapter", tiny_llama_lora, "--choices", "--batch-size", "2",
                      "--metrics", tmp_path / "m.json", data)
    out = {r["id"]: r for r in read_jsonl(result.stdout_bytes)}
    assert list(out) == ["fruit", "free", "order", "legs"]
    assert not {"choice", "choice_norm", "choice_loglikelihoods"} & set(out["free"])
    right = {"choice_accuracy": 0, "choice_accuracy_norm": 0}
    for qid, _, options in QUESTIONS:
        record, ref = out[qid], lls[qid]
        assert record["choice_loglikelihoods"] == pytest.approx(ref, abs=1e-4)
        best = max(range(len(options)), key=ref.__getitem__)
        best_norm = max(range(len(options)), key=lambda i: ref[i] / len(options[i]))
        assert record["choice"] == options[best] and record["choice_norm"] == options[best_norm]
        right["choice_accuracy"] += any(exact_match(options[best], r) for r in record["references"])
        right["choice_accuracy_norm"] += any(exact_match(options[best_norm], r) for r in record["references"])
        assert isinstance(record["prediction"], str)  # generation still runs beside the choice
    assert right["choice_accuracy"] == 2  # as choice_data set the references up

    metrics = json.load(open(tmp_path / "m.json"))
    assert metrics["records"] == 4 and metrics["choice_records"] == 3
    assert metrics["choice_accuracy"] == pytest.approx(2 / 3)
    assert metrics["choice_accuracy_norm"] == pytest.approx(right["choice_accuracy_norm"] / 3)
    assert "over the 3 records with options, 1 without" in result.stderr


# A prompt longer than tiny Gemma's sliding window (64 tokens), so that the repeated cache is a
# window's; options that begin alike (their first token, "(", is scored) and differ in length.
LONG_PROMPT = ("Which one is a fruit? " + "Read every option before you answer. " * 12
               + "\n\nOptions:\n(A) a car\n(B) an apple\n(C) a stone\n(D) an apple tree in full bloom")
LONG_OPTIONS = ["(A)", "(B)", "(D) an apple tree in full bloom", "a stone"]


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gemma"])
def test_a_records_options_share_one_pass_over_its_prompt(family, request):
    from titok_tools.evaluate import encode_options, option_loglikelihoods
    from titok_tools.models import decoder_and_head, load_model, load_tokenizer
    from titok_tools.records import prompt_and_completion

    model_dir = request.getfixturevalue(family)
    model, tokenizer = load_model(model_dir, dtype="float32", device="cpu"), load_tokenizer(model_dir)
    messages, _ = prompt_and_completion({"prompt": LONG_PROMPT, "completion": "x"}, "test")
    encs = encode_options(tokenizer, messages, LONG_OPTIONS, True, 768, "test")
    assert len(encs[0].input_ids) > 100  # past the sliding window
    seen = []
    body, _ = decoder_and_head(model)
    hook = body.embed_tokens.register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    try:
        [lls] = option_loglikelihoods(model, tokenizer, [encs], batch_size=8)
    finally:
        hook.remove()
    assert lls == pytest.approx(reference_loglikelihoods(model_dir, None, LONG_PROMPT, LONG_OPTIONS), abs=1e-4)
    # The prompt runs once, then each option's own tokens (right-padded to the longest):
    # far fewer tokens than four whole sequences.
    shared = min(e.positions[0] for e in encs)
    rest = max(len(e.input_ids) for e in encs) - shared
    assert seen == [shared, len(encs) * rest] and sum(seen) < 2 * len(encs[0].input_ids)
    # In batches of 3 options the prompt runs once a batch, with the same numbers.
    [again] = option_loglikelihoods(model, tokenizer, [encs], batch_size=3)
    assert again == pytest.approx(lls, abs=1e-5)


def test_a_cache_that_cannot_be_repeated_falls_back_to_whole_sequences(tiny_llama, monkeypatch):
    """Where the prompt's cache is not a plain DynamicCache (a recurrent or hybrid model's), the
    options run as whole sequences, with the same numbers; the decoder class is remembered, so
    the next record does not run a prompt pass it cannot use."""
    import transformers
    from titok_tools import models
    from titok_tools.evaluate import encode_options, option_loglikelihoods
    from titok_tools.records import prompt_and_completion

    model, tokenizer = models.load_model(tiny_llama, dtype="float32", device="cpu"), models.load_tokenizer(tiny_llama)
    messages, _ = prompt_and_completion({"prompt": LONG_PROMPT, "completion": "x"}, "test")
    encs = encode_options(tokenizer, messages, LONG_OPTIONS, True, 768, "test")
    body, _ = models.decoder_and_head(model)
    monkeypatch.setattr(transformers, "DynamicCache", type("OtherCache", (), {}))  # no cache is one now
    monkeypatch.setattr(models, "_UNSHARED_CACHE", set())
    seen = []
    hook = body.embed_tokens.register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    try:
        [first] = option_loglikelihoods(model, tokenizer, [encs], batch_size=8)
        [second] = option_loglikelihoods(model, tokenizer, [encs], batch_size=8)
    finally:
        hook.remove()
    assert first == pytest.approx(reference_loglikelihoods(tiny_llama, None, LONG_PROMPT, LONG_OPTIONS), abs=1e-4)
    assert second == pytest.approx(first, abs=1e-6)
    shared, whole = min(e.positions[0] for e in encs), len(encs) * max(len(e.input_ids) for e in encs)
    assert seen == [shared, whole, whole]  # the prompt pass once, then whole sequences only


def test_batch_size_limit_and_no_choices(tiny_llama, choice_data, tmp_path):
    records, _, data = choice_data
    one = read_jsonl(run_eval("--model", tiny_llama, "--choices", "--batch-size", "1", data).stdout_bytes)
    many = read_jsonl(run_eval("--model", tiny_llama, "--choices", "--batch-size", "8", data).stdout_bytes)
    for a, b in zip(one, many):
        assert a.get("choice") == b.get("choice")
        assert a.get("choice_loglikelihoods", []) == pytest.approx(b.get("choice_loglikelihoods", []), abs=1e-5)

    run_eval("--model", tiny_llama, "--choices", "--limit", "2", "--metrics", tmp_path / "m.json", data)
    metrics = json.load(open(tmp_path / "m.json"))
    assert metrics["records"] == 2 and metrics["choice_records"] == 1

    plain = run_eval("--model", tiny_llama, "--metrics", tmp_path / "plain.json", data)
    assert not any("choice" in r for r in read_jsonl(plain.stdout_bytes))
    assert not any(key.startswith("choice") for key in json.load(open(tmp_path / "plain.json")))


def test_resume_with_choices_equals_an_uninterrupted_run(tiny_llama, choice_data, tmp_path):
    _, _, data = choice_data
    out, metrics = tmp_path / "out.jsonl", tmp_path / "m.json"
    args = ["--model", tiny_llama, "--choices", "--batch-size", "2", "--metrics", metrics, "-o", out, data]
    run_eval(*args)
    full, full_metrics = out.read_bytes(), json.load(open(metrics))
    lines = full.splitlines(keepends=True)
    out.unlink()
    partial = tmp_path / "out.jsonl.partial"
    partial.write_bytes(lines[0] + lines[1][:30])  # a killed run: one record and half a line
    run_eval(*args, "--resume")
    assert out.read_bytes() == full and json.load(open(metrics)) == full_metrics

    # An interrupted run without --choices cannot be resumed with it: its records have no choices.
    stripped = json.loads(lines[0])
    del stripped["choice"], stripped["choice_norm"], stripped["choice_loglikelihoods"]
    partial.write_text(json.dumps(stripped) + "\n")
    result = CliRunner().invoke(main, ["--max-new-tokens", "3", *map(str, args), "--resume"])
    assert result.exit_code == 1
    assert "out.jsonl.partial:1: choice_loglikelihoods: missing or not one per option" in result.output


def test_bad_options_are_named_and_unreachable_references_warned(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Pick one\n(A) x\n(B) y", "completion": "x", "options": ["x", "y"]},
                                               {"prompt": "Pick", "completion": "x", "options": "x, y"},
                                               {"prompt": "Pick", "completion": "x", "options": ["x", " "]}])
    result = CliRunner().invoke(main, ["--model", tiny_llama, "--max-new-tokens", "2", "--choices", data])
    assert result.exit_code == 1
    assert f"{data}:2: options: must be a non-empty list of non-empty strings" in result.output
    result = CliRunner().invoke(main, ["--model", tiny_llama, "--max-new-tokens", "2", "--choices", "--skip-invalid",
                                       "--metrics", str(tmp_path / "m.json"), data])
    assert result.exit_code == 0, result.output
    metrics = json.load(open(tmp_path / "m.json"))
    assert metrics["choice_records"] == 1 and metrics["invalid"] == 2
    # Without --choices the options are not read at all.
    assert CliRunner().invoke(main, ["--model", tiny_llama, "--max-new-tokens", "2", data]).exit_code == 0

    # References that are labels, not option texts: the choice can never be right, and stderr says so.
    data = write_jsonl(tmp_path / "labels.jsonl", [{"prompt": "Pick one\n(A) x\n(B) y", "completion": "(A)",
                                                    "options": ["x", "y"]}])
    result = CliRunner().invoke(main, ["--model", tiny_llama, "--max-new-tokens", "2", "--choices", data])
    assert result.exit_code == 0 and "1 records with options have no reference among them" in result.stderr


def test_choose_takes_the_first_best_by_sum_and_per_character():
    # By sum the short option wins (-2 > -4); per character the long one (-1 per char > -2).
    assert choose(["abcd", "x"], [-4.0, -2.0]) == (1, 0)
    assert choose(["a", "b", "c"], [-1.0, -1.0, -3.0]) == (0, 0)  # ties: the first


def test_help_documents_choices():
    text = CliRunner().invoke(main, ["--help"]).output
    assert "--choices" in text and "choice_accuracy" in text and "acc_norm" in text


def test_report_shows_choice_columns_when_a_run_has_them(tmp_path):
    plain = {"records": 4, "exact_match": 0.25, "rouge1": 0.5, "rougeL": 0.5}
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    (tmp_path / "mc.json").write_text(json.dumps(dict(plain, choice_records=3, choice_accuracy=2 / 3,
                                                      choice_accuracy_norm=1 / 3)))
    out = tmp_path / "report.md"
    result = CliRunner().invoke(report_main, ["-o", str(out), f"mc={tmp_path / 'mc.json'}",
                                              f"plain={tmp_path / 'plain.json'}"])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "| model | records | exact match | ROUGE-1 | ROUGE-L | choice | choice per char |" in text
    assert "| mc | 4 | 25.0% | 0.500 | 0.500 | 66.7% | 33.3% |" in text
    assert "| plain | 4 | 25.0% | 0.500 | 0.500 | n/a | n/a |" in text
    result = CliRunner().invoke(report_main, ["-o", str(out), f"plain={tmp_path / 'plain.json'}"])
    assert result.exit_code == 0 and "choice" not in out.read_text()


def test_report_lists_the_dtype_each_run_resolved(tmp_path):
    plain = {"records": 4, "exact_match": 0.25, "rouge1": 0.5, "rougeL": 0.5}
    for name, dtype in [("a", "bfloat16"), ("b", "bfloat16"), ("c", "float32")]:
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(plain, dtype=dtype)))
    (tmp_path / "old.json").write_text(json.dumps(plain))  # a metrics file from before dtype was recorded
    out = tmp_path / "report.md"

    def report(*names):
        result = CliRunner().invoke(report_main, ["-o", str(out), "--setting", "dtype=auto",
                                                  *[f"{n}={tmp_path / n}.json" for n in names]])
        assert result.exit_code == 0, result.output
        return out.read_text()

    assert "- dtype: `auto`\n- dtype as run: `bfloat16`\n" in report("a", "b")
    assert "- dtype as run: a `bfloat16`, c `float32`\n" in report("a", "c")
    assert "- dtype as run: a `bfloat16`\n" in report("a", "old")
    assert "dtype as run" not in report("old")
