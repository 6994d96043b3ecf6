"""titok-score --topk N: the expert's top-N token ids and log-probs, against an independent
plain forward, their relation to logp_expert, the summary's bytes per token, and --resume."""
import numpy as np
import orjson
import pytest
import torch
from click.testing import CliRunner

from conftest import make_lora, read_jsonl, write_jsonl
from record_contract import file_problems
from test_score import RECORDS
from titok_tools.formatting import encode
from titok_tools.models import load_model, load_tokenizer
from titok_tools.records import prompt_and_completion
from titok_tools.score import main, score_records

N = 5


def reference_logprobs(model_dir, adapter, record):
    """Independent reference: a separately loaded expert (base + adapter) and base, one record,
    no padding, the model's own full logits, log-softmax in float32; the (tokens, vocab) log-probs
    at the positions that predict the completion tokens, and the completion's token ids."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    enc = encode(load_tokenizer(model_dir), *prompt_and_completion(record, "ref"))
    expert = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    predicting = [p - 1 for p in enc.positions]
    with torch.no_grad():
        return [torch.log_softmax(m.eval()(torch.tensor([enc.input_ids])).logits[0].float(), -1)[predicting]
                for m in (expert, base)] + [torch.tensor(enc.token_ids)]


@pytest.fixture(scope="module")
def scored_with_topk(tiny_llama, tiny_llama_lora, tmp_path_factory):
    data = write_jsonl(tmp_path_factory.mktemp("topk") / "in.jsonl", RECORDS)
    result = CliRunner().invoke(main, ["--model", tiny_llama, "--adapter", tiny_llama_lora, "--dtype", "float32",
                                       "--device", "cpu", "--batch-tokens", "300", "--topk", str(N), data])
    assert result.exit_code == 0, result.output
    return result


def test_topk_is_the_experts_top_n_of_a_plain_forward(scored_with_topk, tiny_llama, tiny_llama_lora):
    for record, scored in zip(RECORDS, read_jsonl(scored_with_topk.stdout_bytes)):
        source = scored["titok"]["source"]
        expert, base, token_ids = reference_logprobs(tiny_llama, tiny_llama_lora, record)
        values, ids = expert.topk(N, dim=-1)
        stored_ids, stored_logp = np.array(source["topk_ids"]), np.array(source["topk_logp"])
        assert stored_ids.shape == stored_logp.shape == (len(token_ids), N)
        np.testing.assert_allclose(stored_logp, values, atol=1e-5)  # the top N values, descending
        # each stored id has its stored log-prob (so a near-tie may swap two ids, never change a value)
        np.testing.assert_allclose(expert.gather(1, torch.tensor(stored_ids)), stored_logp, atol=1e-5)
        assert (stored_ids == ids.numpy()).mean() > 0.9
        # the expert's distribution, not the base's: the random adapter moves it
        assert np.abs(base.gather(1, torch.tensor(stored_ids)).numpy() - stored_logp).max() > 1e-3
        np.testing.assert_allclose(source["logp_expert"], expert.gather(1, token_ids[:, None])[:, 0], atol=1e-5)


def test_the_records_keep_the_contract(scored_with_topk, tmp_path):
    assert file_problems(write_jsonl(tmp_path / "scored.jsonl", read_jsonl(scored_with_topk.stdout_bytes))) == []


def test_with_the_whole_vocabulary_the_lists_are_the_full_distribution(tiny_llama, tiny_llama_lora):
    """N = the vocabulary: every token's own id is listed with exactly its logp_expert (the same
    float32 number), and the probabilities sum to 1 (a full-vocabulary softmax, temperature 1)."""
    model = load_model(tiny_llama, tiny_llama_lora, dtype="float32", device="cpu")
    vocab = model.get_output_embeddings().weight.shape[0]
    pairs = [("x:1", dict(RECORDS[1]))]
    [(_, record)] = score_records(pairs, model, load_tokenizer(tiny_llama), scored_by={}, topk=vocab)
    source = record["titok"]["source"]
    ids, logp = source["topk_ids"], source["topk_logp"]
    assert ids.shape == (len(source["token_ids"]), vocab) and (np.sort(ids, axis=1) == np.arange(vocab)).all()
    assert (np.diff(logp, axis=1) <= 0).all()
    for i, token in enumerate(source["token_ids"]):
        assert logp[i][list(ids[i]).index(token)] == source["logp_expert"][i]
    np.testing.assert_allclose(np.exp(logp.astype(np.float64)).sum(1), 1.0, atol=1e-5)


def test_the_summary_reports_bytes_per_token(scored_with_topk):
    records = read_jsonl(scored_with_topk.stdout_bytes)
    tokens = sum(len(r["titok"]["source"]["token_ids"]) for r in records)
    lists = sum(len(orjson.dumps(r["titok"]["source"][key])) for r in records for key in ("topk_ids", "topk_logp"))
    assert (f"{len(scored_with_topk.stdout_bytes) / tokens:.0f} bytes/token written "
            f"({lists / tokens:.0f} of them the top-N lists)") in scored_with_topk.stderr


def test_without_topk_the_records_and_summary_are_as_before(tiny_llama, tiny_llama_lora, scored_with_topk, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    plain = CliRunner().invoke(main, ["--model", tiny_llama, "--adapter", tiny_llama_lora, "--dtype", "float32",
                                      "--device", "cpu", "--batch-tokens", "300", data])
    assert plain.exit_code == 0, plain.output
    assert "bytes/token" not in plain.stderr
    without = read_jsonl(plain.stdout_bytes)
    assert all("topk_ids" not in r["titok"]["source"] and "topk_logp" not in r["titok"]["source"] for r in without)
    # the same numbers, the top-N lists added and nothing else changed
    for r in read_jsonl(scored_with_topk.stdout_bytes):
        del r["titok"]["source"]["topk_ids"], r["titok"]["source"]["topk_logp"]
        assert orjson.dumps(r) == orjson.dumps(without.pop(0))


def test_topk_needs_a_count_within_the_vocabulary(tiny_llama, tiny_llama_lora, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS[:1])
    args = ["--model", tiny_llama, "--adapter", tiny_llama_lora, data, "--topk"]
    zero = CliRunner().invoke(main, args + ["0"])
    assert zero.exit_code == 2 and "Invalid value for '--topk'" in zero.output
    huge = CliRunner().invoke(main, args + ["1000000"])
    assert huge.exit_code == 2 and "1000000 is more than the model's" in huge.output


def test_resume_with_topk_gives_the_same_bytes(tiny_llama, tiny_llama_lora, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [dict(r, id=f"{r['id']}{i}") for i in range(2) for r in RECORDS])
    out = tmp_path / "out.jsonl"
    args = ["--model", tiny_llama, "--adapter", tiny_llama_lora, "--topk", "3", "--batch-tokens", "200", "-o", str(out)]
    assert CliRunner().invoke(main, args + [data]).exit_code == 0
    lines = out.read_bytes().splitlines(keepends=True)
    out.unlink()
    (tmp_path / "out.jsonl.partial").write_bytes(b"".join(lines[:3]) + lines[3][:50])  # a killed run's
    resumed = CliRunner().invoke(main, args + ["--resume", data])
    assert resumed.exit_code == 0, resumed.output
    assert "scored 5 records" in resumed.stderr and "bytes/token written" in resumed.stderr
    assert out.read_bytes() == b"".join(lines)


def test_resume_refuses_a_file_scored_another_way(tiny_llama, tiny_llama_lora, tmp_path):
    """A resumed file goes on as it began: the same --topk N (or none), else a one-line error and the
    records already written stay as they are."""
    data = write_jsonl(tmp_path / "in.jsonl", [dict(r, id=f"{r['id']}{i}") for i in range(2) for r in RECORDS])
    out = tmp_path / "out.jsonl"
    base = ["--model", tiny_llama, "--adapter", tiny_llama_lora, "--batch-tokens", "200", "-o", str(out)]
    assert CliRunner().invoke(main, base + ["--topk", "3", data]).exit_code == 0
    lines = out.read_bytes().splitlines(keepends=True)
    out.unlink()
    partial = tmp_path / "out.jsonl.partial"
    for other, was in ((["--topk", "4"], "--topk 3"), ([], "--topk 3")):
        partial.write_bytes(b"".join(lines[:3]))
        result = CliRunner().invoke(main, base + other + ["--resume", data])
        assert result.exit_code == 1
        assert f"{out}: its records were scored {was}: resume the same way, or start a new file" in result.output
        assert partial.read_bytes() == b"".join(lines[:3]) and not out.exists()
    assert CliRunner().invoke(main, base + ["--topk", "3", "--resume", data]).exit_code == 0
    assert out.read_bytes() == b"".join(lines)
    # and the other way round: a file scored without --topk
    assert CliRunner().invoke(main, base + [data]).exit_code == 0
    plain = out.read_bytes().splitlines(keepends=True)
    out.unlink()
    partial.write_bytes(b"".join(plain[:2]))
    result = CliRunner().invoke(main, base + ["--topk", "3", "--resume", data])
    assert result.exit_code == 1 and "its records were scored without --topk" in result.output


def test_resume_refuses_a_file_scored_with_another_adapter(tiny_llama, tiny_llama_lora, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "out.jsonl"
    assert CliRunner().invoke(main, ["--model", tiny_llama, "--adapter", tiny_llama_lora, "-o", str(out), data]).exit_code == 0
    (tmp_path / "out.jsonl.partial").write_bytes(out.read_bytes().splitlines(keepends=True)[0])
    out.unlink()
    other = make_lora(tiny_llama, tmp_path / "other-lora", seed=1)
    result = CliRunner().invoke(main, ["--model", tiny_llama, "--adapter", other, "-o", str(out), "--resume", data])
    assert result.exit_code == 1 and "its records were scored with another adapter" in result.output
