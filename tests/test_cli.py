"""What every command line shares: each option explains itself in --help."""
import importlib

import click
import pytest

COMMANDS = {"gen": "gen", "score": "score", "filter": "filter", "align": "align", "train": "train",
            "eval": "evaluate", "merge": "merge", "bigbench": "bigbench", "show": "show"}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help(name):
    command = importlib.import_module(f"titok_tools.{COMMANDS[name]}").main
    bare = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    assert bare == [], f"titok-{name}: options without a help text: {bare}"
