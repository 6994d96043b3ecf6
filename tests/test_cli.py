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


FLOAT_OPTIONS = [(name, p.opts[0]) for name, module in COMMANDS.items()
                 for p in importlib.import_module(f"titok_tools.{module}").main.params
                 if isinstance(p, click.Option) and isinstance(p.type, click.types.FloatParamType)]


def test_float_options_are_found():
    # the parametrized test below runs on what this finds: make sure it finds the known ones
    assert {("train", "--lr"), ("train", "--lora-alpha"), ("filter", "--mass"), ("gen", "--top-p")} <= set(FLOAT_OPTIONS)


@pytest.mark.parametrize("name,option", FLOAT_OPTIONS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_float_options_refuse_nan_and_inf(name, option, value):
    # A range check alone lets nan through (nan < 0 and nan > 1 are both false): titok-train then
    # failed with a traceback, or trained with dropout nan and exited 0.
    from click.testing import CliRunner
    command = importlib.import_module(f"titok_tools.{COMMANDS[name]}").main
    param = next(p for p in command.params if option in p.opts)
    with pytest.raises(click.BadParameter, match="finite|range"):
        param.type.convert(value, param, None)
    result = CliRunner().invoke(command, [option, value])
    assert result.exit_code == 2 and f"'{option}'" in result.output, result.output


def test_max_length_is_768_wherever_a_record_is_tokenized():
    # docs/design.md, Defaults: prompt and completion caps of the official code; the stages must agree, or a mask
    # made by one does not fit the tokens of the next
    defaults = {name: p.default for name, module in COMMANDS.items()
                for p in importlib.import_module(f"titok_tools.{module}").main.params if p.name == "max_length"}
    assert defaults == {name: 768 for name in ("gen", "score", "align", "train", "eval")}
