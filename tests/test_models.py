"""models: project_logits against each family's own forward (and the load-time check that refuses a
family it does not reproduce), and the base an adapter records for itself."""
import json
import logging
import os

import pytest
import torch
from click.testing import CliRunner

from conftest import write_jsonl
from titok_tools.errors import TitokError
from titok_tools import models
from titok_tools.models import base_model_name, load_model, names_same_base, resolve

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

# model_type -> config fields: each family's own way of turning the head's output into logits.
FAMILIES = {
    "llama": {},
    "gemma3_text": dict(head_dim=16, sliding_window=64, final_logit_softcapping=0.5),   # a cap that bites
    "granite": dict(logits_scaling=4.0),                                               # divides
    "hyperclovax": dict(logits_scaling=0.25),                                          # multiplies
    "cohere": dict(logit_scale=0.5),
    "falcon_h1": dict(lm_head_multiplier=0.25, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16,
                      mamba_chunk_size=16),
}


def tiny_family_model(model_type, out_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **COMMON, **FAMILIES[model_type])
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():   # logits of a few units, as a trained model's, so a wrong scale or cap shows
        model.get_output_embeddings().weight.normal_(0, 1)
    model.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return {t: tiny_family_model(t, tmp_path_factory.mktemp(t)) for t in FAMILIES}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_project_logits_matches_the_forward_of_each_family(family_dirs, model_type):
    model = load_model(family_dirs[model_type], dtype="float32", device="cpu")   # runs the check
    assert model.config.model_type == model_type
    body, head = models.decoder_and_head(model)
    ids = torch.tensor([[5, 17, 300, 42, 7, 99]])
    with torch.no_grad():
        theirs = model(ids).logits[0, :-1]
        ours = models.project_logits(model, head, models.predicting_hidden(body, ids, torch.zeros(5, dtype=torch.long),
                                                                           torch.arange(1, 6)))
        plain = head(body(input_ids=ids).last_hidden_state[0, :-1])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if model_type != "llama":
        assert (plain - theirs).abs().max() > 0.1          # the family's transform matters here


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_load_check_tolerates_rounding_of_low_precision_weights(family_dirs, dtype):
    for model_type in ("llama", "gemma3_text", "granite"):
        load_model(family_dirs[model_type], dtype=dtype, device="cpu")


def test_a_family_with_its_own_logit_scaling_is_refused_at_load(family_dirs, monkeypatch):
    from transformers import LlamaForCausalLM

    forward = LlamaForCausalLM.forward

    def halved_logits(self, *args, **kwargs):     # a family unknown to project_logits
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", halved_logits)
    with pytest.raises(TitokError, match="model type 'llama' computes its logits in a way"):
        load_model(family_dirs["llama"], dtype="float32", device="cpu")
    # Generation does not project logits itself, so it may skip the check.
    load_model(family_dirs["llama"], dtype="float32", device="cpu", check_logits=False)


def test_granites_division_is_refused_for_hyperclovax(family_dirs, monkeypatch):
    """The bug this guards: HyperCLOVAX multiplies by logits_scaling, Granite divides."""
    monkeypatch.setattr(models, "MULTIPLY_LOGITS_SCALING", set())
    with pytest.raises(TitokError, match="'hyperclovax'"):
        load_model(family_dirs["hyperclovax"], dtype="float32", device="cpu")


# ---------------------------------------------------------------------------------------------
# The base an adapter records


def test_base_model_name_is_loadable_from_anywhere(tiny_llama, smollm2_gguf, smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(tiny_llama))
    relative = os.path.basename(tiny_llama)
    assert base_model_name(relative) == os.path.abspath(tiny_llama)
    assert base_model_name(tiny_llama) == os.path.abspath(tiny_llama)
    assert base_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    gguf_dir = base_model_name(smollm2_gguf)
    assert gguf_dir == os.path.abspath(smollm2_dir) and os.path.isfile(os.path.join(gguf_dir, "config.json"))

    # titok-score's "made for base" check accepts the recorded name for --model written any way...
    assert names_same_base(base_model_name(relative), relative, relative)
    assert names_same_base(base_model_name(relative), tiny_llama, tiny_llama)
    monkeypatch.chdir(os.path.dirname(smollm2_gguf))
    for gguf in (smollm2_gguf, os.path.basename(smollm2_gguf)):
        assert names_same_base(gguf_dir, gguf, resolve(gguf))
    # ...an adapter saved with the raw string before (a relative dir, an HF id) still matches...
    assert names_same_base(relative, tiny_llama, tiny_llama)
    assert names_same_base("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
                           "HuggingFaceTB/SmolLM2-135M-Instruct")
    # ...and another model is still flagged.
    assert not names_same_base(gguf_dir, tiny_llama, tiny_llama)
    assert not names_same_base(os.path.abspath(tiny_llama), smollm2_gguf, resolve(smollm2_gguf))


def test_trained_adapter_from_a_relative_dir_loads_anywhere(tiny_llama, tmp_path, monkeypatch, caplog):
    from peft import AutoPeftModelForCausalLM
    from titok_tools.train import main

    monkeypatch.chdir(os.path.dirname(tiny_llama))
    relative = os.path.basename(tiny_llama)
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "Say hi", "completion": "hi there"}] * 2)
    result = CliRunner().invoke(main, ["--model", relative, "--all-tokens", "--dtype", "float32", "--epochs", "1",
                                       "--output", str(tmp_path / "adapter"), data])
    assert result.exit_code == 0, result.output
    config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert config["base_model_name_or_path"] == os.path.abspath(tiny_llama)

    monkeypatch.chdir(tmp_path)       # elsewhere: PEFT finds the base by itself
    assert AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")) is not None
    monkeypatch.chdir(os.path.dirname(tiny_llama))
    with caplog.at_level(logging.WARNING, logger="titok"):
        for model in (relative, tiny_llama):
            load_model(model, str(tmp_path / "adapter"), dtype="float32", device="cpu")
    assert "was made for base" not in caplog.text


def test_log_probs_of_a_bfloat16_model_are_a_float32_log_softmax(tiny_llama):
    # docs/design.md, Excess: the model may run in bf16, its log-softmax runs in float32 (in bf16 a log-prob
    # keeps 8 bits of mantissa: excess, a difference of two, would be mostly rounding)
    model = load_model(tiny_llama, dtype="bfloat16", device="cpu")
    body, head = models.decoder_and_head(model)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 250, 11]])
    with torch.no_grad():
        hidden = body(input_ids=ids).last_hidden_state[0, :-1]
        ours = models.token_logprobs(model, head, hidden, ids[0, 1:])
        logits = model(input_ids=ids).logits[0, :-1].float()
    reference = torch.log_softmax(logits, dim=-1)[torch.arange(7), ids[0, 1:]]
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, reference, atol=1e-4)
    assert not torch.equal(ours, ours.bfloat16().float())  # not bf16 numbers widened afterwards


@pytest.mark.parametrize("native", [True, False])
def test_cpu_dtype_follows_native_bf16_and_an_emulated_bf16_warns_once(native, monkeypatch, caplog):
    """auto is bfloat16 only on a CPU that runs it natively; an explicit bfloat16 on one that emulates it
    (about 20x slower to train here: bench/bench_dtype.py, README) is honoured, with one warning per process."""
    monkeypatch.setattr(models, "cpu_runs_bf16", lambda: native)
    models._warn_emulated_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="titok"):
        assert models.resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
        assert models.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
        assert models.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
        assert models.resolve_dtype("float32", "cpu") == torch.float32
    warnings = [r for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warnings) == (0 if native else 1)
    models._warn_emulated_bf16.cache_clear()
