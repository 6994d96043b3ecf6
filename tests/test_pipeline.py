"""The whole transfer end to end on tiny random models, every command a real subprocess:
source SFT -> gen -> score | filter | align (another tokenizer) -> train -> eval, plus the
Makefile's wiring (make -n) and the report table."""
import json
import os
import subprocess

import pytest

from conftest import GEMMA_TEMPLATE, ROOT, read_jsonl, run_pipe, write_jsonl
from record_contract import file_problems

FAST = ["--dtype", "float32", "--device", "cpu"]
LOOSE_TEMPLATE = "example: Input: {text}\nkeep: all\nmin_words: 1\nallow_cut: yes\n---\n{task_description}\n\n{examples}\n\nInput:"


def task_records(n, offset=0):
    words = ["apple", "river", "seven", "blue", "market", "engine", "paper", "violin"]
    return [{"id": f"t{offset + i}", "prompt": f"Repeat the word: {words[i % 8]} {i}",
             "completion": f"{words[i % 8]} {i}", "task_description": "Repeat the word you are given."}
            for i in range(n)]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    write_jsonl(d / "train.jsonl", task_records(12))
    write_jsonl(d / "test.jsonl", task_records(4, offset=100))
    (d / "loose.txt").write_text(LOOSE_TEMPLATE)
    return d


def test_all_five_commands_end_to_end(tiny_llama, tiny_gemma, task, tmp_path):
    source_lora, target_lora = tmp_path / "source-lora", tmp_path / "target-lora"
    # 1. the source expert: plain SFT on the task data
    run_pipe(["titok-train", "--model", tiny_llama, *FAST, "--all-tokens", "--epochs", "1", "--batch-size", "4",
              "--lr", "1e-3", "--output", source_lora, task / "train.jsonl"])
    assert (source_lora / "adapter_model.safetensors").exists()
    # 2. synthetic queries and labels from the expert
    synthetic = tmp_path / "synthetic.jsonl"
    run_pipe(["titok-gen", "--model", tiny_llama, "--adapter", source_lora, *FAST, "--seed-examples",
              task / "train.jsonl", "--template", task / "loose.txt", "--num", "6", "--batch-size", "3",
              "--max-new-tokens", "8", "--label-max-new-tokens", "6", "--label-temperature", "1.0", "--no-shape-check", "-o", synthetic])
    generated = read_jsonl(synthetic)
    assert len(generated) == 6 and all(r["completion"].strip() for r in generated)
    assert file_problems(synthetic) == []
    # 3-5. score | filter | align onto another tokenizer (Gemma's), as one pipe
    out, _, err = run_pipe(["titok-score", "--model", tiny_llama, "--adapter", source_lora, *FAST, synthetic],
                           ["titok-filter", "-k", "0.5", "--keep", "4"],
                           ["titok-align", "--target-model", tiny_gemma, "--chat-template", GEMMA_TEMPLATE])
    aligned = read_jsonl(out)
    assert len(aligned) == 4 and "scored 6 records" in err and "kept 4 of 6" in err and "aligned 4 records" in err
    for r in aligned:
        source, target = r["titok"]["source"], r["titok"]["target"]
        assert source["tokenizer"] != target["tokenizer"]
        assert len(target["mask"]) == len(target["token_ids"]) and sum(target["mask"]) >= 1
        assert r["titok_gen"]["adapter"] == str(source_lora)  # fields of earlier stages pass through
    aligned_file = write_jsonl(tmp_path / "aligned.jsonl", aligned)
    assert file_problems(aligned_file) == []  # every part: source, filter, target
    # 6. the target LoRA on the selected tokens
    run_pipe(["titok-train", "--model", tiny_gemma, *FAST, "--epochs", "1", "--batch-size", "2",
              "--output", target_lora, aligned_file])
    info = json.loads((target_lora / "titok_train.json").read_text())
    # one epoch: the selected tokens, and each completion's closing token (trained by default)
    masks = [r["titok"]["target"]["mask"] for r in aligned]
    assert info["tokens_trained"] == sum(sum(m[:-1]) + 1 for m in masks)
    # 7. evaluation
    metrics = tmp_path / "metrics.json"
    out, _, _ = run_pipe(["titok-eval", "--model", tiny_gemma, "--adapter", target_lora, *FAST, "--max-new-tokens", "4",
                          "--metrics", metrics, task / "test.jsonl"])
    assert len(read_jsonl(out)) == 4 and json.loads(metrics.read_text())["records"] == 4
    # The report table from the metrics file.
    report = tmp_path / "report.md"
    run_pipe(["python", "-m", "titok_tools.report", "-o", report, "--setting", "M=4", f"target-titok={metrics}"])
    text = report.read_text()
    assert "| target-titok | 4 |" in text and "- M: `4`" in text


def test_make_wires_every_stage():
    """make -n shows the GPU pipeline's commands in dependency order without running them."""
    out = subprocess.run(["make", "-n", "-C", ROOT, "pipeline", "OUT=/tmp/titok-make-n", "DATA=/tmp/titok-make-n/data"],
                         capture_output=True, text=True, check=True).stdout
    order = ["titok-train --output /tmp/titok-make-n/source-expert", "titok-gen", "titok-score", "titok-filter -k 0.7",
             "titok-align --target-model meta-llama/Llama-3.1-8B-Instruct", "titok-train --output /tmp/titok-make-n/target-titok",
             "titok_tools.report"]
    positions = [out.find(cmd) for cmd in order]
    assert all(p >= 0 for p in positions), dict(zip(order, positions))
    assert positions == sorted(positions)
    assert "--model mistralai/Mistral-7B-Instruct-v0.3" in out and "--num $((2 * 250))" in out
    assert "align_args" not in out  # the report lists extra arguments only when there are some
    assert "target-titok-no-closing" not in out
    # EXTRA_EVALS adds the ablation row: TiTok without the closing token trained outside the budget
    ablation = subprocess.run(["make", "-n", "-C", ROOT, "pipeline", "OUT=/tmp/titok-make-n", "DATA=/tmp/titok-make-n/data",
                               "EXTRA_EVALS=target-titok-no-closing"], capture_output=True, text=True, check=True).stdout
    train = next(line for line in ablation.split("\n") if "--output /tmp/titok-make-n/target-titok-no-closing" in line)
    assert "--no-train-closing" in train and train.endswith("/tmp/titok-make-n/aligned.jsonl")
    assert "target-titok-no-closing=/tmp/titok-make-n/eval/target-titok-no-closing.json" in ablation
    # Each stage's extra arguments reach that stage's command (and the report's settings).
    extra = subprocess.run(["make", "-n", "-C", ROOT, "pipeline", "OUT=/tmp/titok-make-n", "DATA=/tmp/titok-make-n/data",
                            "SCORE_ARGS=--window 64", "ALIGN_ARGS=--skip-invalid"],
                           capture_output=True, text=True, check=True).stdout.split("\n")
    assert "--window 64" in next(line for line in extra if "titok-score" in line)
    assert "--skip-invalid" in next(line for line in extra if line.startswith("titok-align"))
    assert any('--setting align_args="--skip-invalid"' in line for line in extra)
    # A user's own file replaces a stage: with aligned.jsonl present, make starts after it.
    os.makedirs("/tmp/titok-make-n2", exist_ok=True)
    for name in ("aligned.jsonl",):
        open(f"/tmp/titok-make-n2/{name}", "w").close()
    out = subprocess.run(["make", "-n", "-C", ROOT, "/tmp/titok-make-n2/target-titok/adapter_config.json",
                          "OUT=/tmp/titok-make-n2"], capture_output=True, text=True, check=True).stdout
    assert "titok-train --output /tmp/titok-make-n2/target-titok" in out and "titok-score" not in out


def test_make_demo_runs_on_another_task_and_data():
    """DEMO_TASK, DEMO_DATA and DEMO_OUT point make demo at another task, data dir and output (make -n:
    nothing runs but the sub-make that prints the pipeline)."""
    out = subprocess.run(["make", "-n", "-C", ROOT, "demo", "DEMO_TASK=sports_understanding", "DEMO_OUT=/tmp/titok-demo-n",
                          "DEMO_DATA=/tmp/titok-demo-n-data"], capture_output=True, text=True, check=True).stdout
    assert "titok-bigbench --tasks sports_understanding --out /tmp/ " in out
    assert "--seed-examples /tmp/titok-demo-n-data/train.jsonl" in out
    assert '--title "TiTok transfer on sports_understanding"' in out
    assert "cp /tmp/titok-demo-n/report.md results/titok-demo-n.md" in out
    assert "target-titok-no-closing=/tmp/titok-demo-n/eval/target-titok-no-closing.json" in out
    evals = [line for line in out.split("\n") if line.startswith("titok-eval ")]
    assert len(evals) == 7 and all("--choices" in line for line in evals)  # options scored where records have them
    lora = "--lora-r 16 --lora-alpha 16 --target-modules all-linear --lr 3e-4"
    assert f"--all-tokens {lora} --epochs 2 --batch-size 8 /tmp/titok-demo-n-data/train.jsonl" in out  # the expert


def test_make_demo_takes_its_own_expert_recipe_and_gen_arguments():
    out = subprocess.run(["make", "-n", "-C", ROOT, "demo", "DEMO_OUT=/tmp/titok-demo-n", "DEMO_DATA=/tmp/titok-demo-n-data",
                          "DEMO_SFT_ARGS=--lr 3e-4 --epochs 5", "DEMO_GEN_ARGS=--rouge-threshold 1"],
                         capture_output=True, text=True, check=True).stdout
    assert "--resume -o /tmp/titok-demo-n/synthetic.jsonl --queries-from base" in out  # titok-gen's GEN_ARGS ...
    assert "--queries-per-prompt 16 --rouge-threshold 1\n" in out  # ... end with DEMO_GEN_ARGS
    expert = next(line for line in out.split("\n") if "--output /tmp/titok-demo-n/source-expert " in line)
    assert expert.endswith("--all-tokens --lr 3e-4 --epochs 5 /tmp/titok-demo-n-data/train.jsonl")
    titok = next(line for line in out.split("\n") if "--output /tmp/titok-demo-n/target-titok " in line)
    assert "--epochs 2" in titok and "--epochs 5" not in titok  # the targets keep the demo's budget


def test_make_logit_kd_rows():
    """The logit-KD rows turn titok-score --topk on, align the random samples, and train with the KL."""
    out = subprocess.run(["make", "-n", "-C", ROOT, "pipeline", "OUT=/tmp/titok-make-kd", "DATA=/tmp/titok-make-kd/data",
                          "EXTRA_EVALS=target-kdlogit target-titok-kd", "KD_TEMPERATURE=2"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert "--topk 20" in next(line for line in out if line.startswith("titok-score"))
    assert any(line.startswith("titok-align") and line.endswith("-o /tmp/titok-make-kd/random-aligned.jsonl  "
                                                                 "/tmp/titok-make-kd/random.jsonl") for line in out)
    kdlogit = next(line for line in out if "--output /tmp/titok-make-kd/target-kdlogit " in line)
    assert "--all-tokens --kd-only --kd-temperature 2" in kdlogit and kdlogit.endswith("random-aligned.jsonl")
    titok_kd = next(line for line in out if "--output /tmp/titok-make-kd/target-titok-kd " in line)
    assert "--kd-weight 1 --kd-temperature 2" in titok_kd and titok_kd.endswith("/tmp/titok-make-kd/aligned.jsonl")
    plain = subprocess.run(["make", "-n", "-C", ROOT, "pipeline", "OUT=/tmp/titok-make-kd", "DATA=/tmp/titok-make-kd/data"],
                           capture_output=True, text=True, check=True).stdout
    assert "--topk" not in plain and "random-aligned" not in plain  # without the rows, no distributions


def test_make_demo_seeds_retrains_the_targets_on_the_demo_pool(tmp_path):
    """make demo-seeds copies the demo's pool into a dir per seed, re-runs the pipeline there with
    SEED=s (the expert and its pool are copies, so only the target rows train), and tabulates each
    seeded row over the demo's seed 0 and the new seeds."""
    demo = tmp_path / "demo"
    demo.mkdir()
    for name in ("synthetic.jsonl", "scored.jsonl"):
        (demo / name).write_text("")
    out = subprocess.run(["make", "-n", "-C", ROOT, "demo-seeds", f"DEMO_OUT={demo}", f"DEMO_DATA={tmp_path}/data",
                          "DEMO_SEEDS=1 2"], capture_output=True, text=True, check=True).stdout
    for s in (1, 2):
        assert f"cp -rp {demo}/synthetic.jsonl {demo}/scored.jsonl {demo}/source-expert {demo}/seed{s}/" in out
        assert f"titok-filter --rank-by random --seed {s} -k 1 --keep 250 -o {demo}/seed{s}/random.jsonl" in out
        assert f"titok-train --output {demo}/seed{s}/target-titok --overwrite --seed {s} " in out
    seeds = ",".join(f"{d}/eval/target-kd.json" for d in (demo, f"{demo}/seed1", f"{demo}/seed2"))
    assert f"target-kd={seeds} " in out
    assert f"target-vanilla={demo}/eval/target-vanilla.json " in out  # seed-free rows: one run
    assert "-o results/demo-seeds.md" in out


@pytest.mark.parametrize("row, rank_by, ranked", [("target-confident", "confidence", "confident"),
                                                   ("target-titok-answer-rank", "answer-excess", "answer-ranked")])
def test_make_ranking_rows_rank_by_their_rule_with_titoks_tokens(tmp_path, row, rank_by, ranked):
    out = subprocess.run(["make", "-n", "-C", ROOT, "pipeline", f"OUT={tmp_path}", f"DATA={tmp_path}/data",
                          f"EXTRA_EVALS={row}", "M=250", "K=0.3"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert f"titok-filter --rank-by {rank_by} -k 0.3 --keep 250 --scope sample -o {tmp_path}/{ranked}.jsonl " \
           f"{tmp_path}/scored.jsonl" in out
    assert any(line.startswith("titok-align ") and line.endswith(f"-o {tmp_path}/{ranked}-aligned.jsonl  "
                                                                  f"{tmp_path}/{ranked}.jsonl") for line in out)
    train = next(line for line in out if f"--output {tmp_path}/{row} " in line)
    assert train.endswith(f"{tmp_path}/{ranked}-aligned.jsonl") and "--all-tokens" not in train  # TiTok's tokens
    assert any(f"{row}={tmp_path}/eval/{row}.json" in line for line in out)


def test_a_row_added_to_a_finished_run_is_built(tmp_path):
    """A finished run (every file there, the report newest) given one more row in EXTRA_EVALS trains
    and evaluates that row alone: missing evaluations are not taken as done."""
    files = ["data/train.jsonl", "data/test.jsonl", "source-expert/adapter_config.json", "synthetic.jsonl",
             "scored.jsonl", "filtered.jsonl", "random.jsonl", "aligned.jsonl", "target-kd/adapter_config.json",
             "target-titok/adapter_config.json", "target-ceiling/adapter_config.json",
             *(f"eval/{e}.json" for e in ("source-base", "source-expert", "target-vanilla", "target-kd",
                                          "target-titok", "target-ceiling")), "report.md"]
    for age, name in enumerate(reversed(files)):  # in pipeline order, each older than the next
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
    make = ["make", "-n", "-C", ROOT, "pipeline", f"OUT={tmp_path}", f"DATA={tmp_path}/data"]
    assert "Nothing to be done" in subprocess.run(make, capture_output=True, text=True, check=True).stdout
    out = subprocess.run(make + ["EXTRA_EVALS=target-confident"], capture_output=True, text=True, check=True).stdout
    assert "titok-filter --rank-by confidence" in out and f"--output {tmp_path}/target-confident " in out
    assert "titok-gen" not in out and f"--output {tmp_path}/target-kd " not in out  # the rest is done
