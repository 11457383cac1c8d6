"""The demo's toy language: character strings and two operators on them.

An example is one line of characters::

    ^hello>hello.      copy     (operator ">", the base model's pretraining task)
    ^hello<olleh.      reverse  (operator "<", the new task taught with LoRA)

``^`` starts an example, the operator follows the source string, ``.`` ends the answer.
The vocabulary is defined here (no tokenizer to download): one token per character.
The source strings are 4 to 10 lowercase letters drawn uniformly, so a model can only do
well on held-out strings by having learned the operator, not by remembering strings.

This module also holds what the base builder and the demo share: batches, the loss (on the
answer tokens only), greedy generation, exact-match accuracy and the training loop.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PAD, BOS, EOS = "_", "^", "."
LETTERS = "abcdefghijklmnopqrstuvwxyz"
OPERATORS = {">": "copy", "<": "reverse"}
VOCAB = [PAD, BOS, EOS, *OPERATORS, *LETTERS]
TOKEN_ID = {ch: i for i, ch in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID = TOKEN_ID[PAD], TOKEN_ID[BOS], TOKEN_ID[EOS]

MIN_LEN, MAX_LEN = 4, 10
MAX_EXAMPLE_LEN = 2 * MAX_LEN + 3  # ^ source op answer .
EVAL_SEED = 1234  # the held-out set is the same whatever --seed is, so runs are comparable
EVAL_SIZE = 256


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run torch's CPU ops on ``n`` threads inside the block, then restore the previous count.

    The demo's matmuls (a few thousand rows by 128-256) are too small to gain from more than
    one thread, and on busy cores extra threads spin-wait on each other and run many times
    slower. A fixed count also keeps float reductions, hence trained weights, reproducible.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def apply(op: str, source: str) -> str:
    """The answer for ``op`` applied to ``source`` (without the end token)."""
    if op == ">":
        return source
    if op == "<":
        return source[::-1]
    raise ValueError(f"unknown operator {op!r}; operators are {OPERATORS}")


def prompt(op: str, source: str) -> str:
    return f"{BOS}{source}{op}"


def example(op: str, source: str) -> str:
    return f"{prompt(op, source)}{apply(op, source)}{EOS}"


def encode(text: str) -> list[int]:
    try:
        return [TOKEN_ID[ch] for ch in text]
    except KeyError as err:
        vocab = "".join(VOCAB)
        raise ValueError(f"character {err.args[0]!r} is not in the demo vocabulary {vocab!r}") from None


def decode(ids: Iterable[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def random_strings(rng: random.Random, n: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    """``n`` random source strings, none of them in ``exclude``."""
    out = []
    while len(out) < n:
        s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
        if s not in exclude:
            out.append(s)
    return out


def eval_strings(n: int = EVAL_SIZE) -> list[str]:
    """The fixed held-out source strings (training draws exclude them)."""
    return random_strings(random.Random(EVAL_SEED), n)


def make_batch(op: str, sources: Sequence[str], device: torch.device | str = "cpu"):
    """Right-padded token ids and the mask of the answer tokens (answer and end token).

    Returns ``ids: [B, T]`` (int64) and ``answer_mask: [B, T]`` (bool), with T the longest
    example; padding comes after the end token, so causal attention never sees it from an
    answer position.
    """
    rows = [encode(example(op, s)) for s in sources]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, s) in enumerate(zip(rows, sources)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, len(s) + 2 : len(row)] = True  # after "^" + source + op
    return ids.to(device), mask.to(device)


def answer_loss(model: nn.Module, ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens (the prompt is given, not learned)."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]  # [B, T-1, V]
    targets = ids[:, 1:].masked_fill(~answer_mask[:, 1:], -100)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


@torch.no_grad()
def greedy_answers(model: nn.Module, op: str, sources: Sequence[str], device, batch_size: int = 256
                   ) -> list[str]:
    """Greedy continuation of each prompt for exactly len(answer) + 1 tokens.

    Prompts are batched by length so no padding or attention mask is needed.
    """
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(sources):
        by_len.setdefault(len(s), []).append(i)
    answers = [""] * len(sources)
    for length, idx in sorted(by_len.items()):
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            seq = torch.tensor([encode(prompt(op, sources[i])) for i in chunk], device=device)
            for _ in range(length + 1):
                next_ids = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1)
                seq = torch.cat([seq, next_ids[:, None]], dim=1)
            for i, row in zip(chunk, seq[:, length + 2 :].tolist()):
                answers[i] = decode(row)
    return answers


def exact_match(model: nn.Module, op: str, sources: Sequence[str], device) -> float:
    """Fraction of prompts whose greedy answer is exactly right, end token included."""
    answers = greedy_answers(model, op, sources, device)
    return sum(a == apply(op, s) + EOS for a, s in zip(answers, sources)) / len(sources)


@torch.no_grad()
def eval_loss(model: nn.Module, op: str, sources: Sequence[str], device) -> float:
    return answer_loss(model, *make_batch(op, sources, device)).item()


def train(
    model: nn.Module,
    op: str,
    steps: int,
    *,
    lr: float,
    seed: int,
    device,
    batch_size: int = 64,
    exclude: frozenset[str] = frozenset(),
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW on the parameters that require grad, one-cycle schedule, fresh random strings each step.

    Returns the loss of every step. ``on_step(step, loss)`` is called after each step
    (progress bars hook in there).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    rng = random.Random(seed)
    model.train()
    losses = []
    for step in range(steps):
        ids, mask = make_batch(op, random_strings(rng, batch_size, exclude), device)
        loss = answer_loss(model, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
