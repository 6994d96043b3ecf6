"""The results table of a pipeline run, from titok-eval's --metrics files.

    python -m titok_tools.report -o report.md --title "..." --setting M=100 \\
        source-base=eval/source-base.json target-titok=eval/target-titok.json ...

Writes a Markdown table (one row per NAME=FILE, in the order given) followed by the run's
settings; every number comes from the metrics files of this run. A row may name several files,
NAME=FILE,FILE,... (one per seed): its cells are then the mean ± the standard deviation over them.
"""
import json
import os
import platform
import statistics
import time

import click

from . import cli
from .errors import TitokError
from .records import text_output


COLUMNS = ("exact_match", "rouge1", "rougeL", "choice_accuracy", "choice_accuracy_norm")


def pooled(runs):
    """One row's metrics from its runs (seeds): each column's mean, with the standard deviation over
    the runs under "<column>_std" when there are several. A column a run lacks stays missing."""
    if len(runs) == 1:
        return dict(runs[0])
    merged = {"records": runs[0]["records"], "runs": len(runs)}
    if len({m["records"] for m in runs}) > 1:
        raise TitokError(f"the runs of one row have different record counts: {[m['records'] for m in runs]}")
    for column in COLUMNS:
        values = [m.get(column) for m in runs]
        if all(v is not None for v in values):
            merged[column] = statistics.fmean(values)
            merged[column + "_std"] = statistics.stdev(values)
        elif any(column in m for m in runs):
            merged[column] = None
    dtypes = {m.get("dtype") for m in runs}
    if len(dtypes) == 1:
        merged["dtype"] = dtypes.pop()
    return merged


def table(rows):
    """One row per run; the choice columns (titok-eval --choices) when any run has them."""
    choices = any("choice_accuracy" in m for _, m in rows)
    header = "| model | records | exact match | ROUGE-1 | ROUGE-L |"
    rule = "|---|---:|---:|---:|---:|"
    if choices:
        header += " choice | choice per char |"
        rule += "---:|---:|"
    lines = [header, rule]
    for name, m in rows:
        specs = {"exact_match": ".1%", "rouge1": ".3f", "rougeL": ".3f"}
        if choices:
            specs.update(choice_accuracy=".1%", choice_accuracy_norm=".1%")
        cells = [_number(m.get(column), spec, m.get(column + "_std")) for column, spec in specs.items()]
        runs = f" (n={m['runs']})" if m.get("runs") else ""
        lines.append(f"| {name}{runs} | {m['records']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def dtypes_as_run(rows):
    """The dtype the runs resolved (titok-eval records it; --dtype auto differs between machines):
    one name when all rows agree, else each row's."""
    named = [(name, m["dtype"]) for name, m in rows if m.get("dtype")]
    if len({dtype for _, dtype in named}) == 1 and len(named) == len(rows):
        return f"`{named[0][1]}`"
    return ", ".join(f"{name} `{dtype}`" for name, dtype in named)


def _number(value, spec, std=None):
    # titok-eval writes null for 0 records (and a run without --choices has no choice numbers)
    if value is None:
        return "n/a"
    if std is None:
        return format(value, spec)
    if spec.endswith("%"):  # "69.3 ± 1.2%": the spread in the same points as the mean
        return f"{100 * value:.1f} ± {100 * std:.1f}%"
    return f"{format(value, spec)} ± {format(std, spec)}"


@click.command()
@click.argument("results", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The Markdown file to write.")
@click.option("--title", default="TiTok transfer", show_default=True, help="The report's heading.")
@click.option("--setting", "settings", multiple=True, metavar="KEY=VALUE", help="A setting of the run to list under the table.")
@cli.command
def main(results, output, title, settings):
    """Tabulate NAME=METRICS.json results into a Markdown report.

    Give a row several files, NAME=A.json,B.json (a run per seed), to show their mean ± standard
    deviation and the number of runs."""
    rows = []
    for item in results:
        name, sep, paths = item.partition("=")
        if not sep or not paths:
            raise click.BadParameter(f"{item!r}: use NAME=METRICS.json[,METRICS.json...]", param_hint="RESULTS")
        runs = []
        for path in paths.split(","):
            try:
                with open(path) as f:
                    runs.append(json.load(f))
            except (OSError, ValueError) as e:
                raise TitokError(f"{path}: cannot read metrics: {e}")
        rows.append((name, pooled(runs)))
    setting_lines = [f"- {s.partition('=')[0]}: `{s.partition('=')[2]}`" for s in settings]
    ran_in = dtypes_as_run(rows)
    if ran_in:
        setting_lines.append(f"- dtype as run: {ran_in}")
    setting_lines.append(f"- machine: {platform.machine()}, {os.cpu_count()} CPU threads, {platform.python_version()}")
    setting_lines.append(f"- written: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    text = f"# {title}\n\n{table(rows)}\n\nSettings:\n" + "\n".join(setting_lines) + "\n"
    with text_output(output) as f:
        f.write(text)


if __name__ == "__main__":
    main()
