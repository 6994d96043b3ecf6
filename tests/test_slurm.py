"""bin/titok-slurm with a fake sbatch on PATH: the dependency chain, the array jobs, and what each
job runs (its --wrap line is run by sh, with fake titok commands that record their arguments)."""
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bin", "titok-slurm")

FAKE_SBATCH = """#!/usr/bin/env bash
n=$(( $(cat "$SBATCH_LOG/count" 2>/dev/null || echo 0) + 1 ))
echo $n > "$SBATCH_LOG/count"
printf '%s\\0' "$@" > "$SBATCH_LOG/$n"
echo "$((100 + n));cluster1"
"""
FAKE_COMMAND = """#!/usr/bin/env bash
printf '%s\\0' "$(basename "$0")" "$@" > "$FAKE_LOG"
"""


@pytest.fixture
def env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    for name in ("titok-gen", "titok-score", "titok-filter", "titok-align", "titok-eval", "titok-merge", "accelerate"):
        (bin_dir / name).write_text(FAKE_COMMAND)
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    task = tmp_path / "data" / "my task"  # a space: every path must be quoted in the job lines
    task.mkdir(parents=True)
    (task / "train.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(5)))
    (task / "test.jsonl").write_text('{"id": 0}\n')
    (tmp_path / "sbatch").mkdir()
    clean = {k: v for k, v in os.environ.items() if k not in ("TASK", "M", "K", "OUT", "GPUS", "SHARDS", "BACKEND")}
    return dict(clean, PATH=f"{bin_dir}:{os.environ['PATH']}", SBATCH_LOG=str(tmp_path / "sbatch"),
                FAKE_LOG=str(tmp_path / "command"), TMP=str(tmp_path), TASK_DIR=str(task))


def titok_slurm(env, *args, **extra_env):
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, cwd=env["TMP"], env=dict(env, **extra_env))


def parse(argv):
    """sbatch argv -> ({option: value}, wrap line); --parsable is the only flag without a value."""
    assert argv[0] == "--parsable"
    options = dict(zip(argv[1::2], argv[2::2]))
    assert len(argv) % 2 == 1 and len(options) == len(argv) // 2, argv  # no option given twice
    return options, options.pop("--wrap")


def jobs(env):
    log = env["SBATCH_LOG"]
    count = int(open(os.path.join(log, "count")).read()) if os.path.exists(os.path.join(log, "count")) else 0
    return [parse(open(os.path.join(log, str(n)), "rb").read().decode().split("\0")[:-1]) for n in range(1, count + 1)]


def run_wrap(env, wrap, task_id=None):
    """Run a job's line as Slurm would (sh), return the argv of the titok command it called."""
    job_env = dict(env) if task_id is None else dict(env, SLURM_ARRAY_TASK_ID=str(task_id))
    subprocess.run(["sh", "-c", wrap], check=True, env=job_env, cwd=env["TMP"])
    return open(env["FAKE_LOG"], "rb").read().decode().split("\0")[:-1]


def test_full_chain(env):
    result = titok_slurm(env, "--task", env["TASK_DIR"], "--shards", "3", "--gpus", "2", "--k", "0.3",
                         "--scope", "global", "--out", "run", "--partition", "gpu-a", "--account", "lab",
                         "--align-args", "--chat-template t.jinja", SBATCH_ARGS="--time 1:00:00 --qos high")
    assert result.returncode == 0, result.stderr
    submitted = jobs(env)
    names = [o["--job-name"] for o, _ in submitted]
    assert names == ["titok-sft", "titok-gen", "titok-score", "titok-score-merge", "titok-filter", "titok-align",
                     "titok-align-merge", "titok-train", "titok-eval", "titok-eval-merge"]
    # Each job waits for the one before it (the ";cluster1" of --parsable is dropped).
    assert "--dependency" not in submitted[0][0]
    assert [o["--dependency"] for o, _ in submitted[1:]] == [f"afterok:{100 + n}" for n in range(1, 10)]
    arrays = {o["--job-name"]: o["--array"] for o, _ in submitted if "--array" in o}
    # Global selection looks across records: align runs as one task then (see the sample-scope test).
    assert arrays == {"titok-score": "0-2", "titok-align": "0-0", "titok-eval": "0-2"}
    gres = {o["--job-name"]: o.get("--gres") for o, _ in submitted}
    assert gres == {"titok-sft": "gpu:2", "titok-gen": "gpu:1", "titok-score": "gpu:1", "titok-score-merge": None,
                    "titok-filter": None, "titok-align": None, "titok-align-merge": None, "titok-train": "gpu:2",
                    "titok-eval": "gpu:1", "titok-eval-merge": None}
    for options, _ in submitted:
        assert (options["--partition"], options["--account"], options["--time"], options["--qos"]) == ("gpu-a", "lab", "1:00:00", "high")
        assert options["--chdir"] == env["TMP"] and options["--export"] == "ALL"
    assert submitted[2][0]["--output"] == f"{env['TMP']}/run/logs/score-%A_%a.out"
    assert submitted[4][0]["--output"] == f"{env['TMP']}/run/logs/filter-%j.out"
    assert os.path.isdir(os.path.join(env["TMP"], "run", "shards"))

    out, task = os.path.join(env["TMP"], "run"), env["TASK_DIR"]
    adapter, source, target = f"{out}/source-adapter", "mistralai/Mistral-7B-Instruct-v0.3", "meta-llama/Llama-3.1-8B-Instruct"
    wraps = {o["--job-name"][len("titok-"):]: w for o, w in submitted}
    assert run_wrap(env, wraps["sft"]) == ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m", "titok_tools.train",
                                           "--model", source, "--output", adapter, "--all-tokens", f"{task}/train.jsonl"]
    assert run_wrap(env, wraps["gen"]) == ["titok-gen", "--model", source, "--adapter", adapter, "--seed-examples",
                                           f"{task}/train.jsonl", "--num", "10", "--backend", "hf", "-o", f"{out}/synthetic.jsonl"]
    for i in range(3):
        assert run_wrap(env, wraps["score"], i) == ["titok-score", "--model", source, "--adapter", adapter, "--shard", f"{i}/3",
                                                    "-o", f"{out}/shards/score.{i}.jsonl", f"{out}/synthetic.jsonl"]
        assert run_wrap(env, wraps["eval"], i) == ["titok-eval", "--model", target, "--adapter", f"{out}/target-adapter",
                                                   "--shard", f"{i}/3", "-o", f"{out}/shards/eval.{i}.jsonl",
                                                   "--metrics", f"{out}/shards/metrics.{i}.json", f"{task}/test.jsonl"]
    assert run_wrap(env, wraps["align"], 0) == ["titok-align", "--target-model", target, "--scope", "global", "--chat-template",
                                                "t.jinja", "--shard", "0/1", "-o", f"{out}/shards/align.0.jsonl", f"{out}/filtered.jsonl"]
    assert run_wrap(env, wraps["score-merge"]) == ["titok-merge", "-o", f"{out}/scored.jsonl", "--by-id", f"{out}/synthetic.jsonl"] + [
        f"{out}/shards/score.{i}.jsonl" for i in range(3)]
    assert run_wrap(env, wraps["filter"]) == ["titok-filter", "-k", "0.3", "--keep", "5", "--scope", "global",
                                              "-o", f"{out}/filtered.jsonl", f"{out}/scored.jsonl"]
    assert run_wrap(env, wraps["align-merge"]) == ["titok-merge", "-o", f"{out}/aligned.jsonl", "--by-id", f"{out}/filtered.jsonl",
                                                   f"{out}/shards/align.0.jsonl"]
    assert run_wrap(env, wraps["train"]) == ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m", "titok_tools.train",
                                             "--model", target, "--output", f"{out}/target-adapter", f"{out}/aligned.jsonl"]
    # The eval merge also pools the shards' metrics, weighted by their record counts.
    for i, (n, em) in enumerate([(2, 0.5), (1, 1.0), (0, None)]):
        with open(f"{out}/shards/metrics.{i}.json", "w") as f:
            json.dump({"records": n, "exact_match": em, "rouge1": em, "rougeL": em, "model": target, "invalid": i}, f)
    assert run_wrap(env, wraps["eval-merge"]) == ["titok-merge", "-o", f"{out}/predictions.jsonl", "--by-id", f"{task}/test.jsonl"] + [
        f"{out}/shards/eval.{i}.jsonl" for i in range(3)]
    assert json.load(open(f"{out}/metrics.json")) == {"records": 3, "exact_match": 2 / 3, "rouge1": 2 / 3, "rougeL": 2 / 3,
                                                      "model": target, "invalid": 3}


def test_given_adapter_vllm_one_gpu_from_environment(env):
    result = titok_slurm(env, TASK=env["TASK_DIR"], SOURCE_ADAPTER="lora", SOURCE_MODEL="src", TARGET_MODEL="tgt",
                         M="7", BACKEND="vllm", GPUS="1", SHARDS="1", OUT="o", GEN_ARGS="--shots 5",
                         SCORE_ARGS="--batch-tokens 4096", FILTER_ARGS="--mark-only", TRAIN_ARGS="--lora-r 16",
                         EVAL_ARGS="--max-new-tokens 32")
    assert result.returncode == 0, result.stderr
    assert "9 jobs submitted" in result.stderr
    submitted = jobs(env)
    assert submitted[0][0]["--job-name"] == "titok-gen" and "--dependency" not in submitted[0][0]
    wraps = {o["--job-name"][len("titok-"):]: w for o, w in submitted}
    out = os.path.join(env["TMP"], "o")
    assert run_wrap(env, wraps["gen"]) == ["titok-gen", "--model", "src", "--adapter", f"{env['TMP']}/lora", "--seed-examples",
                                           f"{env['TASK_DIR']}/train.jsonl", "--num", "14", "--backend", "vllm",
                                           "--tensor-parallel-size", "1", "--shots", "5", "-o", f"{out}/synthetic.jsonl"]
    assert {o["--job-name"]: o.get("--array") for o, _ in submitted if "--array" in o} == {
        "titok-score": "0-0", "titok-align": "0-0", "titok-eval": "0-0"}
    assert run_wrap(env, wraps["score"], 0)[5:] == ["--batch-tokens", "4096", "--shard", "0/1", "-o", f"{out}/shards/score.0.jsonl",
                                                    f"{out}/synthetic.jsonl"]
    assert run_wrap(env, wraps["filter"])[:8] == ["titok-filter", "-k", "0.7", "--keep", "7", "--scope", "sample", "--mark-only"]
    assert run_wrap(env, wraps["align"], 0) == ["titok-align", "--target-model", "tgt", "--scope", "sample", "--shard", "0/1",
                                                "-o", f"{out}/shards/align.0.jsonl", f"{out}/filtered.jsonl"]
    assert run_wrap(env, wraps["train"]) == ["accelerate", "launch", "--num_processes", "1", "-m", "titok_tools.train", "--model",
                                             "tgt", "--output", f"{out}/target-adapter", "--lora-r", "16", f"{out}/aligned.jsonl"]
    assert run_wrap(env, wraps["eval"], 0)[5:7] == ["--max-new-tokens", "32"]


def test_sample_scope_shards_align(env):
    result = titok_slurm(env, "--task", env["TASK_DIR"], "--source-adapter", "lora", "--shards", "3", "--out", "o")
    assert result.returncode == 0, result.stderr
    submitted = jobs(env)
    align = next(w for o, w in submitted if o["--job-name"] == "titok-align")
    assert next(o for o, _ in submitted if o["--job-name"] == "titok-align")["--array"] == "0-2"
    out = os.path.join(env["TMP"], "o")
    for i in range(3):
        assert run_wrap(env, align, i) == ["titok-align", "--target-model", "meta-llama/Llama-3.1-8B-Instruct", "--scope",
                                           "sample", "--shard", f"{i}/3", "-o", f"{out}/shards/align.{i}.jsonl",
                                           f"{out}/filtered.jsonl"]
    merge = next(w for o, w in submitted if o["--job-name"] == "titok-align-merge")
    assert run_wrap(env, merge)[3:] == ["--by-id", f"{out}/filtered.jsonl"] + [f"{out}/shards/align.{i}.jsonl" for i in range(3)]


def test_existing_outputs_are_not_submitted_again(env):
    out = os.path.join(env["TMP"], "o")
    os.makedirs(out)
    for name in ("synthetic.jsonl", "scored.jsonl"):  # e.g. the user's own scored data
        open(os.path.join(out, name), "w").close()
    result = titok_slurm(env, "--task", env["TASK_DIR"], "--source-adapter", "lora", "--out", "o")
    assert result.returncode == 0, result.stderr
    assert f"score: {out}/scored.jsonl exists, not submitted" in result.stderr
    submitted = jobs(env)
    assert [o["--job-name"] for o, _ in submitted][:2] == ["titok-filter", "titok-align"]
    assert "--dependency" not in submitted[0][0] and submitted[1][0]["--dependency"] == "afterok:101"


@pytest.mark.parametrize("k", ["auto", "1", "0.3", ".5", "1e-1"])
def test_k_values_titok_filter_takes(env, k):
    result = titok_slurm(env, "--dry-run", "--task", env["TASK_DIR"], "--k", k)
    assert result.returncode == 0, result.stderr
    assert f"titok-filter -k {k} " in result.stdout


def test_dry_run_submits_nothing(env):
    result = titok_slurm(env, "--dry-run", "--task", env["TASK_DIR"], "--out", "o", "--shards", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 10 and all(line.startswith("sbatch --parsable ") for line in lines)
    assert "--dependency afterok:{gen} --array 0-1 --gres gpu:1 --wrap 'set -e; titok-score " in lines[2]
    assert "--shard $SLURM_ARRAY_TASK_ID/2 -o" in lines[2]
    assert jobs(env) == [] and not os.path.exists(os.path.join(env["TMP"], "o"))


@pytest.mark.parametrize("args, extra, message", [
    ([], {}, "set TASK"),
    (["--task", "nowhere"], {}, "nowhere needs train.jsonl and test.jsonl"),
    (["--colour", "red"], {}, "unknown option --colour"),
    (["--shards"], {}, "--shards needs a value"),
    (["stray"], {}, "unexpected argument stray"),
    ([], {"BACKEND": "tgi"}, "BACKEND must be hf or vllm"),
    ([], {"SHARDS": "0"}, "SHARDS must be a positive integer"),
    ([], {"GPUS": "x"}, "GPUS must be a positive integer"),
    ([], {"M": "-1"}, "M must be a positive integer"),
    ([], {"SCOPE": "batches"}, "SCOPE must be sample, batch or global"),
    ([], {"K": "5"}, "K must be a number in (0, 1] or auto, not '5'"),  # titok-filter refused it after gen and score
    ([], {"K": "0"}, "K must be a number in (0, 1] or auto"),
    ([], {"K": "-0.5"}, "K must be a number in (0, 1] or auto"),
    ([], {"K": "nan"}, "K must be a number in (0, 1] or auto"),
    ([], {"K": "0.3x"}, "K must be a number in (0, 1] or auto"),
])
def test_bad_settings(env, args, extra, message):
    if args in ([], ["--shards"]) and "set TASK" not in message:
        args = ["--task", env["TASK_DIR"]] + args
    result = titok_slurm(env, *args, **extra)
    assert result.returncode == 2 and message in result.stderr
    assert jobs(env) == []


def test_no_sbatch_on_path(env, tmp_path):
    os.remove(os.path.join(env["SBATCH_LOG"], "..", "bin", "sbatch"))
    result = titok_slurm(env, "--task", env["TASK_DIR"])
    assert result.returncode == 2 and "sbatch is not on PATH" in result.stderr


def test_help_lists_every_setting(env):
    result = titok_slurm(env, "--help")
    assert result.returncode == 0
    for name in ("TASK", "SOURCE_MODEL", "SOURCE_ADAPTER", "TARGET_MODEL", " M ", " K ", "SCOPE", "SHARDS", "GPUS",
                 "BACKEND", "OUT", "PARTITION", "ACCOUNT", "TIME", "SBATCH_ARGS", "SFT_ARGS", "GEN_ARGS", "SCORE_ARGS",
                 "FILTER_ARGS", "ALIGN_ARGS", "TRAIN_ARGS", "EVAL_ARGS", "--dry-run"):
        assert name in result.stdout
