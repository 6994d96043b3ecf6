"""What every command line shares: option decorators, logging to stderr, the command runner.

Options read the same everywhere: `--model`, `--adapter`, `--dtype`, `--device`,
`--chat-template`, `--max-length`, `-o/--output`, `-k/--token-fraction`, `--scope`, `--seed`,
`--skip-invalid`, `--resume`, `--shard`.
"""
import functools
import gc
import logging
import math
import os
import signal
import sys
import warnings

import click

from .errors import TitokError
from .formatting import FormatError
from .records import check_writable
from .select import SCOPES


def setup_logging(quiet=False):
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(name)s: %(message)s", force=True)
    # transformers and peft chatter goes to stderr too, but only its warnings.
    for name in ("transformers", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # per-tensor loading bars; our own progress is per record


def streaming_gc():
    """Set the garbage collector for a command that streams records, once its models or
    tokenizers are loaded.

    Records are JSON (lists and dicts without cycles, freed by reference counting), but each one
    allocates thousands of lists, and at Python's default thresholds the collector walks a
    record's lists several times while it is in flight: 45% of titok-align's time at 3,000 tokens
    a record. What was loaded is frozen (never walked again) and collections come once per
    100,000 allocations: cyclic garbage is still collected, memory stays flat.
    """
    gc.freeze()
    gc.set_threshold(100_000, 50, 50)


def _compose(*decorators):
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


class Finite(click.FloatRange):
    """A float option's type, in a range like click.FloatRange, that also refuses nan and inf
    (every comparison with nan is false: a range alone lets it through to the work)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


input_argument = click.argument("input", default="-", type=click.Path(allow_dash=True, dir_okay=False))

def _writable(ctx, param, value):
    # A callback runs before the command body (and its error conversion): convert here.
    if value is not None:
        try:
            check_writable(value)
        except TitokError as e:
            raise click.ClickException(str(e)) from None
    return value


def metrics_file(ctx, param, value):
    """A JSON file beside the records (not stdout: that carries the records), checked writable now."""
    if value == "-":
        raise click.BadParameter("stdout carries the records: give a file (the metrics are on stderr too)")
    return _writable(ctx, param, value)


output_option = click.option("-o", "--output", default="-", show_default=True, type=click.Path(allow_dash=True, dir_okay=False),
                             callback=_writable,
                             help="Write records here ('-' = stdout). A file appears only when the command succeeds "
                                  "(written as FILE.partial, then renamed).")

resume_option = click.option("--resume", is_flag=True,
                             help="With -o FILE: keep the records already written by an interrupted run and skip their ids.")

skip_invalid_option = click.option("--skip-invalid", is_flag=True,
                                   help="Skip bad records (counted on stderr) instead of stopping at the first one.")

seed_option = click.option("--seed", default=0, show_default=True, type=int, help="Random seed: same inputs + same seed = same output.")


def _shard(ctx, param, value):
    if value is None:
        return None
    try:
        index, count = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter("use I/N, for example 0/4")
    if not (count >= 1 and 0 <= index < count):
        raise click.BadParameter("need 0 <= I < N")
    return index, count


shard_option = click.option("--shard", callback=_shard, metavar="I/N",
                            help="Process only records whose 0-based index i has i % N == I (for array jobs; "
                                 "`titok-merge` puts the shards back in order).")

model_options = _compose(
    click.option("--model", required=True, help="Base model: a Hugging Face id, a local dir, or a .gguf file "
                                                 "(converted once into $TITOK_CACHE, default ~/.cache/titok-tools)."),
    click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
                 help="Weights dtype. auto = bfloat16 where the hardware runs it natively, float16 on a CUDA card "
                      "without bf16, else float32."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                 help="auto = cuda when a GPU is visible, else cpu."),
    click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model's repository."),
)

tokenizer_options = _compose(
    click.option("--chat-template", type=click.Path(exists=True, dir_okay=False),
                 help="A Jinja chat template file, for tokenizers that carry none (base models)."),
    click.option("--no-chat-template", is_flag=True,
                 help="Format as plain prompt + completion + EOS even if the tokenizer has a template."),
    click.option("--max-length", default=768, show_default=True, type=click.IntRange(min=1),
                 help="Token cap for the prompt (cut from the left) and, separately, the completion (cut from the right, marked truncated)."),
)

backend_options = _compose(
    click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
                 help="transformers generate (CPU or GPU), or vLLM (pip install 'titok-tools[vllm]'; give it a large "
                      "--batch-size)."),
    click.option("--tensor-parallel-size", default=1, show_default=True, type=click.IntRange(min=1),
                 help="GPUs per model (vllm)."),
)
adapter_option = click.option("--adapter", type=click.Path(exists=True, file_okay=False),
                              help="A PEFT LoRA adapter dir (adapter_config.json + adapter_model.safetensors).")


def _fraction(ctx, param, value):
    if value is None:
        return None
    if not 0 < value <= 1:
        raise click.BadParameter(f"{value} is outside (0, 1]")
    return value


def int_or_auto(ctx, param, value):
    """A positive integer, or the word auto (None): the command derives the number itself."""
    if value is None or value == "auto":
        return None
    try:
        number = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a positive integer nor auto")
    if number < 1:
        raise click.BadParameter(f"{number} is not a positive integer")
    return number


def _token_fraction(auto):
    """-k: a float in (0, 1], or the word auto where the command can choose k itself."""
    def parse(ctx, param, value):
        if value is None or value == "auto" and auto:
            return value
        if value == "auto":
            raise click.BadParameter("auto is for titok-filter, which records the k it chose in titok.filter.k: "
                                     "leave -k out here to use that k")
        try:
            number = float(value)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a number in (0, 1]" + (" nor auto" if auto else ""))
        return _fraction(ctx, param, number)
    return parse


def selection_options(default_k, auto=False):
    """-k/--token-fraction and --scope. auto=True lets -k be the word auto (titok-filter)."""
    help_k = "Share of tokens to select: max(1, floor(k*n)) highest scores, ties to the earlier token."
    if auto:
        help_k += " auto: the smallest k whose selection holds --mass of the positive excess."
    return _compose(
        click.option("-k", "--token-fraction", "k", type=str, default=None if default_k is None else str(default_k),
                     callback=_token_fraction(auto), metavar="FLOAT|auto" if auto else "FLOAT",
                     show_default=default_k is not None, help=help_k),
        click.option("--scope", type=click.Choice(SCOPES), default="sample", show_default=True,
                     help="Select per sample (the paper), per batch of 4 consecutive records (the official code), or globally."),
    )


def command(f):
    """Run a command body: logging on stderr, a one-line error for a chat template that refuses a
    conversation, quiet exit when a downstream pipe closes, one line and exit 128 + signal on Ctrl-C
    (or SIGTERM where a resumable output takes it: records.Interrupted says what it kept)."""
    @functools.wraps(f)
    def run(*args, **kwargs):
        setup_logging()
        try:
            return f(*args, **kwargs)
        except (TitokError, FormatError) as e:  # the library's errors, and one a chat template raised
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt as e:
            click.echo(f"Interrupted: {e}" if str(e) else "Interrupted.", err=True)
            sys.exit(128 + getattr(e, "signum", signal.SIGINT))
        except BrokenPipeError:
            # The reader went away (| head): stop quietly, and keep Python from complaining
            # about the stdout flush at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(0)
    return run



def check_resume(output, resume):
    """--resume continues a file: a command checks this before loading its model."""
    if resume and output == "-":
        raise click.UsageError("--resume needs -o FILE")


def counted_suffix(counts):
    """The end of a stage's summary line: truncated completions and skipped records, if any."""
    line = ""
    if counts.get("truncated"):
        line += f", {counts['truncated']} completions truncated (see --max-length)"
    if counts.get("invalid"):
        line += f", {counts['invalid']} invalid records skipped"
    return line
