"""The results table of a pipeline run, from titok-eval's --metrics files.

    python -m titok_tools.report -o report.md --title "..." --setting M=100 \\
        source-base=eval/source-base.json target-titok=eval/target-titok.json ...

Writes a Markdown table (one row per NAME=FILE, in the order given) followed by the run's
settings; every number comes from the metrics files of this run.
"""
import json
import os
import platform
import time

import click

from . import cli
from .errors import TitokError
from .records import text_output


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
        cells = [_number(m["exact_match"], ".1%"), _number(m["rouge1"], ".3f"), _number(m["rougeL"], ".3f")]
        if choices:
            cells += [_number(m.get("choice_accuracy"), ".1%"), _number(m.get("choice_accuracy_norm"), ".1%")]
        lines.append(f"| {name} | {m['records']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def dtypes_as_run(rows):
    """The dtype the runs resolved (titok-eval records it; --dtype auto differs between machines):
    one name when all rows agree, else each row's."""
    named = [(name, m["dtype"]) for name, m in rows if m.get("dtype")]
    if len({dtype for _, dtype in named}) == 1 and len(named) == len(rows):
        return f"`{named[0][1]}`"
    return ", ".join(f"{name} `{dtype}`" for name, dtype in named)


def _number(value, spec):
    # titok-eval writes null for 0 records (and a run without --choices has no choice numbers)
    return "n/a" if value is None else format(value, spec)


@click.command()
@click.argument("results", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The Markdown file to write.")
@click.option("--title", default="TiTok transfer", show_default=True, help="The report's heading.")
@click.option("--setting", "settings", multiple=True, metavar="KEY=VALUE", help="A setting of the run to list under the table.")
@cli.command
def main(results, output, title, settings):
    """Tabulate NAME=METRICS.json results into a Markdown report."""
    rows = []
    for item in results:
        name, sep, path = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: use NAME=METRICS.json", param_hint="RESULTS")
        try:
            with open(path) as f:
                rows.append((name, json.load(f)))
        except (OSError, ValueError) as e:
            raise TitokError(f"{path}: cannot read metrics: {e}")
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
