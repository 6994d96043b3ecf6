"""titok-train --kd-weight / --kd-temperature / --kd-only: the KL term against a hand computation,
its step-level normalization (accumulation, processes), resume, and its errors.

Records carry the teacher's top-N distributions as titok-score --topk and titok-align write them
(kd-interface: titok.{source,target}.topk_ids / topk_logp, one entry per completion token, null
where there is none); here they are made by hand.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import ROOT, write_jsonl
from test_train import ADAM_ATOL, WORDS, assert_grad_close, _cli_args, fresh_lora, masked_records, repeat_records
from titok_tools import train as train_module
from titok_tools.formatting import encode
from titok_tools.models import load_model, load_tokenizer
from titok_tools.train import Distill, main, masked_loss, prepare_examples, train


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return tiny_llama, load_tokenizer(tiny_llama)


def with_distributions(records, vocab, n=5, field="source", null_every=0, seed=0):
    """Records with hand-made top-n distributions on `field`: distinct random ids, descending
    log-probs; field "target" varies the width (N' <= N) as titok-align's merging does; every
    null_every-th token (from the second) has none."""
    g = torch.Generator().manual_seed(seed)
    for r in records:
        part = r["titok"][field]
        ids, logp = [], []
        for i in range(len(part["mask"])):
            if null_every and i % null_every == 1:
                ids.append(None)
                logp.append(None)
                continue
            width = n if field == "source" else 1 + i % n
            ids.append(torch.randperm(vocab, generator=g)[:width].tolist())
            logp.append(sorted((round(-0.05 - 6 * torch.rand(1, generator=g).item(), 4) for _ in range(width)),
                               reverse=True))
        part["topk_ids"], part["topk_logp"] = ids, logp
    return records


def kd_records(tokenizer, words, field="source", null_every=3, seed=0, without=()):
    """Masked records with distributions; the records at the indices `without` have none."""
    records = with_distributions(masked_records(tokenizer, repeat_records(words), seed=seed, field=field),
                                 len(tokenizer), field=field, null_every=null_every, seed=seed)
    for i in without:
        for key in ("topk_ids", "topk_logp"):
            records[i]["titok"][field].pop(key)
    return records


def kd_examples(records, tokenizer, all_tokens=False, counts=None):
    return prepare_examples(((f"in:{i + 1}", r) for i, r in enumerate(records)), tokenizer, model="tiny",
                            all_tokens=all_tokens, train_closing=False, counts=counts, distill=True)


def reference_loss(model, tokenizer, records, field, distill):
    """The step loss by explicit formulas: each record alone through the model's full forward,
    NLL and T^2 * KL(q || p) summed per token in float64 with math.exp / math.log."""
    T, nll, norm, kl, kd_norm = distill.temperature, 0.0, 0.0, 0.0, 0.0
    for r in records:
        part = r["titok"][field]
        enc = encode(tokenizer, [{"role": "user", "content": r["prompt"]}], r["completion"])
        with torch.no_grad():
            logits = model(torch.tensor([enc.input_ids])).logits[0].double()
        for j, (p, m) in enumerate(zip(enc.positions, part["mask"])):
            if m == 0:
                continue
            nll += m * -logits[p - 1].log_softmax(-1)[enc.input_ids[p]].item()
            norm += m
            if part.get("topk_ids") is None or part["topk_ids"][j] is None:
                continue
            scaled = [lp / T for lp in part["topk_logp"][j]]
            z = math.log(sum(math.exp(s) for s in scaled))
            q = [math.exp(s - z) for s in scaled]
            student = (logits[p - 1] / T).log_softmax(-1)
            kl += m * T * T * sum(qk * (math.log(qk) - student[i].item()) for qk, i in zip(q, part["topk_ids"][j]))
            kd_norm += m
    return (0.0 if distill.only else nll / norm) + distill.weight * kl / kd_norm


@pytest.mark.parametrize("distill", [Distill(0.7, 2.0), Distill(1.5, 0.5, only=True), Distill(1.0, 1.0),
                                     Distill(1.0, 1.0, only=True)])  # T = 1 shares one log-softmax
def test_kl_term_is_the_hand_computed_kl(tiny, distill):
    """Fractional mask weights, null entries, widths N' that differ per token (target side), one
    record with no distribution at all: the trainer's loss of one batch is the formula's."""
    model_dir, tokenizer = tiny
    records = kd_records(tokenizer, ["apple", "forest", "velvet wallet", "one two three four five"], field="target",
                         without=[2])
    g = torch.Generator().manual_seed(5)
    for r in records:
        mask = r["titok"]["target"]["mask"]
        r["titok"]["target"]["mask"] = [round(0.1 + 0.9 * torch.rand(1, generator=g).item(), 3) if m else 0 for m in mask]
    counts = {}
    examples = kd_examples(records, tokenizer, counts=counts)
    assert counts["no_distribution"] == 1 and 0 < counts["distilled_tokens"] < counts["selected_tokens"]
    assert len({e.teacher_ids.shape[1] for e in examples if e.teacher_at}) > 1          # the widths differ
    model = load_model(model_dir, dtype="float32", device="cpu")
    with torch.no_grad():
        got = masked_loss(model, examples, tokenizer.pad_token_id, distill=distill).item()
        nll = masked_loss(model, examples, tokenizer.pad_token_id).item()
    expected = reference_loss(model, tokenizer, records, "target", distill)
    assert got == pytest.approx(expected, rel=1e-5)
    assert abs(got - nll) > 1e-2                      # the KL term is there, and is not the NLL


def _train_kd(model_dir, examples, pad_id, monkeypatch, **kwargs):
    """A run's history, final LoRA weights, and the gradient of its first step (before clipping)."""
    grads, real_clip = [], torch.nn.utils.clip_grad_norm_

    def keep_grads(params, *args, **kw):
        grads.append([p.grad.clone() for p in params])
        return real_clip(params, *args, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", keep_grads)
    model = fresh_lora(model_dir)
    history = train(model, examples, pad_id, lr=1e-2, seed=3, progress=False, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)
    return history, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}, grads[0]


@pytest.mark.parametrize("distill", [Distill(0.8, 2.0), Distill(1.0, 1.0, only=True)])
def test_grad_accumulation_gives_the_same_kd_steps_as_one_big_batch(tiny, monkeypatch, distill):
    """n_kd is the step's, not the micro-batch's: batch 4 = 2 x 2 accumulation = 1 x 4. Some
    records have no distribution, so a micro-batch's share of n_kd differs from its share of the
    NLL's normalizer (a per-micro-batch mean would show)."""
    model_dir, tokenizer = tiny
    records = kd_records(tokenizer, WORDS[:10] + ["one two three four five six"], without=[0, 3, 4])
    examples = kd_examples(records, tokenizer)
    pad = tokenizer.pad_token_id
    big, w_big, g_big = _train_kd(model_dir, examples, pad, monkeypatch, batch_size=4, grad_accum=1, distill=distill)
    acc, w_acc, g_acc = _train_kd(model_dir, examples, pad, monkeypatch, batch_size=2, grad_accum=2, distill=distill)
    one, w_one, g_one = _train_kd(model_dir, examples, pad, monkeypatch, batch_size=1, grad_accum=4, distill=distill)
    assert len(big["loss"]) == 6 and len(big["kl"]) == 6
    for other in (acc, one):
        assert other["loss"] == pytest.approx(big["loss"], rel=1e-5)
        assert other["kl"] == pytest.approx(big["kl"], rel=1e-5)
    assert big["kl"][-1] < big["kl"][0]
    # The first step's loss is the batch's, as masked_loss computes it.
    step_one = [examples[i] for i in train_module.step_batches(len(examples), 0, 0, seed=3, batch_size=4, grad_accum=1,
                                                               world=1, rank=0)[0]]
    with torch.no_grad():
        assert big["loss"][0] == pytest.approx(masked_loss(fresh_lora(model_dir), step_one, pad, distill=distill).item(),
                                               rel=1e-5)
    for grads in (g_acc, g_one):
        for got, want in zip(grads, g_big):
            assert_grad_close(got, want)
    for k in w_big:   # see test_train's ADAM_ATOL
        torch.testing.assert_close(w_acc[k], w_big[k], atol=ADAM_ATOL, rtol=1e-5)
        torch.testing.assert_close(w_one[k], w_big[k], atol=ADAM_ATOL, rtol=1e-5)


def test_kd_changes_the_adapter_and_reports_its_records(tiny, tmp_path):
    """W = 0 trains the NLL alone; --kd-weight adds the KL; --kd-only trains the KL alone (its
    loss is the KL). Three different adapters, and the summary counts the records with no
    distribution."""
    model_dir, tokenizer = tiny
    data = write_jsonl(tmp_path / "data.jsonl", kd_records(tokenizer, WORDS[:8], without=[1, 5]))
    runs = {"nll": [], "kd": ["--kd-weight", "1"], "kd_only": ["--kd-only"]}
    adapters, infos = {}, {}
    for name, flags in runs.items():
        result = CliRunner().invoke(main, _cli_args(model_dir, tmp_path / name, data, "--lora-dropout", "0", *flags))
        assert result.exit_code == 0, result.output
        adapters[name] = load_file(tmp_path / name / "adapter_model.safetensors")
        infos[name] = json.load(open(tmp_path / name / "titok_train.json"))
    for a, b in (("nll", "kd"), ("nll", "kd_only"), ("kd", "kd_only")):
        assert max((adapters[a][k] - adapters[b][k]).abs().max().item() for k in adapters[a]) > 1e-4, (a, b)
    assert "kd" not in infos["nll"]
    for name in ("kd", "kd_only"):
        assert infos[name]["kd"]["records_without_distributions"] == 2
        assert infos[name]["kd"]["distilled_tokens_per_epoch"] > 0
    assert infos["kd_only"]["loss"] == pytest.approx(infos["kd_only"]["kd"]["kl"], rel=1e-6)
    assert infos["kd"]["loss"][0] == pytest.approx(infos["nll"]["loss"][0] + infos["kd"]["kd"]["kl"][0], rel=1e-5)


def test_resume_with_kd_reaches_the_same_weights(tiny, tmp_path, monkeypatch):
    model_dir, tokenizer = tiny
    data = write_jsonl(tmp_path / "data.jsonl", kd_records(tokenizer, WORDS[:12], without=[2]))
    args = ["--neftune-alpha", "5", "--lora-dropout", "0.1", "--epochs", "2", "--save-every", "2",
            "--kd-weight", "0.5", "--kd-temperature", "2"]
    runner = CliRunner()
    assert runner.invoke(main, _cli_args(model_dir, tmp_path / "straight", data, *args)).exit_code == 0
    real_train = train_module.train

    def crash_at_step_5(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", lambda *a, **kw: real_train(*a, **dict(kw, on_step=crash_at_step_5)))
    assert runner.invoke(main, _cli_args(model_dir, tmp_path / "resumed", data, *args)).exit_code != 0
    assert json.load(open(tmp_path / "resumed.checkpoint" / "state.json"))["step"] == 4
    monkeypatch.setattr(train_module, "train", real_train)
    resumed = runner.invoke(main, _cli_args(model_dir, tmp_path / "resumed", data, *args, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    info_a = json.load(open(tmp_path / "straight" / "titok_train.json"))
    info_b = json.load(open(tmp_path / "resumed" / "titok_train.json"))
    assert info_b["kd"]["kl"] == pytest.approx(info_a["kd"]["kl"], abs=1e-6) and len(info_a["kd"]["kl"]) == 6
    assert info_b["loss"] == pytest.approx(info_a["loss"], abs=1e-6)


def test_two_processes_give_the_same_kd_run_as_one(tiny, tmp_path):
    model_dir, tokenizer = tiny
    data = write_jsonl(tmp_path / "data.jsonl", kd_records(tokenizer, WORDS[:11], without=[0, 6]))
    kd = ["--lora-dropout", "0", "--kd-weight", "0.7", "--kd-temperature", "1.5"]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "titok_tools.train",
                        *_cli_args(model_dir, tmp_path / "two", data, *kd, "--batch-size", "2")],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    result = CliRunner().invoke(main, _cli_args(model_dir, tmp_path / "one", data, *kd, "--batch-size", "4"))
    assert result.exit_code == 0, result.output
    two = json.load(open(tmp_path / "two" / "titok_train.json"))
    one = json.load(open(tmp_path / "one" / "titok_train.json"))
    assert two["processes"] == 2 and len(two["loss"]) == len(one["loss"]) == 6
    assert two["kd"]["kl"] == pytest.approx(one["kd"]["kl"], rel=1e-5)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    w1, w2 = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "two" / "adapter_model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=ADAM_ATOL, rtol=1e-5)


def test_all_tokens_reads_the_target_distributions_first(tiny):
    """The KD+MinED baseline (--all-tokens --kd-only) on aligned records of the same tokenizer:
    the target's distributions, as the mask rule picks the target's mask."""
    _, tokenizer = tiny
    words = WORDS[:3]
    sources = kd_records(tokenizer, words, field="source", seed=0)
    targets = kd_records(tokenizer, words, field="target", seed=1)
    both = [dict(s, titok={**s["titok"], **t["titok"]}) for s, t in zip(sources, targets)]
    for r, e in zip(both, kd_examples(both, tokenizer, all_tokens=True)):
        target = r["titok"]["target"]
        enc = encode(tokenizer, [{"role": "user", "content": r["prompt"]}], r["completion"])
        listed = [j for j, ids in enumerate(target["topk_ids"]) if ids is not None and enc.positions[j] > 0]
        assert [e.positions[k] for k in e.teacher_at] == [enc.positions[j] for j in listed]
        for row, j in zip(e.teacher_ids.tolist(), listed):
            assert row[:len(target["topk_ids"][j])] == target["topk_ids"][j]


@pytest.mark.parametrize("case, flags, message", [
    ("none", ["--kd-only"], "--kd-only: no trained token has a teacher distribution"),
    ("none", ["--kd-weight", "0.5"], "--kd-weight: no trained token has a teacher distribution"),
    ("ids_length", ["--kd-weight", "1"], "titok.source.topk_ids: has 2 entries but the completion has"),
    ("logp_missing", ["--kd-weight", "1"], "titok.source.topk_logp: must be a list with one entry per completion token"),
    ("entry_width", ["--kd-weight", "1"], "titok.source.topk_logp[0]: must be a list of 5 log-probs"),
    ("duplicate_ids", ["--kd-weight", "1"], "titok.source.topk_ids[0]: must be null or a non-empty list of distinct"),
    ("not_a_number", ["--kd-weight", "1"], "titok.source.topk_logp[0][2]: must be a number, not \"x\""),
    ("outside_vocabulary", ["--kd-weight", "1"], "titok.source.topk_ids: id 1000000 is outside --model's vocabulary"),
])
def test_bad_distributions_are_one_clear_error(tiny, tmp_path, case, flags, message):
    model_dir, tokenizer = tiny
    records = kd_records(tokenizer, ["apple", "forest"], without=[0, 1] if case == "none" else [], null_every=0)
    source = records[1]["titok"]["source"]
    if case == "ids_length":
        source["topk_ids"] = source["topk_ids"][:2]
    elif case == "logp_missing":
        source.pop("topk_logp")
    elif case == "entry_width":
        source["topk_logp"][0] = source["topk_logp"][0][:-1]
    elif case == "duplicate_ids":
        source["topk_ids"][0][1] = source["topk_ids"][0][0]
    elif case == "not_a_number":
        source["topk_logp"][0][2] = "x"
    elif case == "outside_vocabulary":
        source["topk_ids"][0][0] = 10 ** 6
    data = write_jsonl(tmp_path / "data.jsonl", records)
    result = CliRunner().invoke(main, _cli_args(model_dir, tmp_path / "out", data, *flags))
    assert result.exit_code == 1, result.output
    error = result.output.strip().splitlines()[-1]        # one line, after the log's (if any)
    assert error.startswith("Error: ") and message in error
    if case != "none":
        assert f"{data}:2" in error
    if case != "outside_vocabulary":                      # found before the model is loaded
        assert len(result.output.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")


def test_without_kd_the_distributions_are_not_read(tiny, tmp_path):
    """W = 0: the records' topk fields play no part (a bad one is not even an error)."""
    model_dir, tokenizer = tiny
    records = kd_records(tokenizer, ["apple", "forest"])
    records[1]["titok"]["source"]["topk_ids"] = "garbage"
    data = write_jsonl(tmp_path / "data.jsonl", records)
    result = CliRunner().invoke(main, _cli_args(model_dir, tmp_path / "out", data, "--epochs", "1"))
    assert result.exit_code == 0, result.output


def test_help_teaches_the_kd_options():
    text = " ".join(CliRunner().invoke(main, ["--help"]).output.split())
    for flag in ("--kd-weight", "--kd-temperature", "--kd-only"):
        assert flag in text
    for phrase in ("titok-score --topk", "titok-align", "KL(teacher || student)", "T^2"):
        assert phrase in text
