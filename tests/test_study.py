"""bench/study.py, the ablation driver behind `make study`: its plan, its resumable scheduler and
its report (the study itself runs for hours and is not part of the suite)."""
import json
import os
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import study  # noqa: E402


def args(tmp_path, *extra):
    return study.parse(["plan", "--out", str(tmp_path / "out"), "--results", str(tmp_path / "results"),
                        "-o", str(tmp_path / "study.md"), *extra])


def test_plan_has_every_arm_per_pair_seed_and_task(tmp_path):
    plan = study.Study(args(tmp_path, "--tasks", "t1,t2", "--seeds", "0,1", "--quick"))
    plan.plan()
    trains = [n for n in plan.steps if n.endswith("/train")]
    per_seed = sum(len(pairs.split()) for pairs, _, _ in study.ARMS.values())
    table2 = sum(len(study.ARMS[a][0].split()) for a in study.EVERY_SEED)
    assert len(trains) == 2 * (per_seed + table2)  # seed 1 runs only the Table 2 cells
    assert {n.split("/")[3] for n in trains if "/s1/" in n} == study.EVERY_SEED
    full = study.Study(args(tmp_path, "--tasks", "t1,t2", "--seeds", "0,1"))
    full.plan()
    assert len([n for n in full.steps if n.endswith("/train")]) == 2 * 2 * per_seed
    # every step's dependencies are planned, and come before it
    names = list(plan.steps)
    for name, (_, _, deps) in plan.steps.items():
        assert all(names.index(d) < names.index(name) for d in deps), name
    # the seed decides the M random samples; top-M is one file for all seeds
    random0 = plan.steps["t1/s0/random-all.jsonl"][1]
    random1 = plan.steps["t1/s1/random-all.jsonl"][1]
    assert random0[random0.index("--seed") + 1] == "0" and random1[random1.index("--seed") + 1] == "1"
    # Gemma trains on aligned records; the same-tokenizer pair on the filtered ones
    gemma = plan.steps["t1/gemma/s0/titok-k0.3/train"]
    smol = plan.steps["t1/smollm2/s0/titok-k0.3/train"]
    assert gemma[1][-1].endswith("top-k0.3.gemma.jsonl") and smol[1][-1].endswith("top-k0.3.jsonl")
    assert "--all-tokens" in plan.steps["t1/gemma/s0/kd/train"][1] and "--all-tokens" not in gemma[1]
    # the source tokenizer comes from this machine's model, not the path a committed pool carries
    align = plan.steps["t1/top-k0.3.gemma.jsonl"][1]
    assert align[align.index("--source-model") + 1] == plan.smollm2
    # the query-source ablation: the target base writes the queries, the expert answers them
    queries = plan.steps["t1/tq-queries"][1]
    assert "--adapter" not in queries and queries[queries.index("--model") + 1] == plan.gemma
    assert "--label" in plan.steps["t1/tq-synthetic"][1]
    # seed 0's steps all come before seed 1's
    first_s1 = min(names.index(n) for n in names if "/s1/" in n)
    assert all(names.index(n) < first_s1 for n in names if "/s0/" in n)


def test_run_resumes_and_blocks_what_depends_on_a_failure(tmp_path):
    plan = study.Study(args(tmp_path, "--jobs", "2"))
    out = tmp_path / "out"
    plan.steps = {}
    plan.step("a", out / "a", ["touch", out / "a"])
    plan.step("b", out / "b", ["false"], "a")
    plan.step("c", out / "c", ["touch", out / "c"], "b")
    plan.step("d", out / "d", ["touch", out / "d"], "a")
    plan.out = str(out)
    os.makedirs(out, exist_ok=True)
    assert plan.run() == 1
    assert (out / "a").exists() and (out / "d").exists() and not (out / "c").exists()
    times = [json.loads(line) for line in open(tmp_path / "results" / "times.jsonl")]
    assert sorted(t["step"] for t in times) == ["a", "b", "d"]  # c never started
    # a second run does only what is left: b (fixed now) and c
    plan.steps["b"] = (out / "b", ["touch", str(out / "b")], ["a"])
    assert plan.run() == 0 and (out / "c").exists()
    times = [json.loads(line)["step"] for line in open(tmp_path / "results" / "times.jsonl")]
    assert times[3:] == ["b", "c"]


def test_a_fresh_clone_reruns_only_what_an_unfinished_result_needs(tmp_path):
    """The results (evals) are committed, the work dir is not: on a fresh clone, an adapter whose
    eval is in results/ is not trained again; one whose eval is missing is, with its inputs."""
    plan = study.Study(args(tmp_path, "--jobs", "1"))
    out, results = tmp_path / "out", tmp_path / "results"
    plan.steps = {}
    plan.step("pool", out / "pool", ["touch", out / "pool"])
    plan.step("train0", out / "train0", ["touch", out / "train0"], "pool")
    plan.step("eval0", results / "eval0", ["touch", results / "eval0"], "train0")
    plan.step("train1", out / "train1", ["touch", out / "train1"], "pool")
    plan.step("eval1", results / "eval1", ["touch", results / "eval1"], "train1")
    plan.out = str(out)
    os.makedirs(out)
    os.makedirs(results)
    (results / "eval0").touch()  # finished in an earlier session; the work dir is gone
    done = {"eval0"}
    assert plan.needed(done) == ["pool", "train1", "eval1"]
    assert plan.needed(done | {"pool"}) == ["train1", "eval1"]
    assert plan.needed(done | {"eval1"}) == []
    assert plan.run() == 0
    assert not (out / "train0").exists() and (out / "train1").exists() and (results / "eval1").exists()


def test_report_means_and_standard_deviations(tmp_path):
    a = args(tmp_path, "--tasks", "t1,t2", "--seeds", "0,1,2")
    out = tmp_path / "results"
    rng = np.random.default_rng(0)
    values = {}
    for task in ("t1", "t2"):
        for pair in ("gemma", "smollm2"):
            (out / task / pair).mkdir(parents=True)
            (out / task / pair / "vanilla.json").write_text(json.dumps({"exact_match": 0.05}))
            for seed in (0, 1, 2):
                (out / task / pair / f"s{seed}").mkdir()
                for arm in study.ARMS:
                    if seed == 2 and arm == "ceiling" and task == "t2":
                        continue  # an unfinished run: n = 2 in that cell
                    v = float(rng.integers(0, 100)) / 100
                    values[task, pair, seed, arm] = v
                    (out / task / pair / f"s{seed}" / f"{arm}.json").write_text(json.dumps({"exact_match": v}))
    (out / "t1" / "auto-k.json").write_text(json.dumps({"k": 0.25}))
    a.action = "report"
    assert study.report(a) == 0
    text = (tmp_path / "study.md").read_text()
    gemma_section = text.split("## ")[1]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in gemma_section.splitlines() if line.startswith("| ")}
    titok = rows[study.ROW_NAMES["titok-k0.3"]].split(" | ")
    t1 = [values["t1", "gemma", s, "titok-k0.3"] for s in (0, 1, 2)]
    assert titok[1] == f"{100 * np.mean(t1):.1f} ± {100 * np.std(t1, ddof=1):.1f} (n=3)"
    assert rows[study.ROW_NAMES["ceiling"]].split(" | ")[2].endswith("(n=2)")
    both = np.mean([np.mean([values[t, "gemma", s, "titok-k0.3"] for s in (0, 1, 2)]) for t in ("t1", "t2")])
    seed_sd = np.std([np.mean([values[t, "gemma", s, "titok-k0.3"] for t in ("t1", "t2")]) for s in (0, 1, 2)], ddof=1)
    assert titok[-1].rstrip(" |") == f"{100 * both:.1f} ± {100 * seed_sd:.1f}"
    # the ceiling misses t2's seed 2: its spread is over the seeds both tasks have
    ceiling = rows[study.ROW_NAMES["ceiling"]].split(" | ")[-1].rstrip(" |")
    two = np.std([np.mean([values[t, "gemma", s, "ceiling"] for t in ("t1", "t2")]) for s in (0, 1)], ddof=1)
    assert ceiling.endswith(f" ± {100 * two:.1f}")
    assert rows[study.ROW_NAMES["vanilla"]].split(" | ")[-1].rstrip(" |") == "5.0"
    assert rows[study.ROW_NAMES["vanilla"]].split(" | ")[1] == "5.0 ± 0.0 (n=1)"
    assert "chose t1: k = 0.250." in text


def test_the_smollm2_ceiling_is_the_source_experts_training_so_the_report_uses_it_for_other_seeds(tmp_path):
    a = args(tmp_path, "--tasks", "t1", "--seeds", "0,1,2")
    s = study.Study(a)
    s.plan()

    def command(name):
        output, cmd, _ = s.steps[name]
        return [c for c in cmd if c != output]

    expert = command("t1/source-expert")
    assert command("t1/smollm2/s0/ceiling/train") == expert
    assert command("t1/smollm2/s2/ceiling/train") == [c if c != "0" else "2" for c in expert]

    out = tmp_path / "results"
    (out / "t1" / "eval").mkdir(parents=True)
    (out / "t1" / "eval" / "source-expert.json").write_text(json.dumps({"exact_match": 0.30}))
    for seed, v in ((1, 0.40), (2, 0.20)):
        (out / "t1" / "smollm2" / f"s{seed}").mkdir(parents=True)
        (out / "t1" / "smollm2" / f"s{seed}" / "ceiling.json").write_text(json.dumps({"exact_match": v}))
    a.action = "report"
    assert study.report(a) == 0
    row = next(line for line in (tmp_path / "study.md").read_text().splitlines() if "source-expert" in line)
    assert row.split(" | ")[1].rstrip(" |") == f"30.0 ± {100 * np.std([0.3, 0.4, 0.2], ddof=1):.1f} (n=3)"


def test_run_stops_before_any_step_when_a_titok_command_does_not_run(tmp_path, monkeypatch, capsys):
    """A stale install fails every step in 0 s: the run says why once and runs nothing."""
    plan = study.Study(args(tmp_path, "--jobs", "1"))
    out = tmp_path / "out"
    plan.steps = {}
    plan.step("a", out / "a", ["touch", out / "a"])
    plan.step("b", out / "b", ["titok-broken", out / "b"], "a")
    plan.out = str(out)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "titok-broken").write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'titok_tools'\" >&2\n"
                                          "exit 1\n")
    (bin_dir / "titok-broken").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert plan.run() == 2
    assert "titok-broken --help failed: ModuleNotFoundError: No module named 'titok_tools'" in capsys.readouterr().err
    assert not (out / "a").exists() and not (tmp_path / "results" / "times.jsonl").exists()
    plan.steps["b"] = (out / "b", ["titok-no-such-command", out / "b"], ["a"])
    assert plan.run() == 2
    assert "titok-no-such-command: No such file or directory" in capsys.readouterr().err


def test_arms_limits_the_plan_to_the_named_arms_and_what_they_need(tmp_path):
    plan = study.Study(args(tmp_path, "--tasks", "t1", "--seeds", "0", "--arms", "kd,titok-k0.3"))
    plan.plan()
    assert {n.split("/")[3] for n in plan.steps if n.endswith("/train")} == {"kd", "titok-k0.3"}
    assert "t1/synthetic" in plan.steps and "t1/tq-queries" not in plan.steps  # no query-source arm, no tq pool
    nothing = study.Study(args(tmp_path, "--tasks", "t1", "--seeds", "0", "--arms", "ceiling"))
    nothing.plan()
    assert "t1/synthetic" not in nothing.steps  # the ceiling trains on the real data: no pool
    # the closing-token ablation turns off what titok-train does by default
    full = study.Study(args(tmp_path, "--tasks", "t1", "--seeds", "0", "--arms", "titok-no-closing"))
    full.plan()
    assert "--no-train-closing" in full.steps["t1/gemma/s0/titok-no-closing/train"][1]
    # the sample-rank ablation: TiTok's selection, samples ranked without the closing token
    answer = study.Study(args(tmp_path, "--tasks", "t1", "--seeds", "0", "--arms", "titok-answer-rank,titok-k0.3"))
    answer.plan()
    select = answer.steps["t1/answer-k0.3.jsonl"][1]
    assert select[select.index("--rank-by") + 1] == "answer-excess" and select[select.index("-k") + 1] == "0.3"
    assert "--rank-by" not in answer.steps["t1/top-k0.3.jsonl"][1]
    assert answer.steps["t1/gemma/s0/titok-answer-rank/train"][1][-1].endswith("answer-k0.3.gemma.jsonl")
    # the logit-KD arms: the pool stores the expert's top-N, KD+MinED trains the KL alone on all tokens
    kd = study.Study(args(tmp_path, "--tasks", "t1", "--seeds", "0", "--arms", "kd-mined,titok-kd"))
    kd.plan()
    assert "--topk" in kd.steps["t1/scored"][1]
    mined = kd.steps["t1/gemma/s0/kd-mined/train"][1]
    assert "--all-tokens" in mined and "--kd-only" in mined and mined[-1].endswith("random-all.gemma.jsonl")
    assert "--kd-weight" in kd.steps["t1/gemma/s0/titok-kd/train"][1]
    with pytest.raises(SystemExit):
        args(tmp_path, "--arms", "kd,no-such-arm")


def test_report_shows_an_earlier_study_beside_with_the_arms_renamed(tmp_path):
    a = args(tmp_path, "--tasks", "t1,t2", "--seeds", "0", "--before", str(tmp_path / "before"))
    for root, arm, task, v in (("before", "titok-closing", "t1", 0.10), ("before", "titok-closing", "t2", 0.30),
                               ("before", "titok-k0.3", "t1", 0.02), ("results", "titok-k0.3", "t1", 0.40),
                               ("results", "titok-no-closing", "t1", 0.06)):
        path = tmp_path / root / task / "gemma" / "s0"
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{arm}.json").write_text(json.dumps({"exact_match": v}))
    a.action = "report"
    assert study.report(a) == 0
    rows = {line.split(" | ")[1]: line.split(" | ")[2:] for line in (tmp_path / "study.md").read_text().splitlines()
            if line.startswith("| gemma | ")}
    # before, TiTok's default trained the mask alone ("titok-k0.3") and "titok-closing" added the closing token
    assert rows[study.ROW_NAMES["titok-k0.3"]] == ["20.0 (2 tasks)", "40.0 (1 tasks) |"]
    assert rows[study.ROW_NAMES["titok-no-closing"]] == ["2.0 (1 tasks)", "6.0 (1 tasks) |"]
    assert study.ROW_NAMES["kd"] not in rows


def test_report_tabulates_multiple_choice_accuracy_where_the_evals_have_it(tmp_path):
    a = args(tmp_path, "--tasks", "t1,t2", "--seeds", "0,1")
    for seed, v in ((0, 0.5), (1, 0.7)):
        path = tmp_path / "results" / "t2" / "gemma" / f"s{seed}"
        path.mkdir(parents=True)
        (path / "kd.json").write_text(json.dumps({"exact_match": 0.1, "choice_accuracy": v}))
    (tmp_path / "results" / "t1" / "gemma" / "s0").mkdir(parents=True)
    (tmp_path / "results" / "t1" / "gemma" / "s0" / "kd.json").write_text(json.dumps({"exact_match": 0.2}))
    # an ablation arm gets its row too (the summary tables leave token-only out)
    (tmp_path / "results" / "t1" / "gemma" / "s0" / "token-only.json").write_text(
        json.dumps({"exact_match": 0.2, "choice_accuracy": 0.4}))
    a.action = "report"
    assert study.report(a) == 0
    text = (tmp_path / "study.md").read_text().split("## Multiple-choice accuracy")[1]
    rows = [line for line in text.splitlines() if line.startswith("| gemma | ")]
    assert rows == [f"| gemma | {study.ROW_NAMES['kd']} |  | 60.0 ± {100 * np.std([0.5, 0.7], ddof=1):.1f} (n=2) |",
                    f"| gemma | {study.ROW_NAMES['token-only']} | 40.0 ± 0.0 (n=1) |  |"]
    a.arms = ["kd"]  # an arm left out of --arms is left out here too
    assert study.report(a) == 0
    assert study.ROW_NAMES["token-only"] not in (tmp_path / "study.md").read_text().split("## Multiple-choice")[1]


def test_data_takes_the_split_from_a_directory_instead_of_titok_bigbench(tmp_path):
    plan = study.Study(args(tmp_path, "--tasks", "t1", "--seeds", "0", "--arms", "kd", "--data", str(tmp_path / "bbh")))
    plan.plan()
    assert not any(command[0] == "titok-bigbench" for _, command, _ in plan.steps.values())
    expert = plan.steps["t1/source-expert"]
    assert expert[1][-1] == str(tmp_path / "bbh" / "t1" / "train.jsonl") and expert[2] == []
    assert plan.steps["t1/gemma/vanilla/eval"][1][-1] == str(tmp_path / "bbh" / "t1" / "test.jsonl")
    # the floor: always the train split's most common answer ("b", 2 of 3), scored on test (2 of 5)
    (tmp_path / "bbh" / "t1").mkdir(parents=True)
    (tmp_path / "bbh" / "t1" / "train.jsonl").write_text(
        "".join(json.dumps({"prompt": "q", "completion": c}) + "\n" for c in ["b", "a", "b"]))
    (tmp_path / "bbh" / "t1" / "test.jsonl").write_text("".join(
        json.dumps({"prompt": "q", "completion": c, "references": [c]}) + "\n" for c in ["a", "B", "b", "c", "d"]))
    a = study.parse(["report", "--tasks", "t1", "--results", str(tmp_path / "results"), "-o", str(tmp_path / "s.md"),
                     "--data", str(tmp_path / "bbh")])
    assert study.report(a) == 0
    text = (tmp_path / "s.md").read_text()
    assert "(--data), not titok-bigbench's split" in text
    assert "| no model: the train split's most common answer, always | 40.0 | 40.0 |" in text


def test_report_shows_only_the_pairs_and_arms_asked_for_and_what_it_carried_over(tmp_path):
    a = study.parse(["report", "--tasks", "t1", "--seeds", "0", "--pairs", "gemma", "--arms", "kd,titok-k0.3",
                     "--results", str(tmp_path / "results"), "--before", str(tmp_path / "before"),
                     "--data", str(tmp_path / "bbh"), "-o", str(tmp_path / "s.md")])
    for root, name, v in (("results", "gemma/s0/kd.json", 0.4), ("results", "eval/source-expert.json", 0.5),
                          ("before", "eval/source-expert.json", 0.5), ("results", "gemma/vanilla.json", 0.0),
                          ("before", "gemma/vanilla.json", 0.1)):
        path = tmp_path / root / "t1" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"exact_match": v}))
    assert study.report(a) == 0
    text = (tmp_path / "s.md").read_text()
    assert "same tokenizer" not in text and "| smollm2 |" not in text
    rows = [line.split(" | ")[0].lstrip("| ") for line in text.split("## ")[1].splitlines() if line.startswith("| ")]
    assert rows[1:] == [study.ROW_NAMES[arm] for arm in ("vanilla", "kd", "titok-k0.3")]
    # only the expert's metrics are the earlier study's file; vanilla was re-run and differs
    assert "not re-run (the same metrics files, byte for byte): source-expert\n" in text
    assert "a row compares data and settings together" in text


def test_report_gives_each_pools_on_format_rate_over_its_runs(tmp_path):
    log = tmp_path / "gen.log"
    log.write_text("titok-gen --num 10\ntitok.gen: query replies: up to 48 new tokens\n"
                   "titok-gen:  50%|#  | 5/10\rtitok-gen: 100%|##| 10/10\n"
                   "titok.gen: kept 10 queries; on-format 80% of the 20 read ('do i have?'); rejected 4 (format)\n"
                   "titok-gen: 100%|##| 10/10\r")
    summary = study.summary_line(str(log))
    assert summary.startswith("titok.gen: kept 10 queries; on-format 80% of the 20 read")
    results = tmp_path / "results"
    results.mkdir()
    # a pool written in two runs (the second resumed it): 16 of 20, then 27 of 30 (90%)
    times = [{"step": "t1/synthetic", "rc": 0, "seconds": 5.0, "summary": summary},
             {"step": "t1/synthetic", "rc": 0, "seconds": 5.0, "summary": "titok.gen: kept 9; on-format 90% of the 30 read"},
             {"step": "t1/scored", "rc": 0, "seconds": 1.0, "summary": "titok.score: on-format 10% of the 99 read"}]
    (results / "times.jsonl").write_text("".join(json.dumps(t) + "\n" for t in times))
    a = study.parse(["report", "--tasks", "t1,t2", "--results", str(results), "-o", str(tmp_path / "s.md")])
    assert study.report(a) == 0
    assert "the pool): t1 86% of 50 read\n" in (tmp_path / "s.md").read_text()
