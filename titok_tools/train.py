"""titok-train: a fresh LoRA on the target base, trained only on the selected tokens.

    loss = sum_i m_i * CE_i / sum_i m_i      (docs/design.md, Target loss)

over every selected token of an optimizer step: token-weighted across the micro-batches of
gradient accumulation and across processes, so a step's loss does not depend on how its records
are split (batch 8 = batch 4 x 2 accumulation = batch 4 on 2 processes). Hidden states come
from the model's body and are projected to the vocabulary only at the selected positions:
with Gemma's 262k-entry vocabulary, full logits are a large share of a step. With float16
weights the loss is scaled up for backward (a GradScaler): the per-token gradients of a mean
over many tokens would otherwise underflow.

With --kd-weight W (or --kd-only) the step's loss adds W * sum_D m_i * KL_i / sum_D m_i over the
trained tokens D that have a stored teacher distribution (titok.*.topk_ids / topk_logp), from the
same projected logits (docs/design.md, Target loss, Logit distillation).

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
from .records import RecordError, check_numbers, check_writable, checked, not_kept, prompt_and_completion, read_records, spooled, titok_part

log = logging.getLogger("titok.train")

CHECKPOINT_SUFFIX = ".checkpoint"


@dataclass
class Example:
    where: str
    input_ids: list   # prompt + completion tokens, as formatting.encode made them
    positions: list   # indices into input_ids of the trained tokens (each predicted from the one before)
    weights: list     # m_i > 0 for each trained token
    # The teacher's distributions (--kd-weight / --kd-only): only the trained tokens that have one.
    teacher_at: list = None       # indices into positions
    teacher_ids: object = None    # (len(teacher_at), N) int64 tensor of vocabulary ids, 0-padded
    teacher_logp: object = None   # (len(teacher_at), N) float32 tensor of their log-probs, -inf-padded
    teacher_field: str = None     # e.g. "titok.target.topk_ids", for errors found once the model is loaded

    @property
    def teacher_weight(self):
        """The sum of the weights of the tokens distilled: this record's share of the KD normalizer."""
        return sum(self.weights[k] for k in self.teacher_at or ())


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


def _check_token_ids(where, field, token_ids, enc):
    if token_ids is not None and not isinstance(token_ids, list):
        raise RecordError(where, field, "must be a list of token ids")
    if token_ids is not None and token_ids != enc.token_ids:
        raise RecordError(where, field, "differ from this model's tokens of the completion (another chat template, "
                                        "--no-chat-template or --max-length than the earlier stages?)")


def _distribution_part(record, fingerprint):
    """(part, "titok.target" or "titok.source") whose tokens are this tokenizer's, the target first:
    the rule that picks the mask. (None, None) when neither is."""
    for name in ("target", "source"):
        part = titok_part(record, name) or {}
        if part.get("tokenizer") == fingerprint:
            return part, f"titok.{name}"
    return None, None


def _distribution_rows(part, name, where, n_tokens):
    """{completion token index: (ids, logp)} of a part's topk_ids / topk_logp (null entries: no
    distribution at that token), checked; {} when the part has none."""
    ids, logp = part.get("topk_ids"), part.get("topk_logp")
    if ids is None and logp is None:
        return {}
    for field, value in (("topk_ids", ids), ("topk_logp", logp)):
        if not isinstance(value, list):
            raise RecordError(where, f"{name}.{field}", "must be a list with one entry per completion token "
                                                       "(topk_ids and topk_logp come together from titok-score --topk)")
        if len(value) != n_tokens:
            raise RecordError(where, f"{name}.{field}", f"has {len(value)} entries but the completion has "
                                                       f"{n_tokens} tokens with this tokenizer and template")
    rows = {}
    for i, (token_ids, token_logp) in enumerate(zip(ids, logp)):
        if token_ids is None and token_logp is None:
            continue
        if not (isinstance(token_ids, list) and token_ids and all(type(t) is int and t >= 0 for t in token_ids)
                and len(set(token_ids)) == len(token_ids)):
            raise RecordError(where, f"{name}.topk_ids[{i}]", "must be null or a non-empty list of distinct token ids")
        if not isinstance(token_logp, list) or len(token_logp) != len(token_ids):
            raise RecordError(where, f"{name}.topk_logp[{i}]", f"must be a list of {len(token_ids)} log-probs, "
                                                              f"one per id of topk_ids[{i}]")
        check_numbers(token_logp, where, f"{name}.topk_logp[{i}]")
        rows[i] = (token_ids, token_logp)
    return rows


def _attach_teacher(example, rows, indices, field):
    """Set the example's teacher tensors from rows ({completion index: (ids, logp)}); indices: the
    completion index of each trained position."""
    at = [k for k, i in enumerate(indices) if i in rows]
    if not at:
        return
    width = max(len(rows[indices[k]][0]) for k in at)
    ids = [rows[indices[k]][0] + [0] * (width - len(rows[indices[k]][0])) for k in at]
    logp = [rows[indices[k]][1] + [-math.inf] * (width - len(rows[indices[k]][1])) for k in at]
    example.teacher_at, example.teacher_field = at, field
    example.teacher_ids = torch.tensor(ids, dtype=torch.long)
    example.teacher_logp = torch.tensor(logp, dtype=torch.float32)


def make_example(record, where, tokenizer, *, fingerprint, model, all_tokens, train_closing=True, chat_template=True,
                 max_length=768, distill=False):
    """Tokenize a record with the shared `encode` and attach its per-token weights
    (train_closing: the token that closes the completion gets weight 1 whatever its mask), and
    with distill, the teacher's distributions at the trained tokens that have one.

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
        _check_token_ids(where, field.replace(".mask", ".token_ids"), token_ids, enc)
        weights = [float(m) for m in mask]
        if train_closing and not enc.truncated:
            weights[-1] = 1.0
    # Position 0 has nothing before it to predict it from.
    kept = [(i, p, w) for i, (p, w) in enumerate(zip(enc.positions, weights)) if w > 0 and p > 0]
    if not kept:
        return None, enc
    example = Example(where, enc.input_ids, [p for _, p, _ in kept], [w for _, _, w in kept])
    if distill:
        part, name = _distribution_part(record, fingerprint)
        if part is not None:
            if all_tokens:   # the mask path checked them already
                _check_token_ids(where, f"{name}.token_ids", part.get("token_ids"), enc)
            rows = _distribution_rows(part, name, where, len(enc.positions))
            _attach_teacher(example, rows, [i for i, _, _ in kept], f"{name}.topk_ids")
    return example, enc


def prepare_examples(pairs, tokenizer, *, model, all_tokens=False, train_closing=True, chat_template=True,
                     max_length=768, skip_invalid=False, counts=None, distill=False):
    """Examples of (where, record) pairs; records with no selected token are skipped and counted
    (with distill, so are the records with no teacher distribution at their trained tokens: they
    train on the NLL alone)."""
    counts = {} if counts is None else counts
    fingerprint = tokenizer_fingerprint(tokenizer)
    examples = []

    def check(where, record):
        if not_kept(record):
            return None, None
        return make_example(record, where, tokenizer, fingerprint=fingerprint, model=model, all_tokens=all_tokens,
                            train_closing=train_closing, chat_template=chat_template, max_length=max_length,
                            distill=distill)

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
            if distill:
                counts["distilled_tokens"] = counts.get("distilled_tokens", 0) + len(example.teacher_at or ())
                counts["no_distribution"] = counts.get("no_distribution", 0) + int(not example.teacher_at)
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


def masked_loss(model, examples, pad_id, device=None, autocast_dtype=None, distill=None):
    """sum(m * CE) / sum(m) over the examples (one batch): the loss of one optimizer step; with
    distill (a Distill), that loss as the step's: the NLL (unless distill.only) + W * KL_sum / n_kd."""
    device = device or next(model.parameters()).device
    if distill is None:
        ce, weights = token_losses(model, collate(examples, pad_id), device, autocast_dtype)
        return (weights * ce).sum() / weights.sum()
    norms = (sum(sum(e.weights) for e in examples), sum(e.teacher_weight for e in examples))
    share, _ = distill_share(model, examples, pad_id, device, autocast_dtype, distill, norms)
    return share


# ---------------------------------------------------------------------------------------------
# Logit distillation (--kd-weight, --kd-only): docs/design.md, Target loss


@dataclass
class Distill:
    weight: float         # W: the KL term's weight (1 under --kd-only when not given)
    temperature: float    # T
    only: bool = False    # no NLL term


@dataclass
class TeacherBatch:
    at: torch.Tensor      # (n_kd,) rows of the micro-batch's trained tokens that have a distribution
    ids: torch.Tensor     # (n_kd, N) listed vocabulary ids, 0-padded
    logp: torch.Tensor    # (n_kd, N) their log-probs, -inf-padded


def collate_teacher(examples):
    """The teacher's distributions of a micro-batch, indexed like collate's trained tokens."""
    at, ids, logp, offset = [], [], [], 0
    for e in examples:
        if e.teacher_at:
            at.append(torch.tensor(e.teacher_at, dtype=torch.long) + offset)
            ids.append(e.teacher_ids)
            logp.append(e.teacher_logp)
        offset += len(e.positions)
    if not at:
        return TeacherBatch(torch.zeros(0, dtype=torch.long), torch.zeros((0, 1), dtype=torch.long),
                            torch.zeros((0, 1), dtype=torch.float32))
    width = max(t.shape[1] for t in ids)
    return TeacherBatch(torch.cat(at), torch.cat([F.pad(t, (0, width - t.shape[1]), value=0) for t in ids]),
                        torch.cat([F.pad(t, (0, width - t.shape[1]), value=-math.inf) for t in logp]))


def distillation_kl(student_logp, teacher_logp, temperature):
    """T^2 * KL(q || p) per row, q = softmax(teacher_logp / T) renormalized over the listed ids
    (padding: -inf, so q = 0 there), student_logp = log p at those ids, p the student's softmax
    over the FULL vocabulary at T. T^2 keeps the gradient's size independent of T (Hinton et al.
    2015)."""
    listed = torch.isfinite(teacher_logp)
    log_q = torch.log_softmax(teacher_logp / temperature, dim=-1).masked_fill(~listed, 0.0)
    q = log_q.exp() * listed
    return temperature ** 2 * (q * (log_q - student_logp)).sum(-1)


def student_logprobs(logits, targets, teacher, temperature, with_ce=True):
    """(CE per row or None, the student's log-probs at T at the teacher's ids (n_kd, N)) from a
    micro-batch's logits: float32, full vocabulary. At T = 1 one log-softmax over the rows serves
    both terms, with or without the CE: a second one over (rows, vocab) costs a fifth of a SmolLM2
    step, and the copies z[at] / T of a 262k vocabulary made Gemma's --kd-only step 1.48x."""
    z = logits.float()
    if temperature == 1.0:
        logp = torch.log_softmax(z, dim=-1)
        ce = -logp.gather(-1, targets[:, None]).squeeze(-1) if with_ce else None
        return ce, logp[teacher.at[:, None], teacher.ids]
    ce = F.cross_entropy(z, targets, reduction="none") if with_ce else None
    return ce, torch.log_softmax(z[teacher.at] / temperature, dim=-1).gather(-1, teacher.ids)


def distill_losses(model, examples, pad_id, device, autocast_dtype, distill):
    """(weight * CE per trained token or None under distill.only, weight * KL per distilled token) of
    a micro-batch: one projection to the vocabulary, at the trained tokens only, serves both."""
    body, head = decoder_and_head(model)
    ids, rows, cols, weights = (t.to(device) for t in collate(examples, pad_id))
    teacher = collate_teacher(examples)
    teacher = TeacherBatch(*(t.to(device) for t in (teacher.at, teacher.ids, teacher.logp)))
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = project_logits(model, head, predicting_hidden(body, ids, rows, cols))
    ce, student = student_logprobs(logits, ids[rows, cols], teacher, distill.temperature, not distill.only)
    kl = distillation_kl(student, teacher.logp, distill.temperature)
    return (None if ce is None else weights * ce), weights[teacher.at] * kl


def distill_share(model, examples, pad_id, device, autocast_dtype, distill, norms):
    """(this micro-batch's share of the step's loss, its (weighted NLL sum, weighted KL sum)), for
    the step's normalizers norms = (sum of the trained tokens' weights, n_kd). A step with no
    distribution (n_kd = 0) has no KL term."""
    norm, kd_norm = norms
    ce, kl = distill_losses(model, examples, pad_id, device, autocast_dtype, distill)
    nll_sum, kl_sum = (kl.new_zeros(()) if ce is None else ce.sum()), kl.sum()
    share = kl_sum * (distill.weight / kd_norm) if kd_norm > 0 else kl_sum * 0.0
    if not distill.only:
        share = share + nll_sum / norm
    return share, torch.stack([nll_sum.detach(), kl_sum.detach()])


def step_loss(distill, sums, norms):
    """(the step's loss, its mean KL) from the step's summed (NLL, KL) and normalizers."""
    (nll_sum, kl_sum), (norm, kd_norm) = sums, norms
    kl = kl_sum / kd_norm if kd_norm > 0 else 0.0
    return (0.0 if distill.only else nll_sum / norm) + distill.weight * kl, kl


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
          checkpoint=None, save_every=None, resume=False, run_key=None, on_step=None, progress=True, distill=None):
    """Train the trainable (LoRA) parameters of `model` in place; return the run's history
    {"loss": [per step], "tokens": trained tokens, "steps": n}, and with distill (a Distill: the
    KL term over the teacher's distributions) "kl": [the step's mean KL, per step].

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
    if distill is not None:
        history["kl"] = []
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
            # The step's normalizers are known before any forward pass: the sum of the weights of
            # every selected token of the step (and of those with a teacher distribution), over
            # all micro-batches and processes.
            totals = torch.tensor([sum(sum(e.weights) for m in micro for e in m),
                                   sum(len(e.positions) for m in micro for e in m),
                                   sum(e.teacher_weight for m in micro for e in m)], dtype=torch.float64, device=device)
            norm, n_tokens, kd_norm = procs.sum_(totals).tolist()
            loss_sum = torch.zeros(() if distill is None else 2, dtype=torch.float32, device=device)
            for batch in micro:
                if distill is None:
                    ce, weights = token_losses(model, collate(batch, pad_id), device, autocast_dtype)
                    weighted = (weights * ce).sum()
                    step_share = weighted / norm
                else:
                    step_share, weighted = distill_share(model, batch, pad_id, device, autocast_dtype, distill,
                                                         (norm, kd_norm))
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
            if distill is None:
                loss = procs.sum_(loss_sum).item() / norm
            else:
                loss, kl = step_loss(distill, procs.sum_(loss_sum).tolist(), (norm, kd_norm))
                history["kl"].append(kl)
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
@click.option("--kd-weight", default=0.0, show_default=True, type=cli.Finite(min=0),
              help="Logit distillation: add W * KL(teacher || student) to the NLL. The teacher's top-N "
                   "distributions are read from the records (titok.target.topk_* from titok-align, else "
                   "titok.source.topk_* for the same tokenizer; made by titok-score --topk N); the KL is over "
                   "the N listed ids, the teacher renormalized over them, the student's softmax over its full "
                   "vocabulary, at the tokens the NLL trains that have a distribution, weighted like them and "
                   "averaged over the step's such tokens. 0: off.")
@click.option("--kd-temperature", default=1.0, show_default=True, type=cli.Finite(min=0, min_open=True),
              help="Softmax temperature T of both distributions in the KL term, which is scaled by T^2 so its "
                   "gradient keeps its size.")
@click.option("--kd-only", is_flag=True,
              help="Train on the KL term alone (no NLL; times --kd-weight when given), at the tokens the mask "
                   "picks: the paper's KD+MinED baseline is --all-tokens --kd-only. Needs records with "
                   "distributions (titok-score --topk N [| titok-align]).")
@click.option("--save-every", type=click.IntRange(min=1), help="Checkpoint every N steps into OUTPUT.checkpoint/.")
@click.option("--resume", is_flag=True, help="Continue from OUTPUT.checkpoint/ (same input and arguments) to the same result.")
@cli.seed_option
@cli.skip_invalid_option
@cli.command
def main(input, model, dtype, device, trust_remote_code, chat_template, no_chat_template, max_length, output,
         overwrite, all_tokens, train_closing, lora_r, lora_alpha, lora_dropout, target_modules, lr, weight_decay, warmup_ratio,
         max_grad_norm, epochs, batch_size, grad_accum, neftune_alpha, kd_weight, kd_temperature, kd_only, save_every,
         resume, seed, skip_invalid):
    """Train a LoRA on --model from records, on their selected tokens only.

    The mask is titok.target.mask when titok-align made it for --model's tokenizer, else
    titok.source.mask when --model tokenizes like the source. The loss is the mean CE over all
    selected tokens of a step (sum(m*CE)/sum(m)); records with no selected token are skipped.
    With --kd-weight W (or --kd-only) it adds W * the mean KL from the teacher's stored top-N
    distributions over the same tokens (docs/design.md, Target loss).
    Writes a PEFT adapter dir (adapter_config.json, adapter_model.safetensors) and
    titok_train.json (arguments, input sha256, tokens trained, loss per step).

    \b
    Examples:
      titok-train --model google/gemma-3-270m --output adapters/target aligned.jsonl
      titok-train --all-tokens --model HuggingFaceTB/SmolLM2-135M-Instruct --output adapters/expert task.jsonl
      accelerate launch -m titok_tools.train --model BASE --output adapters/target aligned.jsonl
      titok-train --all-tokens --kd-only --model BASE --output adapters/kd aligned-with-topk.jsonl
    """
    arguments = {k: v for k, v in locals().items()}
    distill = distill_of(kd_weight, kd_temperature, kd_only)
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
                                        skip_invalid=skip_invalid, counts=counts, distill=distill is not None)
        skipped = ", ".join(f"{counts[k]} {label}" for k, label in
                            (("no_selected", "with no selected token"), ("not_kept", "dropped by titok-filter"),
                             ("invalid", "invalid")) if counts.get(k))
        if not examples:
            raise TitokError(f"{input}: no records to train on" + (f" (skipped: {skipped})" if skipped else ""))
        if distill is not None:
            report_distributions(input, examples, counts, kd_only)
        log.info("%d records, %d of %d completion tokens selected%s", len(examples), counts["selected_tokens"],
                 counts["completion_tokens"], f"; skipped {skipped}" if skipped else "")
        if counts.get("truncated"):
            log.warning("%d completions truncated to --max-length %d tokens", counts["truncated"], max_length)

        # Loaded on the CPU, then moved: with several GPUs each process fills only its own.
        weights_dtype = resolve_dtype(dtype, procs.device.type)
        lm = load_model(model, None, {v: k for k, v in DTYPES.items()}[weights_dtype], "cpu", trust_remote_code)
        lm.to(procs.device)
        if distill is not None:
            check_teacher_ids(examples, lm.get_output_embeddings().weight.shape[0])
        lm = add_lora(lm, model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=target_modules, seed=seed)
        torch.manual_seed(seed + procs.rank)    # dropout / NEFTune noise: own stream per process
        # Weights in bf16/fp16 (the LoRA itself stays float32): matmuls run in that dtype.
        autocast_dtype = weights_dtype if weights_dtype != torch.float32 else None
        # Without KD its options stay out of the key: checkpoints of earlier versions still resume.
        keyless = ("resume", "save_every", "overwrite", "output") + (KD_OPTIONS if distill is None else ())
        run_key = hashlib.sha256(json.dumps([sha, {k: v for k, v in arguments.items() if k not in keyless}],
                                            sort_keys=True, default=str).encode()).hexdigest()
        started = time.time()
        history = train(lm, examples, tokenizer.pad_token_id, epochs=epochs, batch_size=batch_size,
                        grad_accum=grad_accum, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                        max_grad_norm=max_grad_norm, seed=seed, neftune_alpha=neftune_alpha,
                        autocast_dtype=autocast_dtype, procs=procs, checkpoint=output + CHECKPOINT_SUFFIX,
                        save_every=save_every, resume=resume, run_key=run_key, distill=distill)
        elapsed = time.time() - started
        if procs.main:
            info = {"arguments": arguments, "input_sha256": sha, "tokenizer": tokenizer_fingerprint(tokenizer),
                    "records": len(examples), "skipped": {k: counts.get(k, 0) for k in ("no_selected", "not_kept", "invalid")},
                    "completion_tokens": counts["completion_tokens"], "selected_tokens_per_epoch": counts["selected_tokens"],
                    "tokens_trained": history["tokens"], "steps": history["steps"], "processes": procs.world,
                    "loss": history["loss"]}  # no timing: same inputs and --seed, same bytes (it is in the log)
            if distill is not None:
                info["kd"] = {"distilled_tokens_per_epoch": counts.get("distilled_tokens", 0),
                              "records_without_distributions": counts.get("no_distribution", 0), "kl": history["kl"]}
            write_adapter(lm, output, info, overwrite)
            shutil.rmtree(output + CHECKPOINT_SUFFIX, ignore_errors=True)
            log.info("trained %d steps on %d tokens in %.0f s (%.0f tokens/s); final loss %.4f; adapter in %s",
                     history["steps"], history["tokens"], elapsed, history["tokens"] / max(elapsed, 1e-9),
                     history["loss"][-1] if history["loss"] else float("nan"), output)
        procs.barrier()
    finally:
        procs.close()


KD_OPTIONS = ("kd_weight", "kd_temperature", "kd_only")


def distill_of(kd_weight, kd_temperature, kd_only):
    """The Distill of the KD options, or None when they leave it off."""
    if kd_weight == 0 and not kd_only:
        if kd_temperature != 1.0:
            log.warning("--kd-temperature has no effect without --kd-weight or --kd-only")
        return None
    return Distill(weight=kd_weight or 1.0, temperature=kd_temperature, only=kd_only)


def report_distributions(input, examples, counts, kd_only):
    """Refuse a KD run with no distribution at any trained token; log how many records have none."""
    option = "--kd-only" if kd_only else "--kd-weight"
    if not counts.get("distilled_tokens"):
        raise TitokError(f"{input}: {option}: no trained token has a teacher distribution (titok.target.topk_ids for "
                         "--model's tokenizer, else titok.source.topk_ids): run titok-score --topk N [| titok-align] "
                         "first")
    log.info("logit distillation at %d of %d trained tokens; %d of %d records have no distribution there%s",
             counts["distilled_tokens"], counts["selected_tokens"], counts.get("no_distribution", 0), len(examples),
             " (they add nothing under --kd-only)" if kd_only else " (NLL only)")


def check_teacher_ids(examples, vocab_size):
    """A teacher id outside the student's vocabulary (another tokenizer's ids) is one line naming its record."""
    for e in examples:
        if e.teacher_at and int(e.teacher_ids.max()) >= vocab_size:
            raise RecordError(e.where, e.teacher_field, f"id {int(e.teacher_ids.max())} is outside --model's "
                                                        f"vocabulary of {vocab_size}")


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
