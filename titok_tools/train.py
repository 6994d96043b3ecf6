"""titok-train: a fresh LoRA on the target base, trained only on the selected tokens.

    loss = sum_i m_i * CE_i / sum_i m_i      (docs/design.md, Target loss)

over every selected token of an optimizer step: token-weighted across the micro-batches of
gradient accumulation and across processes, so a step's loss does not depend on how its records
are split (batch 8 = batch 4 x 2 accumulation = batch 4 on 2 processes). Hidden states come
from the model's body and are projected to the vocabulary only at the selected positions:
with Gemma's 262k-entry vocabulary, full logits are a large share of a step. With float16
weights the loss is scaled up for backward (a GradScaler): the per-token gradients of a mean
over many tokens would otherwise underflow.

Multi-process (`accelerate launch -m titok_tools.train ...`, or torchrun): every process reads
the same records and shuffle, takes its share of each step's micro-batches, and the LoRA
gradients (a few MB) are summed across processes once per step, before clipping: the same update
DDP would make, for the token-weighted loss.
"""
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import click
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import TitokError
from . import cli
from .formatting import FormatError, encode, record_error
from .models import (DTYPES, base_model_name, decoder_and_head, load_model, load_tokenizer, predicting_hidden, project_logits,
                     resolve_device, resolve_dtype, right_padded, tokenizer_fingerprint)
from .records import RecordError, check_writable, checked, not_kept, prompt_and_completion, read_records, spooled, titok_part

log = logging.getLogger("titok.train")

CHECKPOINT_SUFFIX = ".checkpoint"


@dataclass
class Example:
    where: str
    input_ids: list   # prompt + completion tokens, as formatting.encode made them
    positions: list   # indices into input_ids of the trained tokens (each predicted from the one before)
    weights: list     # m_i > 0 for each trained token


# ---------------------------------------------------------------------------------------------
# Records -> examples


def _mask_of(record, where, fingerprint, model):
    """(mask, token_ids, field) of a record: the target mask when it was made for this tokenizer,
    else the source mask when the source tokenizer is this one (same-tokenizer transfer)."""
    target, source = titok_part(record, "target") or {}, titok_part(record, "source") or {}
    for part, name, step in ((target, "titok.target", "titok-align"), (source, "titok.source", "titok-filter")):
        if part.get("tokenizer") == fingerprint:
            if part.get("mask") is None:
                raise RecordError(where, f"{name}.mask", f"missing: run {step} first (or pass --all-tokens for plain SFT)")
            return part["mask"], part.get("token_ids"), f"{name}.mask"
    if target or source:
        raise RecordError(where, "titok", f"no token mask for the tokenizer of --model {model}: "
                                          f"run `titok-align --target-model {model}` on these records first")
    raise RecordError(where, "titok", "no token mask (titok.target.mask or titok.source.mask): run titok-score | "
                                      "titok-filter [| titok-align] first, or pass --all-tokens for plain SFT")


def make_example(record, where, tokenizer, *, fingerprint, model, all_tokens, train_closing=True, chat_template=True,
                 max_length=768):
    """Tokenize a record with the shared `encode` and attach its per-token weights
    (train_closing: the token that closes the completion gets weight 1 whatever its mask).

    Returns (Example or None when no token is selected, encoded).
    """
    messages, completion = prompt_and_completion(record, where)
    try:
        enc = encode(tokenizer, messages, completion, chat_template, max_length)
    except FormatError as e:
        raise record_error(where, record, e)
    if all_tokens:
        weights = [1.0] * len(enc.positions)
    else:
        mask, token_ids, field = _mask_of(record, where, fingerprint, model)
        if not isinstance(mask, list) or not all(isinstance(m, (int, float)) and 0 <= m <= 1 for m in mask):
            raise RecordError(where, field, "must be a list of numbers in [0, 1]")
        if len(mask) != len(enc.positions):
            hint = " (the completion was truncated: use the --max-length of the earlier stages)" if enc.truncated else ""
            raise RecordError(where, field, f"has {len(mask)} entries but the completion has {len(enc.positions)} "
                                            f"tokens with this tokenizer and template{hint}")
        if token_ids is not None and not isinstance(token_ids, list):
            raise RecordError(where, field.replace(".mask", ".token_ids"), "must be a list of token ids")
        if token_ids is not None and token_ids != enc.token_ids:
            raise RecordError(where, field.replace(".mask", ".token_ids"),
                              "differ from this model's tokens of the completion (another chat template, "
                              "--no-chat-template or --max-length than the earlier stages?)")
        weights = [float(m) for m in mask]
        if train_closing and not enc.truncated:
            weights[-1] = 1.0
    # Position 0 has nothing before it to predict it from.
    kept = [(p, w) for p, w in zip(enc.positions, weights) if w > 0 and p > 0]
    if not kept:
        return None, enc
    return Example(where, enc.input_ids, [p for p, _ in kept], [w for _, w in kept]), enc


def prepare_examples(pairs, tokenizer, *, model, all_tokens=False, train_closing=True, chat_template=True,
                     max_length=768, skip_invalid=False, counts=None):
    """Examples of (where, record) pairs; records with no selected token are skipped and counted."""
    counts = {} if counts is None else counts
    fingerprint = tokenizer_fingerprint(tokenizer)
    examples = []

    def check(where, record):
        if not_kept(record):
            return None, None
        return make_example(record, where, tokenizer, fingerprint=fingerprint, model=model, all_tokens=all_tokens,
                            train_closing=train_closing, chat_template=chat_template, max_length=max_length)

    for where, record, (example, enc) in checked(pairs, check, skip_invalid, counts):
        if enc is None:
            counts["not_kept"] = counts.get("not_kept", 0) + 1
        elif example is None:
            counts["no_selected"] = counts.get("no_selected", 0) + 1
        else:
            examples.append(example)
            counts["truncated"] = counts.get("truncated", 0) + int(enc.truncated)
            counts["completion_tokens"] = counts.get("completion_tokens", 0) + len(enc.positions)
            counts["selected_tokens"] = counts.get("selected_tokens", 0) + len(example.positions)
    return examples


# ---------------------------------------------------------------------------------------------
# The loss


def collate(examples, pad_id):
    """Right-padded ids and the (row, position, weight) of every trained token."""
    ids, rows, cols = right_padded(examples, pad_id)
    weights = torch.tensor([w for e in examples for w in e.weights], dtype=torch.float32)
    return ids, rows, cols, weights


def token_losses(model, batch, device, autocast_dtype=None):
    """(CE per trained token in float32, its weight) for a collated micro-batch.

    Only the rows that predict a trained token are projected to the vocabulary.
    """
    body, head = decoder_and_head(model)
    ids, rows, cols, weights = (t.to(device) for t in batch)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = project_logits(model, head, predicting_hidden(body, ids, rows, cols))
    return F.cross_entropy(logits.float(), ids[rows, cols], reduction="none"), weights


def masked_loss(model, examples, pad_id, device=None, autocast_dtype=None):
    """sum(m * CE) / sum(m) over the examples (one batch): the loss of one optimizer step."""
    device = device or next(model.parameters()).device
    ce, weights = token_losses(model, collate(examples, pad_id), device, autocast_dtype)
    return (weights * ce).sum() / weights.sum()


# ---------------------------------------------------------------------------------------------
# Distribution (one process, or many under accelerate launch / torchrun)


class Processes:
    """Rank, world size and device of this process; sums across processes (no-ops alone)."""

    def __init__(self, device="auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device)
        if device == "cuda" and self.world > 1:
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
        self.device = torch.device(device)
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self):
        return self.rank == 0

    def sum_(self, tensor):
        if self.world > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def close(self):
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path, model, optimizer, scheduler, state, procs, scaler=None):
    """Everything a resumed run needs to take the same steps: weights, optimizer, schedule,
    fp16 loss scale, each process's RNG, and the step. Written beside, then swapped in, so a
    kill while saving leaves the previous checkpoint."""
    from safetensors.torch import save_file

    fresh = path + ".new"
    if procs.main:
        shutil.rmtree(fresh, ignore_errors=True)
        os.makedirs(fresh)
        save_file({k: v.detach().cpu().contiguous() for k, v in _trainable(model).items()},
                  os.path.join(fresh, "trainable.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(fresh, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(fresh, "scheduler.pt"))
        if scaler is not None:
            torch.save(scaler.state_dict(), os.path.join(fresh, "scaler.pt"))
    procs.barrier()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(fresh, f"rng-{procs.rank}.pt"))
    procs.barrier()
    if procs.main:
        with open(os.path.join(fresh, "state.json"), "w") as f:   # last: marks the checkpoint complete
            json.dump(state, f)
        shutil.rmtree(path, ignore_errors=True)
        os.rename(fresh, path)
    procs.barrier()


def find_checkpoint(path):
    for candidate in (path, path + ".new"):
        if os.path.isfile(os.path.join(candidate, "state.json")):
            return candidate
    return None


def load_checkpoint(path, model, optimizer, scheduler, procs, scaler=None):
    from safetensors.torch import load_file

    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    trainable = _trainable(model)
    with torch.no_grad():
        for name, value in load_file(os.path.join(path, "trainable.safetensors")).items():
            trainable[name].copy_(value)
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True, map_location=procs.device))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    if scaler is not None:
        scaler_file = os.path.join(path, "scaler.pt")
        if not os.path.isfile(scaler_file):
            raise TitokError(f"{path}: has no fp16 loss scale (made by an older titok-train): "
                                       "delete it or drop --resume")
        scaler.load_state_dict(torch.load(scaler_file, weights_only=True))
    rng_file = os.path.join(path, f"rng-{procs.rank}.pt")
    if not os.path.isfile(rng_file):
        raise TitokError(f"{path}: made with another number of processes; resume with the same one")
    rng = torch.load(rng_file, weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


# ---------------------------------------------------------------------------------------------
# The loop


def step_batches(n_examples, epoch, step, *, seed, batch_size, grad_accum, world, rank):
    """Indices of this process's micro-batches at (epoch, step of the epoch).

    The order is a permutation drawn from (seed, epoch) only, so a resumed run and every
    process see the same order. A step takes batch_size * grad_accum * world records;
    micro-batch c of the step belongs to process c % world.
    """
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()
    per_step = batch_size * grad_accum * world
    chunk = order[step * per_step:(step + 1) * per_step]
    micro = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [m for c, m in enumerate(micro) if c % world == rank]


def loss_scaler(device, autocast_dtype):
    """A GradScaler for float16 only: its 5-bit exponent flushes the small gradients of a
    step's many-token loss to zero unless the loss is scaled up for backward. bfloat16 has
    float32's exponent range and needs none."""
    return torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None


def check_same_layout(path, state, layout):
    """Refuse to resume a checkpoint whose steps were laid out otherwise (another number of
    processes takes other records per step: another data order and lr schedule)."""
    differ = {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}
    if differ:
        what = ", ".join(f"{k} {was} (now {now})" for k, (was, now) in differ.items())
        raise TitokError(f"{path} was made by a run with {what}: resume with the same number of "
                                   "processes, or delete it or drop --resume")


def train(model, examples, pad_id, *, epochs=2, batch_size=4, grad_accum=1, lr=5e-5, weight_decay=0.01,
          warmup_ratio=0.1, max_grad_norm=0.3, seed=0, neftune_alpha=None, autocast_dtype=None, procs=None,
          checkpoint=None, save_every=None, resume=False, run_key=None, on_step=None, progress=True):
    """Train the trainable (LoRA) parameters of `model` in place; return the run's history
    {"loss": [per step], "tokens": trained tokens, "steps": n}.

    checkpoint: a directory for `save_every`-step checkpoints; with resume, a checkpoint there
    (made with the same `run_key`) is continued. on_step(step, loss) is called after each step.
    """
    from transformers import get_linear_schedule_with_warmup
    from transformers.integrations.neftune import neftune_post_forward_hook

    procs = procs or Processes(next(model.parameters()).device.type)
    device = procs.device
    params = list(_trainable(model).values())
    if not params:
        raise TitokError("the model has no trainable parameters")
    per_step = batch_size * grad_accum * procs.world
    steps_per_epoch = math.ceil(len(examples) / per_step)
    total = steps_per_epoch * epochs
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total), total)
    scaler = loss_scaler(device, autocast_dtype)
    history = {"loss": [], "tokens": 0, "steps": total}
    layout = {"processes": procs.world, "steps_per_epoch": steps_per_epoch, "total_steps": total}
    start = 0
    if resume and checkpoint and find_checkpoint(checkpoint):
        found = find_checkpoint(checkpoint)
        with open(os.path.join(found, "state.json")) as f:
            saved = json.load(f)
        if saved.get("run_key") != run_key:
            raise TitokError(f"{found} was made by a run with other arguments or input; "
                                       "delete it or drop --resume")
        check_same_layout(found, saved, layout)
        state = load_checkpoint(found, model, optimizer, scheduler, procs, scaler)
        start, history = state["step"], state["history"]
        log.info("resuming from %s at step %d of %d", found, start, total)

    hook = None
    if neftune_alpha:
        embeddings = model.get_input_embeddings()
        embeddings.neftune_noise_alpha = neftune_alpha
        hook = embeddings.register_forward_hook(neftune_post_forward_hook)
    model.train()
    bar = tqdm(total=total, initial=start, desc="titok-train", unit="step", disable=not (progress and procs.main),
               mininterval=1)
    started, tokens_seen = time.time(), 0
    try:
        for step in range(start, total):
            epoch, in_epoch = divmod(step, steps_per_epoch)
            micro = [[examples[i] for i in idx] for idx in
                     step_batches(len(examples), epoch, in_epoch, seed=seed, batch_size=batch_size,
                                  grad_accum=grad_accum, world=procs.world, rank=procs.rank)]
            # The step's normalizer is known before any forward pass: the sum of the weights of
            # every selected token of the step, over all micro-batches and processes.
            totals = torch.tensor([sum(sum(e.weights) for m in micro for e in m),
                                   sum(len(e.positions) for m in micro for e in m)], dtype=torch.float64, device=device)
            norm, n_tokens = procs.sum_(totals).tolist()
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            for batch in micro:
                ce, weights = token_losses(model, collate(batch, pad_id), device, autocast_dtype)
                weighted = (weights * ce).sum()
                step_share = weighted / norm
                (scaler.scale(step_share) if scaler else step_share).backward()
                loss_sum += weighted.detach()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if procs.world > 1:
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                procs.sum_(flat)
                offset = 0
                for p in params:
                    p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
            loss = procs.sum_(loss_sum).item() / norm
            if not math.isfinite(loss):
                raise TitokError(f"the loss is {loss} at step {step + 1} (epoch {epoch + 1}): lower --lr, "
                                           "try --dtype float32, or check the records")
            if scaler:
                scaler.unscale_(optimizer)   # clip the true gradients; an inf/nan one makes scaler.step skip the step
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            history["loss"].append(loss)
            history["tokens"] += int(n_tokens)
            tokens_seen += n_tokens
            bar.update(1)
            bar.set_postfix_str(f"epoch {epoch + 1} loss {loss:.4f} {tokens_seen / max(time.time() - started, 1e-9):.0f} tok/s",
                                refresh=False)
            if checkpoint and save_every and (step + 1) % save_every == 0 and step + 1 < total:
                save_checkpoint(checkpoint, model, optimizer, scheduler,
                                {"step": step + 1, "history": history, "run_key": run_key, **layout}, procs, scaler)
            if on_step is not None:
                on_step(step + 1, loss)
    finally:
        bar.close()
        if hook is not None:
            hook.remove()
    model.eval()
    return history


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def add_lora(model, model_name, *, r, alpha, dropout, target_modules, seed):
    """A fresh LoRA (B = 0: the model starts as the base), the same on every process."""
    from peft import LoraConfig, get_peft_model

    modules = "all-linear" if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",") if m.strip()]
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, bias="none",
                        task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise TitokError(f"--target-modules {target_modules}: {str(e).splitlines()[0]}")
    # Where PEFT (AutoPeftModelForCausalLM) will load the base from, and what titok-score checks
    # --model against: not a relative path or a .gguf file.
    peft_model.peft_config["default"].base_model_name_or_path = base_model_name(model_name)
    return peft_model


@click.command()
@cli.input_argument
@cli.model_options
@cli.tokenizer_options
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Adapter directory to create (written to a temp dir, then renamed into place).")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@click.option("--all-tokens", is_flag=True,
              help="Ignore token masks and train on every completion token (plain SFT: the source expert, the all-token baseline).")
@click.option("--train-closing/--no-train-closing", default=True, show_default=True,
              help="Train each completion's closing token (EOS / end-of-turn) whatever its mask, on top of the "
                   "selected tokens: with short answers top-k often drops it, and a target that never has it "
                   "selected never learns to stop (docs/design.md, Target loss).")
@click.option("--lora-r", default=8, show_default=True, type=click.IntRange(min=1), help="LoRA rank.")
@click.option("--lora-alpha", default=8.0, show_default=True, type=cli.Finite(min=0, min_open=True), help="LoRA scale numerator: updates are scaled by alpha / r.")
@click.option("--lora-dropout", default=0.05, show_default=True, type=cli.Finite(0, 1, max_open=True),
              help="Dropout on the LoRA input while training.")
@click.option("--target-modules", default="q_proj,v_proj", show_default=True,
              help="Comma-separated module names to adapt, or all-linear.")
@click.option("--lr", "--learning-rate", "lr", default=5e-5, show_default=True, type=cli.Finite(min=0, min_open=True),
              help="Peak AdamW learning rate (linear warmup, then linear decay to 0).")
@click.option("--weight-decay", default=0.01, show_default=True, type=cli.Finite(min=0), help="AdamW weight decay.")
@click.option("--warmup-ratio", default=0.1, show_default=True, type=cli.Finite(0, 1),
              help="Share of the steps with a linearly rising lr; then it falls linearly to 0.")
@click.option("--max-grad-norm", default=0.3, show_default=True, type=cli.Finite(min=0, min_open=True),
              help="Clip the gradient norm of each step to this.")
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(min=1), help="Passes over the records.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1), help="Records per micro-batch and process.")
@click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(min=1), help="Micro-batches per optimizer step.")
@click.option("--neftune-alpha", type=cli.Finite(min=0, min_open=True),
              help="NEFTune embedding noise (off unless given; the official target training used 5 or 7).")
@click.option("--save-every", type=click.IntRange(min=1), help="Checkpoint every N steps into OUTPUT.checkpoint/.")
@click.option("--resume", is_flag=True, help="Continue from OUTPUT.checkpoint/ (same input and arguments) to the same result.")
@cli.seed_option
@cli.skip_invalid_option
@cli.command
def main(input, model, dtype, device, trust_remote_code, chat_template, no_chat_template, max_length, output,
         overwrite, all_tokens, train_closing, lora_r, lora_alpha, lora_dropout, target_modules, lr, weight_decay, warmup_ratio,
         max_grad_norm, epochs, batch_size, grad_accum, neftune_alpha, save_every, resume, seed, skip_invalid):
    """Train a LoRA on --model from records, on their selected tokens only.

    The mask is titok.target.mask when titok-align made it for --model's tokenizer, else
    titok.source.mask when --model tokenizes like the source. The loss is the mean CE over all
    selected tokens of a step (sum(m*CE)/sum(m)); records with no selected token are skipped.
    Writes a PEFT adapter dir (adapter_config.json, adapter_model.safetensors) and
    titok_train.json (arguments, input sha256, tokens trained, loss per step).

    \b
    Examples:
      titok-train --model google/gemma-3-270m --output adapters/target aligned.jsonl
      titok-train --all-tokens --model HuggingFaceTB/SmolLM2-135M-Instruct --output adapters/expert task.jsonl
      accelerate launch -m titok_tools.train --model BASE --output adapters/target aligned.jsonl
    """
    arguments = {k: v for k, v in locals().items()}
    output = output.rstrip("/")
    if os.path.exists(output) and not overwrite:
        raise TitokError(f"--output {output} exists: pass --overwrite to replace it")
    check_writable(output, is_dir=True)  # now, not after the training
    procs = Processes(device)
    if procs.world > 1 and input == "-":
        raise click.UsageError("several processes need an INPUT file, not stdin")
    try:
        tokenizer = load_tokenizer(model, chat_template, trust_remote_code)
        counts = {}
        with spooled(input) as path:
            sha = file_sha256(path)
            pairs = read_records(path, skip_invalid, counts, name="<stdin>" if input == "-" else input)
            examples = prepare_examples(pairs, tokenizer, model=model, all_tokens=all_tokens, train_closing=train_closing,
                                        chat_template=not no_chat_template, max_length=max_length,
                                        skip_invalid=skip_invalid, counts=counts)
        skipped = ", ".join(f"{counts[k]} {label}" for k, label in
                            (("no_selected", "with no selected token"), ("not_kept", "dropped by titok-filter"),
                             ("invalid", "invalid")) if counts.get(k))
        if not examples:
            raise TitokError(f"{input}: no records to train on" + (f" (skipped: {skipped})" if skipped else ""))
        log.info("%d records, %d of %d completion tokens selected%s", len(examples), counts["selected_tokens"],
                 counts["completion_tokens"], f"; skipped {skipped}" if skipped else "")
        if counts.get("truncated"):
            log.warning("%d completions truncated to --max-length %d tokens", counts["truncated"], max_length)

        # Loaded on the CPU, then moved: with several GPUs each process fills only its own.
        weights_dtype = resolve_dtype(dtype, procs.device.type)
        lm = load_model(model, None, {v: k for k, v in DTYPES.items()}[weights_dtype], "cpu", trust_remote_code)
        lm.to(procs.device)
        lm = add_lora(lm, model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=target_modules, seed=seed)
        torch.manual_seed(seed + procs.rank)    # dropout / NEFTune noise: own stream per process
        # Weights in bf16/fp16 (the LoRA itself stays float32): matmuls run in that dtype.
        autocast_dtype = weights_dtype if weights_dtype != torch.float32 else None
        run_key = hashlib.sha256(json.dumps([sha, {k: v for k, v in arguments.items()
                                                   if k not in ("resume", "save_every", "overwrite", "output")}],
                                            sort_keys=True, default=str).encode()).hexdigest()
        started = time.time()
        history = train(lm, examples, tokenizer.pad_token_id, epochs=epochs, batch_size=batch_size,
                        grad_accum=grad_accum, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                        max_grad_norm=max_grad_norm, seed=seed, neftune_alpha=neftune_alpha,
                        autocast_dtype=autocast_dtype, procs=procs, checkpoint=output + CHECKPOINT_SUFFIX,
                        save_every=save_every, resume=resume, run_key=run_key)
        elapsed = time.time() - started
        if procs.main:
            info = {"arguments": arguments, "input_sha256": sha, "tokenizer": tokenizer_fingerprint(tokenizer),
                    "records": len(examples), "skipped": {k: counts.get(k, 0) for k in ("no_selected", "not_kept", "invalid")},
                    "completion_tokens": counts["completion_tokens"], "selected_tokens_per_epoch": counts["selected_tokens"],
                    "tokens_trained": history["tokens"], "steps": history["steps"], "processes": procs.world,
                    "loss": history["loss"]}  # no timing: same inputs and --seed, same bytes (it is in the log)
            write_adapter(lm, output, info, overwrite)
            shutil.rmtree(output + CHECKPOINT_SUFFIX, ignore_errors=True)
            log.info("trained %d steps on %d tokens in %.0f s (%.0f tokens/s); final loss %.4f; adapter in %s",
                     history["steps"], history["tokens"], elapsed, history["tokens"] / max(elapsed, 1e-9),
                     history["loss"][-1] if history["loss"] else float("nan"), output)
        procs.barrier()
    finally:
        procs.close()


def write_adapter(model, output, info, overwrite=False):
    """The PEFT adapter dir and titok_train.json, built in a temp dir and renamed into place."""
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
    try:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "titok_train.json"), "w") as f:
            json.dump(info, f, indent=1, default=str)
        if not os.path.exists(output):
            os.rename(tmp, output)
        elif not overwrite:
            raise TitokError(f"--output {output} exists: pass --overwrite to replace it")
        else:  # the old adapter goes only once the new one is in its place
            aside = tmp + ".old"
            os.rename(output, aside)
            try:
                os.rename(tmp, output)
            except OSError:
                os.rename(aside, output)
                raise
            if os.path.islink(aside):  # --output was a link: the name now holds the adapter, its target stays
                os.unlink(aside)
            else:
                shutil.rmtree(aside)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
