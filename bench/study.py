"""The TiTok ablation at CPU scale: SmolLM2-135M-Instruct -> Gemma-3-270M (cross-tokenizer) and
SmolLM2 -> SmolLM2 with a fresh LoRA (same tokenizer), on BIG-bench tasks, several seeds.

    python bench/study.py run    [--tasks ...] [--seeds 0,1,2] [--jobs 2]   # resumable: re-run to continue
    python bench/study.py report -o results/study.md                          # the tables, from what finished

Every step is one titok-* command whose output file (or adapter dir) appears only when it
succeeds, so a step whose output exists is done: an interrupted run continues where it stopped.
The evals write their metrics, and titok-score its scored synthetic pools, into RESULTS
(results/study/, committed), so a fresh clone resumes too: it re-runs only the steps that an
unfinished eval needs, never the generation of a pool that is already there. Steps run --jobs at a time
(threads split between them), seed by seed, so early seeds give a complete table first.
Logs: OUT/logs/STEP.log; wall time per step: RESULTS/times.jsonl.

Per task, one source expert (LoRA SFT of SmolLM2 on the real train split, seed 0) and one
synthetic pool of 2M (queries written by the SmolLM2 base: the 135M expert answers a query prompt
with an answer; see titok-gen --queries-from) answered by the expert; the seeds vary what is
random after that: the M random samples and the target LoRA's initialization and data order.
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TITOK_CACHE", os.path.join(ROOT, "models"))  # as the Makefile sets it
from titok_tools import bundled  # noqa: E402
from titok_tools.answers import exact_match, references  # noqa: E402
from titok_tools.records import prompt_and_completion, read_records  # noqa: E402

K_SWEEP = ["0.1", "0.3", "0.5", "0.7", "1.0"]
EXPERT_SEED = 0  # the source expert that writes and answers the pools; other seeds' experts are the SmolLM2 ceilings
K = "0.3"  # TiTok's k in the ablation rows (token-only, TiTok, target-written queries): the paper's 10-30%
# bfloat16 throughout, unlike make demo's --dtype auto: every committed row was made in it, and a
# row re-run in float32 would not be comparable. A CPU with AVX512 (with or without AVX512-BF16/AMX)
# runs it about as fast as float32; an AVX2-only one emulates it, about 20x slower to train
# (bench/bench_dtype.py): re-run the study where oneDNN runs bf16 (titok-train warns where it does not).
TRAIN = ["--dtype", "bfloat16", "--device", "cpu", "--lora-r", "16", "--lora-alpha", "16",
         "--target-modules", "all-linear", "--lr", "1e-3", "--epochs", "2", "--batch-size", "8"]
EVAL = ["--dtype", "bfloat16", "--device", "cpu", "--max-new-tokens", "8", "--batch-size", "32", "--choices"]
GEN = ["--dtype", "bfloat16", "--device", "cpu", "--label-max-new-tokens", "16",
       "--batch-size", "16", "--max-rounds", "80"]

# The arms: name -> (pairs it runs for, the selection it trains on, extra titok-train arguments).
# "kd" and "token-only" take M random samples (the paper's "without sample filtering").
ALL = ["--all-tokens"]
ARMS = {
    "kd": ("gemma smollm2", "random-all", ALL),
    "token-only": ("gemma smollm2", "random-k{k}", []),
    **{f"titok-k{k}": ("gemma smollm2", f"top-k{k}", ALL if k == "1.0" else []) for k in K_SWEEP},
    "titok-auto": ("gemma smollm2", "top-auto", []),
    # titok-train trains the closing token by default (outside the k budget); this arm turns it off.
    "titok-no-closing": ("gemma smollm2", "top-k{k}", ["--no-train-closing"]),
    # TiTok with samples ranked by their answer tokens' mean excess, the closing token left out
    # (titok-filter --rank-by answer-excess): on 2-4-token answers the closing token's excess
    # otherwise decides the rank (Spearman 0.98 with the mean excess on colored objects' pool).
    "titok-answer-rank": ("gemma smollm2", "answer-k{k}", []),
    # Gemma only: the SmolLM2 base, the same-tokenizer pair's target, already writes the main pool's queries.
    "titok-target-queries": ("gemma", "tq-top-k{k}", []),
    # Logit KD from the expert's stored top-N (titok-score --topk, carried by titok-align with the
    # MinED token map): the paper's KD+MinED baseline on M random samples, and TiTok's selected
    # tokens with the KL term added to their NLL.
    "kd-mined": ("gemma smollm2", "random-all", ALL + ["--kd-only"]),
    "titok-kd": ("gemma smollm2", "top-k{k}", ["--kd-weight", "1"]),
    "ceiling": ("gemma smollm2", None, ALL),
}
TOPK = 20  # the teacher's distributions stored per token (titok-score --topk), for the KD arms


# The paper's Table 2 cells run for every seed; with --quick the other arms (k sweep, -k auto,
# closing token, query source, ceiling) run for the first seed only (about 40% less time).
EVERY_SEED = {"kd", "token-only", "titok-k1.0", "titok-k0.3"}


SAVE_K = """import json, os, sys
record = json.loads(open(sys.argv[1]).readline())
with open(sys.argv[2] + ".partial", "w") as f:
    json.dump({"k": record["titok"]["filter"]["k"]}, f)
os.replace(sys.argv[2] + ".partial", sys.argv[2])
"""


class Study:
    def __init__(self, args):
        self.a = args
        self.out = args.out
        self.smollm2 = bundled.smollm2()
        self.gemma = bundled.gemma()
        self.template = os.path.join(ROOT, "data", "templates", "gemma3-chat.jinja")
        self.steps = {}  # name -> (output path, command, deps), in the order they should run

    def model(self, pair):
        if pair == "gemma":
            return ["--model", self.gemma, "--chat-template", self.template]
        return ["--model", self.smollm2]

    def step(self, name, output, command, *deps):
        self.steps.setdefault(name, (output, [str(c) for c in command], [d for d in deps if d]))
        return name

    def plan(self):
        a, M = self.a, self.a.m
        for task in a.tasks:
            t = os.path.join(self.out, task)
            data = os.path.join(a.data or os.path.join(self.out, "data"), task)
            train, test = os.path.join(data, "train.jsonl"), os.path.join(data, "test.jsonl")
            d = None if a.data else self.step(f"{task}/data", test, [
                "titok-bigbench", "--tasks", task, "--out", os.path.dirname(data),
                "--train-size", a.train_size, "--test-size", a.test_size, "--seed", 0])
            expert = os.path.join(t, "source-expert")
            e = self.step(f"{task}/source-expert", expert, ["titok-train", *self.model("smollm2"), *TRAIN, "--all-tokens",
                                                           "--seed", EXPERT_SEED, "--output", expert, "--overwrite", train], d)
            self.evaluate(f"{task}/eval/source-base", "smollm2", None, test, d)
            self.evaluate(f"{task}/eval/source-expert", "smollm2", expert, test, e)
            for pair in ("gemma", "smollm2"):
                self.evaluate(f"{task}/{pair}/vanilla", pair, None, test, d)

            # The pool: 2M synthetic records answered by the expert, scored; and the query-source
            # ablation's pool: queries written by the target base (Gemma), answered by the same expert.
            pools = {}
            planned = [arm for arm in a.arms if ARMS[arm][1] is not None]
            writers = (("", "smollm2"), ("tq-", "gemma")) if "titok-target-queries" in planned else (("", "smollm2"),)
            for prefix, writer in writers if planned else ():
                synthetic = os.path.join(t, f"{prefix}synthetic.jsonl")
                if writer == "smollm2":
                    g = self.step(f"{task}/{prefix}synthetic", synthetic, [
                        "titok-gen", *self.model("smollm2"), "--adapter", expert, "--queries-from", "base", *GEN,
                        "--seed-examples", train, "--num", 2 * M, "--seed", 0, "--resume", "-o", synthetic], e)
                else:
                    queries = os.path.join(t, "tq-queries.jsonl")
                    q = self.step(f"{task}/tq-queries", queries, [
                        "titok-gen", *self.model("gemma"), *GEN, "--label-max-new-tokens", 1,
                        "--seed-examples", train, "--num", 2 * M, "--seed", 0, "--resume", "-o", queries], d)
                    g = self.step(f"{task}/{prefix}synthetic", synthetic, [
                        "titok-gen", *self.model("smollm2"), "--adapter", expert, *GEN, "--label", queries,
                        "--resume", "-o", synthetic], e, q)
                # The scored pool is kept with the results: the model-written data every arm
                # trains on, and the costliest step to redo (a fresh clone resumes after it).
                scored = os.path.join(self.a.results, task, f"{prefix}scored.jsonl")
                pools[prefix] = (scored, self.step(f"{task}/{prefix}scored", scored, [
                    "titok-score", *self.model("smollm2"), "--adapter", expert, "--dtype", "bfloat16", "--device", "cpu",
                    "--topk", TOPK, "--resume", "-o", scored, synthetic], g))

            for seed in a.seeds:
                for arm, (pairs, selection, extra) in ARMS.items():
                    if arm not in a.arms or (seed != a.seeds[0] and arm not in EVERY_SEED and a.quick):
                        continue
                    for pair in pairs.split():
                        if pair not in a.pairs:
                            continue
                        inp, dep = (train, d) if selection is None else self.selection(task, pair, selection.format(k=K), seed, pools)
                        adapter = os.path.join(t, pair, f"s{seed}", arm)
                        s = self.step(f"{task}/{pair}/s{seed}/{arm}/train", adapter, [
                            "titok-train", *self.model(pair), *TRAIN, *extra,
                            "--seed", seed, "--output", adapter, "--overwrite", inp], dep)
                        self.evaluate(f"{task}/{pair}/s{seed}/{arm}", pair, adapter, test, s)
        self.order_by_seed()

    def selection(self, task, pair, name, seed, pools):
        """The filtered (and, for Gemma, aligned) records an arm trains on."""
        t, M = os.path.join(self.out, task), self.a.m
        tq = name.startswith("tq-")
        scored, dep = pools["tq-" if tq else ""]
        kind, _, k = name.removeprefix("tq-").partition("-")
        if kind == "random":  # the seed picks the M samples
            k = "1" if k == "all" else k.removeprefix("k")
            filtered = os.path.join(t, f"s{seed}", f"{name}.jsonl")
            args = ["--rank-by", "random", "--seed", seed, "-k", k]
        else:  # "top": by mean excess; "answer": by the answer tokens' mean excess
            filtered = os.path.join(t, f"{name}.jsonl")
            k = k.removeprefix("k")
            args = ["-k", k, *(["--mass", self.a.mass] if k == "auto" else []),
                    *(["--rank-by", "answer-excess"] if kind == "answer" else [])]
        f = self.step(f"{os.path.relpath(filtered, self.out)}", filtered,
                      ["titok-filter", "--keep", M, *args, "-o", filtered, scored], dep)
        if k == "auto":  # the k that -k auto chose, kept beside the metrics for the report
            self.step(f"{task}/auto-k", os.path.join(self.a.results, task, "auto-k.json"),
                      [sys.executable, "-c", SAVE_K, filtered, os.path.join(self.a.results, task, "auto-k.json")], f)
        if pair == "smollm2":
            return filtered, f
        aligned = filtered.replace(".jsonl", ".gemma.jsonl")
        return aligned, self.step(f"{os.path.relpath(aligned, self.out)}", aligned, [
            "titok-align", "--target-model", self.gemma, "--chat-template", self.template,
            # the source named here, not the path the records carry: a committed pool written on
            # another machine (or in another venv) still aligns
            "--source-model", self.smollm2, "-o", aligned, filtered], f)

    def evaluate(self, name, pair, adapter, test, dep):
        # The metrics go to the committed results dir, the predictions to the work dir: a finished
        # eval is never re-run, on this machine or on a fresh clone.
        metrics = os.path.join(self.a.results, name + ".json")
        return self.step(name + "/eval", metrics, [
            "titok-eval", *self.model(pair), *(["--adapter", adapter] if adapter else []), *EVAL,
            "--metrics", metrics, "-o", os.path.join(self.out, name + ".predictions.jsonl"), test], dep)

    def order_by_seed(self):
        """Seed 0's steps (and the shared ones) first: a stopped run still has whole seeds."""
        def seed_of(name):
            part = next((p for p in name.split("/") if p[:1] == "s" and p[1:].isdigit()), None)
            return int(part[1:]) if part else -1
        self.steps = dict(sorted(self.steps.items(), key=lambda item: seed_of(item[0])))

    def needed(self, done):
        """The steps left to run: every unfinished result, and the unfinished steps it needs. A step
        whose dependants have all finished (an adapter whose eval is in results/) is not re-run."""
        dependants = {d for _, _, deps in self.steps.values() for d in deps}
        needed = set()
        for name in reversed(self.steps):  # dependants come after their dependencies
            if name not in done and (name not in dependants or name in needed):
                needed.add(name)
                needed.update(d for d in self.steps[name][2] if d not in done)
        return [n for n in self.steps if n in needed]

    def preflight(self, todo, env):
        """Why the titok-* commands the steps need do not run here, or None. Each is tried once
        with --help: a stale install (an editable one pointing at another checkout) would
        otherwise fail every step in 0 s and leave a failure line per step in times.jsonl."""
        for program in sorted({self.steps[n][1][0] for n in todo if self.steps[n][1][0].startswith("titok-")}):
            try:
                result = subprocess.run([program, "--help"], capture_output=True, text=True, env=env, cwd=ROOT)
            except OSError as e:
                return f"{program}: {e.strerror}"
            if result.returncode:
                lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
                return f"{program} --help failed: {lines[-1]}"
        return None

    def run(self):
        os.makedirs(self.a.results, exist_ok=True)
        logs = os.path.join(self.out, "logs")
        env = dict(os.environ, OMP_NUM_THREADS=str(self.a.threads), MKL_NUM_THREADS=str(self.a.threads),
                   TOKENIZERS_PARALLELISM="false")
        done = {n for n, (out, _, _) in self.steps.items() if os.path.exists(out)}
        failed, running = set(), {}
        todo = self.needed(done)
        print(f"study: {len(self.steps)} steps, {len(done)} done, {len(todo)} to run, {self.a.jobs} at a time",
              file=sys.stderr)
        problem = self.preflight(todo, env)
        if problem:
            print(f"study: {problem}; nothing run (`make install` sets up the commands)", file=sys.stderr)
            return 2

        def launch(name):
            output, command, _ = self.steps[name]
            log = os.path.join(logs, name.replace("/", "__") + ".log")
            os.makedirs(os.path.dirname(log), exist_ok=True)
            os.makedirs(os.path.dirname(output), exist_ok=True)
            start = time.time()
            with open(log, "w") as f:
                f.write(" ".join(command) + "\n")
                f.flush()
                rc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=f, env=env, cwd=ROOT).returncode
            return rc, time.time() - start, summary_line(log)

        with ThreadPoolExecutor(self.a.jobs) as pool:
            while todo or running:
                for name in list(todo):
                    if len(running) >= self.a.jobs:
                        break
                    deps = self.steps[name][2]
                    if any(d in failed for d in deps):
                        todo.remove(name)
                        failed.add(name)
                    elif all(d in done for d in deps):
                        todo.remove(name)
                        running[pool.submit(launch, name)] = name
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    name = running.pop(future)
                    rc, seconds, summary = future.result()
                    (done if rc == 0 else failed).add(name)
                    with open(os.path.join(self.a.results, "times.jsonl"), "a") as f:
                        f.write(json.dumps({"step": name, "rc": rc, "seconds": round(seconds, 1),
                                            **({"summary": summary} if summary else {})}) + "\n")
                    print(f"study: {'ok  ' if rc == 0 else 'FAIL'} {name} ({seconds:.0f} s; {len(done)}/{len(self.steps)})",
                          file=sys.stderr)
        if failed:
            print(f"study: {len(failed)} steps failed or blocked; see {logs}", file=sys.stderr)
        return 1 if failed else 0


# --- the report ---------------------------------------------------------------------------------

ROW_NAMES = {
    "vanilla": "target vanilla (no adapter; greedy: one run)",
    "kd": "KD / all tokens of M random samples (✗ sample, ✗ token)",
    "token-only": f"token filter only: M random samples, top-{K} tokens (✗ / ✓)",
    "titok-k1.0": "sample filter only: top-M samples, all tokens (✓ / ✗)",
    "titok-k0.3": f"TiTok: top-M samples, top-{K} tokens (✓ / ✓)",
    "titok-answer-rank": f"TiTok, samples ranked by the answer tokens' excess (closing token left out), top-{K} tokens",
    "titok-k0.1": "TiTok k = 0.1", "titok-k0.5": "TiTok k = 0.5", "titok-k0.7": "TiTok k = 0.7",
    "titok-auto": "TiTok -k auto",
    "titok-no-closing": f"TiTok top-{K}, closing token not trained unless selected (--no-train-closing)",
    "titok-target-queries": "TiTok, queries written by the target base",
    "kd-mined": f"KD+MinED: logit KD (top-{TOPK}) on all tokens of M random samples",
    "titok-kd": f"TiTok + KD: top-{K} tokens, NLL + logit KD (top-{TOPK})",
    "ceiling": "ceiling: target LoRA on the real train split",
}


def read_metric(path, key="exact_match"):
    try:
        with open(path) as f:
            return json.load(f)[key]
    except (OSError, ValueError, KeyError):
        return None


def summary_line(log):
    """A step's summary: the last line its command logged (titok-gen's "kept N queries; on-format
    X% of the N read ..."), kept in times.jsonl beside its seconds. Log lines start with the
    logger's name (titok.gen: ...); tqdm's bars (titok-gen: ...) are not summaries."""
    with open(log, errors="replace") as f:
        lines = f.read().splitlines()  # splits tqdm's \r-redrawn bars too
    return next((line.strip() for line in reversed(lines) if line.startswith("titok.")), None)


ON_FORMAT = re.compile(r"on-format (\d+)% of the (\d+) read")


def on_format(times, task):
    """(queries read, of them on-format) over the runs of a task's pool (a resumed pool has several),
    from titok-gen's summaries in times.jsonl; None if none was recorded."""
    found = [ON_FORMAT.search(t.get("summary", "")) for t in times if t["step"] == f"{task}/synthetic"]
    found = [(int(m[2]), round(int(m[1]) * int(m[2]) / 100)) for m in found if m]
    return (sum(n for n, _ in found), sum(k for _, k in found)) if found else None


def source_expert_metrics(out, task, seeds):
    """The source expert's metric for each seed: EXPERT_SEED's is the expert that wrote the pools;
    for other seeds the SmolLM2 ceiling run is the same training (same command, that seed)."""
    return [read_metric(os.path.join(out, task, "eval", "source-expert.json")) if seed == EXPERT_SEED else
            read_metric(os.path.join(out, task, "smollm2", f"s{seed}", "ceiling.json")) for seed in seeds]


def majority_answer(data, task):
    """Exact match on the test split of always giving the train split's most common completion
    (ties: the first seen), or None without the split: what a model that learned only the answer
    prior scores, the floor a transfer has to clear (chosen on train, never on test)."""
    return majority_floor(*(os.path.join(data, task, f"{name}.jsonl") for name in ("train", "test")))


def majority_floor(train_path, test_path):
    """majority_answer for any two record files: the first's most common completion, scored on the
    second (None when either is missing or empty)."""
    paths = [train_path, test_path]
    if not all(os.path.exists(p) for p in paths):
        return None
    train, test = ([(r, prompt_and_completion(r, where)[1]) for where, r in read_records(p)] for p in paths)
    if not train or not test:
        return None
    answer = statistics.mode(completion for _, completion in train)  # the first of the most common
    return statistics.fmean(any(exact_match(answer, ref) for ref in references(r, completion)) for r, completion in test)


def cell(values):
    values = [v for v in values if v is not None]
    if not values:
        return "", None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f} (n={len(values)})", mean


def arm_mean(out, tasks, seeds, pair, arm):
    """Mean over tasks of the per-task mean over seeds; None unless every task has a result."""
    means = [cell([read_metric(os.path.join(out, t, pair, f"s{s}", f"{arm}.json")) for s in seeds])[1] for t in tasks]
    return statistics.fmean(means) if means and all(m is not None for m in means) else None


def directions(out, tasks, seeds, pairs):
    """The paper's claims, checked on these numbers (means over tasks and seeds)."""
    lines = ["## Against the paper's directions\n",
             "Paper, Table 2 (sample filter / token filter, BBH column): ✗/✗ .458 < ✗/✓ .463 < ✓/✗ .470 < ✓/✓ .483; "
             "k sweep: 10-30% best for weak-to-strong; queries by the source expert beat target-written ones.\n"]
    for pair in pairs:
        m = {arm: arm_mean(out, tasks, seeds, pair, arm) for arm in ARMS}
        cells = [("✗/✗", m["kd"]), ("✗/✓", m["token-only"]), ("✓/✗", m["titok-k1.0"]), ("✓/✓", m["titok-k0.3"])]
        if any(v is None for _, v in cells):
            continue
        shown = ", ".join(f"{name} {100 * v:.1f}" for name, v in cells)
        verdicts = [
            ("token filter helps without sample filter (✗/✓ > ✗/✗)", cells[1][1] > cells[0][1]),
            ("sample filter helps without token filter (✓/✗ > ✗/✗)", cells[2][1] > cells[0][1]),
            ("both together are best (✓/✓ highest)", cells[3][1] > max(v for _, v in cells[:3])),
        ]
        lines.append(f"- {pair}: {shown}. " + "; ".join(f"{text}: {'agrees' if ok else 'disagrees'}"
                                                        for text, ok in verdicts) + ".")
        sweep = {k: m.get(f"titok-k{k}") for k in K_SWEEP}
        if all(v is not None for v in sweep.values()):
            best = max(sweep, key=sweep.get)
            lines.append(f"- {pair} k sweep: " + ", ".join(f"k={k} {100 * v:.1f}" for k, v in sweep.items()) +
                         f"; best k = {best} ({'agrees' if best in ('0.1', '0.3') else 'disagrees'} with 10-30%)"
                         + (f"; -k auto {100 * m['titok-auto']:.1f}" if m.get("titok-auto") is not None else "") + ".")
        if pair == "gemma" and m.get("titok-target-queries") is not None:
            lines.append(f"- {pair} query source: source-side queries {100 * m['titok-k0.3']:.1f} vs target-base queries "
                         f"{100 * m['titok-target-queries']:.1f} "
                         f"({'agrees' if m['titok-k0.3'] > m['titok-target-queries'] else 'disagrees'} with the paper).")
    lines.append("")
    return lines


# An earlier study's arm for each arm here, where its name meant something else then: before
# titok-train trained the closing token by default, "titok-k0.3" trained the mask alone and
# "titok-closing" added the closing token.
BEFORE_ARM = {"titok-no-closing": "titok-k0.3", "titok-k0.3": "titok-closing"}
SUMMARY_ARMS = ["vanilla", "kd", "titok-k1.0", "titok-no-closing", "titok-k0.3", "ceiling"]


def arm_paths(out, task, pair, arm, seeds):
    """The metrics files of an arm on a task: one per seed (vanilla: one, greedy and seedless)."""
    if arm == "vanilla":
        return [os.path.join(out, task, pair, "vanilla.json")]
    return [os.path.join(out, task, pair, f"s{s}", f"{arm}.json") for s in seeds]


def task_means(out, tasks, seeds, pair, arm):
    """(mean over tasks of the per-task means over seeds, tasks with a result); None when none has."""
    means = []
    for task in tasks:
        means.append(cell([read_metric(p) for p in arm_paths(out, task, pair, arm, seeds)])[1])
    found = [m for m in means if m is not None]
    return (statistics.fmean(found), len(found)) if found else None


def before_and_after(args):
    """The headline arms beside an earlier study's (--before), each a mean over the tasks that have it."""
    lines = ["## Before and after\n",
             f"Mean exact match (%) over the tasks that have the arm (how many in brackets), this study beside "
             f"`{os.path.relpath(args.before, ROOT)}` (an earlier study, run with the settings its own report states)"
             + (f". This one ran on the records in `{os.path.relpath(os.path.abspath(args.data), ROOT)}` (--data): "
                f"where the earlier one ran on another split, a row compares data and settings together"
                if args.data else "") + ".\n"]
    for pair in args.pairs:
        rows = []
        for arm in SUMMARY_ARMS:
            then = task_means(args.before, args.tasks, args.seeds, pair, BEFORE_ARM.get(arm, arm))
            now = task_means(args.results, args.tasks, args.seeds, pair, arm)
            if then or now:
                shown = [f"{100 * result[0]:.1f} ({result[1]} tasks)" if result else "" for result in (then, now)]
                rows.append(f"| {pair} | {ROW_NAMES[arm]} | {shown[0]} | {shown[1]} |")
        if rows:
            lines += ["| pair | arm | before | now |", "|---|---|---:|---:|", *rows, ""]
    return lines


def shown_arms(pair, arms):
    """The report's rows for a pair: vanilla and the given arms that run for it, in ROW_NAMES order."""
    shown = ["vanilla"] + [a for a, (pairs, _, _) in ARMS.items() if pair in pairs.split() and a in arms]
    return sorted(shown, key=list(ROW_NAMES).index)


def choice_table(args):
    """Multiple-choice accuracy (titok-eval --choices) of every arm whose evals have it."""
    rows = []
    for pair in args.pairs:
        for arm in shown_arms(pair, args.arms):
            cells = []
            for task in args.tasks:
                paths = arm_paths(args.results, task, pair, arm, args.seeds)
                cells.append(cell([read_metric(p, "choice_accuracy") for p in paths])[0])
            if any(cells):
                rows.append(f"| {pair} | {ROW_NAMES[arm]} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["## Multiple-choice accuracy\n",
            "The option with the highest log-likelihood under the model (`titok-eval --choices`, the "
            "lm-evaluation-harness convention), % correct, for the tasks whose records list options. Small "
            "models often know more than they can format.\n",
            "| pair | arm | " + " | ".join(args.tasks) + " |", "|---|---|" + "---:|" * len(args.tasks), *rows, ""]


def carried_over(args):
    """The results this study shares byte for byte with --before's (copied, not re-run), by name:
    source-base, source-expert, vanilla, ceiling, ..."""
    if not args.before:
        return []
    names = set()
    for task in args.tasks:
        for where, _, files in os.walk(os.path.join(args.results, task)):
            for name in files:
                mine = os.path.join(where, name)
                theirs = os.path.join(args.before, os.path.relpath(mine, args.results))
                if name.endswith(".json") and os.path.exists(theirs):
                    with open(mine, "rb") as a, open(theirs, "rb") as b:
                        if a.read() == b.read():
                            names.add(name.removesuffix(".json"))
    return sorted(names)


def report(args):
    tasks, out, lines = args.tasks, args.results, []
    data = args.data or os.path.join(args.out, "data")  # where titok-bigbench's split goes without --data
    times = []
    if os.path.exists(os.path.join(out, "times.jsonl")):
        with open(os.path.join(out, "times.jsonl")) as f:
            times = [json.loads(line) for line in f]
    k = K
    lines.append(f"# TiTok at CPU scale: the paper's ablation on {len(tasks)} BIG-bench tasks\n")
    lines.append("Exact match (%) on each task's held-out test split, mean ± standard deviation over seeds "
                 "(n = seeds finished). The mean column: the mean over tasks, ± the standard deviation over seeds "
                 "of each seed's mean over tasks (the seeds every task has). Written by `python bench/study.py "
                 "report` from the metrics files of `make study`; re-run both to reproduce.\n")
    for pair, title in (("gemma", "SmolLM2-135M-Instruct -> Gemma-3-270M (base), cross-tokenizer"),
                        ("smollm2", "SmolLM2-135M-Instruct -> SmolLM2-135M-Instruct, fresh LoRA, same tokenizer")):
        if pair not in args.pairs:
            continue
        lines.append(f"## {title}\n")
        lines.append("| arm | " + " | ".join(tasks) + " | mean |")
        lines.append("|---|" + "---:|" * (len(tasks) + 1))
        arms = shown_arms(pair, args.arms)
        floor = [majority_answer(data, task) for task in tasks]
        if any(v is not None for v in floor):
            lines.append("| no model: the train split's most common answer, always | " + " | ".join(
                f"{100 * v:.1f}" if v is not None else "" for v in floor) + " | " +
                (f"{100 * statistics.fmean(floor):.1f}" if all(v is not None for v in floor) else "") + " |")
        for arm in arms:
            values = [[read_metric(p) for p in arm_paths(out, task, pair, arm, args.seeds)] for task in tasks]
            cells, means = zip(*(cell(v) for v in values))
            overall = f"{100 * statistics.fmean(means):.1f}" if all(m is not None for m in means) else ""
            # each seed's mean over tasks, for the seeds every task has: the spread that says whether
            # two arms differ by more than seed noise (vanilla has one seedless run: none)
            per_seed = [statistics.fmean(column) for column in zip(*values) if None not in column]
            if overall and len(per_seed) > 1:
                overall += f" ± {100 * statistics.stdev(per_seed):.1f}"
            lines.append(f"| {ROW_NAMES[arm]} | " + " | ".join(cells) + f" | {overall} |")
        lines.append("")
    if args.before:
        lines.extend(before_and_after(args))
    lines.extend(choice_table(args))
    lines.extend(directions(out, tasks, args.seeds, args.pairs))
    lines.append("## The source side\n")
    lines.append("| model | " + " | ".join(tasks) + " |")
    lines.append("|---|" + "---:|" * len(tasks))
    lines.append("| SmolLM2 source-base (greedy: one run) | " + " | ".join(
        cell([read_metric(os.path.join(out, t, "eval", "source-base.json"))])[0] for t in tasks) + " |")
    lines.append("| SmolLM2 source-expert, every seed | " + " | ".join(
        cell(source_expert_metrics(out, t, args.seeds))[0] for t in tasks) + " |")
    lines.append("")
    lines.append("The expert that wrote and answered the pools is the seed-0 one; the other seeds' experts are the "
                 "SmolLM2 ceiling runs of those seeds (the same command: LoRA SFT of SmolLM2 on the real train "
                 "split).\n")
    auto = []
    for task in tasks:
        path = os.path.join(out, task, "auto-k.json")
        if os.path.exists(path):
            with open(path) as f:
                auto.append(f"{task}: k = {json.load(f)['k']:.3f}")
    if auto:
        lines.append(f"`-k auto --mass {args.mass}` chose " + "; ".join(auto) + ".\n")
    lines.append("## Settings and cost\n")
    lines.append(f"- tasks: {', '.join(tasks)}; seeds: {', '.join(map(str, args.seeds))}; train split "
                 f"{args.train_size} examples (expert SFT and ceiling); test split {args.test_size}; pool 2M = "
                 f"{2 * args.m}, M = {args.m}; k = {k} (TiTok, token-only, target-queries); scope sample")
    if args.data:
        lines.append(f"- data: the train/test records in `{os.path.relpath(os.path.abspath(args.data), ROOT)}` "
                     f"(--data), not titok-bigbench's split")
    lines.append(f"- every LoRA: `{' '.join(TRAIN)}`; eval: greedy, `{' '.join(EVAL)}`")
    lines.append("- per task: one source expert (seed 0) and one synthetic pool; seeds vary the M random samples "
                 "and the target LoRA's initialization and data order")
    lines.append("- the query-source arm runs for Gemma only: on the same-tokenizer pair the target base, SmolLM2, "
                 "already writes the main pool's queries (titok-gen --queries-from base)")
    carried = carried_over(args)
    if carried:
        lines.append(f"- carried over from `{os.path.relpath(args.before, ROOT)}`, not re-run (the same metrics files, "
                     f"byte for byte): {', '.join(carried)}")
    if args.quick:
        lines.append(f"- the Table 2 cells (KD, token filter only, sample filter only, TiTok) ran for every seed; the "
                     f"other arms for seed {args.seeds[0]} only (--quick)")
    rates = {task: on_format(times, task) for task in tasks}
    if any(rates.values()):
        lines.append("- on-format queries (docs/design.md, Query shape; titok-gen's summary, over every run of "
                     "the pool): " + "; ".join(f"{task} {100 * k / n:.0f}% of {n} read" for task, (n, k) in
                                              ((t, r) for t, r in rates.items() if r)))
    if times:
        total = sum(t["seconds"] for t in times)
        lines.append(f"- wall time of the steps: {total / 3600:.2f} h of step time over {len(times)} steps "
                     f"(--jobs {args.jobs} at a time, so the run took about {total / args.jobs / 3600:.2f} h)")
    lines.append(f"- machine: {platform.machine()}, {os.cpu_count()} CPU threads, no GPU, Python "
                 f"{platform.python_version()}; bfloat16 on CPU")
    text = "\n".join(lines) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output + ".partial", "w") as f:
            f.write(text)
        os.replace(args.output + ".partial", args.output)
        print(f"study: wrote {args.output}", file=sys.stderr)
    return 0


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "report", "plan"],
                        help="run the steps not yet done, tabulate the results, or list the steps and commands")
    parser.add_argument("--tasks", default="object_counting,sports_understanding,reasoning_about_colored_objects",
                        type=lambda s: s.split(","), help="BIG-bench tasks, comma-separated")
    parser.add_argument("--pairs", default="gemma,smollm2", type=lambda s: s.split(","),
                        help="targets, comma-separated: gemma (Gemma-3-270M, cross-tokenizer), smollm2 (SmolLM2, a fresh LoRA)")
    parser.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")],
                        help="seeds, comma-separated: each varies the M random samples and the target LoRA's "
                             "initialization and data order (the data split, expert and pools are seed 0's)")
    parser.add_argument("--data", default=None,
                        help="DIR/TASK/train.jsonl and test.jsonl to use instead of titok-bigbench's split (for "
                             "another copy of the tasks, such as bench/bbh_records.py's; --train-size and "
                             "--test-size then only label the report)")
    parser.add_argument("--train-size", type=int, default=128, help="real training examples per task")
    parser.add_argument("--test-size", type=int, default=100, help="test questions per task")
    parser.add_argument("-m", type=int, default=250, help="samples kept (the pool is 2M; the paper's 250 of 500)")
    parser.add_argument("--arms", default=",".join(ARMS), type=lambda s: [a for a in s.split(",") if a],
                        help="the arms to run, comma-separated (default: all; empty: the data, the source expert and "
                             "the evals without an arm): spend CPU hours on the arms a question needs first")
    parser.add_argument("--before", default=None,
                        help="the results dir of an earlier study, shown beside this one in the report's summary")
    parser.add_argument("--mass", default="0.9", help="-k auto's share of positive excess")
    parser.add_argument("--quick", action="store_true",
                        help="the k sweep, -k auto, closing-token, query-source and ceiling arms for the first seed only")
    parser.add_argument("--jobs", type=int, default=2, help="steps run at once")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per step (default cores / jobs)")
    parser.add_argument("--out", default=os.path.join(ROOT, "work", "study"),
                        help="the work dir: data, adapters, records, predictions, logs")
    parser.add_argument("--results", default=os.path.join(ROOT, "results", "study"),
                        help="the metrics of every eval, the scored synthetic pools, the chosen -k auto and the "
                             "step times (committed: a finished step there is never re-run, and a fresh clone "
                             "resumes the study)")
    parser.add_argument("-o", "--output", default=os.path.join(ROOT, "results", "study.md"),
                        help="the Markdown report that `report` writes")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        parser.error(f"--arms: no arm {', '.join(unknown)} (arms: {', '.join(ARMS)})")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    return args


def main(argv=None):
    args = parse(argv)
    if args.action == "report":
        return report(args)
    study = Study(args)
    study.plan()
    if args.action == "plan":
        for name, (output, command, deps) in study.steps.items():
            print(name, "<-", ", ".join(deps) or "-", "\n   ", " ".join(command))
        return 0
    return study.run()


if __name__ == "__main__":
    sys.exit(main())
