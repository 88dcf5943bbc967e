"""A small causal transformer language model over bytes of Python source, for comparing torch optimizers on a
real (if tiny) language-modelling task on the CPU, with nothing to download.

    from lm import train_lm
    result = train_lm(lambda params: torch.optim.AdamW(params, lr=2e-3), steps=500, batch_size=32, seed=0)
    result["final_heldout_loss"], result["curve"]      # nats per byte; [{step, examples, train_loss, heldout_loss}]

Why this task: the optimizer studies in ``bench/`` (schedule-free and LAMB in ``self_tuning.py``, 8-bit optimizer
states next) need a model whose loss surface has the features that make optimizers differ (embeddings, attention,
LayerNorm, a softmax over a vocabulary) and that trains to a clearly lower loss in seconds on one CPU core.

- **Corpus.** The sources of :data:`TRAIN_MODULES` and :data:`HELDOUT_MODULES`, standard-library modules present in
  every CPython 3.9-3.13, read from the running interpreter's ``sysconfig.get_paths()["stdlib"]``: deterministic for
  one interpreter, no download. The held-out files are whole files the model never trains on. Bytes are the tokens
  (vocabulary 256, so an untrained model's loss is ``log(256) = 5.55`` nats per byte). Sources differ a little between
  Python versions: :func:`load_corpus` returns their SHA-256 so that results name the text they came from.
- **Model.** :class:`CharTransformer`: learned token and position embeddings, ``layers`` pre-LayerNorm blocks
  (causal multi-head attention through ``scaled_dot_product_attention``, a 4x GELU MLP), a final LayerNorm and an
  untied output layer; GPT-2's initialisation (normal, std 0.02; zero biases). Plain ``torch.nn``.
- **Training.** :func:`train_lm` draws ``batch_size`` random windows of ``context + 1`` bytes per step from the
  training text and minimises the mean next-byte cross-entropy. Held-out loss is the mean over a fixed set of
  :attr:`LMConfig.heldout_windows` evenly spaced windows of the held-out text (the same for every seed and run).

Any optimizer: ``make_optimizer(params)`` returns a ``torch.optim.Optimizer`` (or anything with ``zero_grad`` and
``step``). Optimizers with ``train()`` and ``eval()`` methods (schedule-free ones, whose evaluation point differs
from their gradient point) are put in train mode before training steps and in eval mode to evaluate; the model is
left at the eval point after the last evaluation. Results are deterministic for a seed, a thread count and a torch
build (the thread count changes the order of float reductions).
"""
import functools
import hashlib
import math
import os
import sysconfig
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TRAIN_MODULES = (
    "argparse", "ast", "base64", "calendar", "codecs", "contextlib", "csv", "dataclasses", "datetime", "dis",
    "enum", "functools", "gettext", "gzip", "heapq", "inspect", "ipaddress", "pickle", "pprint", "random",
    "selectors", "shlex", "shutil", "socket", "statistics", "string", "subprocess", "tempfile", "threading",
    "tokenize", "traceback", "warnings",
)
HELDOUT_MODULES = ("difflib", "fractions", "optparse", "textwrap", "uuid")
VOCAB = 256


@dataclass(frozen=True)
class LMConfig:
    """Model shape and the held-out set's size. The defaults (137k params) train to 2.20 nats per byte (spread over
    seeds 0.02) in 500 steps of batch 32 with AdamW at its best rate (1.8e-3, warmup + cosine), about 9 s of one
    core of the 2-core machine. A context of 64 cost twice as much per step and left one seed in four near 2.43 after
    400 steps where the others reached 2.22 (the plateau before attention learns to look back)."""
    context: int = 32
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    heldout_windows: int = 256


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # uint8 bytes of TRAIN_MODULES' sources, concatenated in that order
    heldout: torch.Tensor  # uint8 bytes of HELDOUT_MODULES' sources
    stdlib: str  # the directory they came from
    sha256: str  # of train then held-out bytes: names the text a result was measured on


@functools.lru_cache(maxsize=1)
def load_corpus():
    """The training and held-out bytes (read once per process)."""
    stdlib = sysconfig.get_paths()["stdlib"]

    def read(modules):
        parts = []
        for module in modules:
            with open(os.path.join(stdlib, module + ".py"), "rb") as file:
                parts.append(file.read())
        return b"".join(parts)

    train, heldout = read(TRAIN_MODULES), read(HELDOUT_MODULES)
    return Corpus(torch.tensor(list(train), dtype=torch.uint8), torch.tensor(list(heldout), dtype=torch.uint8),
                  stdlib, hashlib.sha256(train + heldout).hexdigest())


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, d_model, heads):
        super().__init__()
        self.attention_norm, self.attention = nn.LayerNorm(d_model), CausalSelfAttention(d_model, heads)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class CharTransformer(nn.Module):
    """Next-byte logits ``[batch, length, 256]`` for byte ids ``[batch, length]`` (length <= context)."""

    def __init__(self, config):
        super().__init__()
        self.token = nn.Embedding(VOCAB, config.d_model)
        self.position = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.Sequential(*(Block(config.d_model, config.heads) for _ in range(config.layers)))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, VOCAB)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, ids):
        x = self.token(ids) + self.position(torch.arange(ids.shape[1]))
        return self.head(self.norm(self.blocks(x)))


def next_byte_loss(model, windows):
    """Mean cross-entropy (nats per byte) of predicting ``windows[:, 1:]`` from ``windows[:, :-1]``."""
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), windows[:, 1:].reshape(-1))


def heldout_windows(corpus, config):
    """The fixed evaluation set: ``heldout_windows`` evenly spaced windows of ``context + 1`` held-out bytes."""
    starts = torch.linspace(0, len(corpus.heldout) - config.context - 1, config.heldout_windows).long()
    return torch.stack([corpus.heldout[start:start + config.context + 1] for start in starts]).long()


@torch.no_grad()
def heldout_loss(model, windows, batch_size=64):
    """Mean next-byte loss over ``windows`` (a schedule-free optimizer's eval mode is the caller's to set)."""
    model.eval()
    total = 0.0
    for batch in windows.split(batch_size):
        total += next_byte_loss(model, batch).item() * len(batch)
    model.train()
    return total / len(windows)


def is_schedule_free(optimizer):
    """Whether ``optimizer`` has ``train()`` and ``eval()`` modes (schedule-free optimizers: they evaluate at another
    point than the one where they take gradients)."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def train_lm(make_optimizer, *, steps, batch_size, seed, lr_schedule=None, eval_every=None, config=LMConfig()):
    """Train a fresh :class:`CharTransformer` for ``steps`` steps and return a dict:

    - ``final_heldout_loss``: held-out nats per byte after the last step (``math.inf`` if training diverged);
    - ``curve``: ``[{step, examples, train_loss, heldout_loss}]`` at step 0, every ``eval_every`` steps (default:
      ``steps // 10``) and the last step; ``train_loss`` is the mean training loss since the previous point (at the
      optimizer's gradient point, which for schedule-free optimizers is not the evaluated one);
    - ``diverged`` (a non-finite training loss stopped the run), ``seconds`` (wall time of the run), ``params``.

    ``make_optimizer(params)`` builds the optimizer; ``lr_schedule(optimizer)``, if given, a torch LR scheduler
    stepped once after every optimizer step. ``seed`` sets the initialisation and the training windows drawn.
    """
    start_time = time.perf_counter()
    corpus = load_corpus()
    evaluation = heldout_windows(corpus, config)
    torch.manual_seed(seed)
    model = CharTransformer(config)
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model.parameters())
    scheduler = lr_schedule(optimizer) if lr_schedule else None
    schedule_free = is_schedule_free(optimizer)
    eval_every = eval_every or max(1, steps // 10)
    offsets = torch.arange(config.context + 1)

    def evaluate():
        if schedule_free:
            optimizer.eval()
        loss = heldout_loss(model, evaluation)
        if schedule_free:
            optimizer.train()
        return loss

    curve = [dict(step=0, examples=0, train_loss=None, heldout_loss=evaluate())]
    train_losses, diverged = [], False
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(corpus.train) - config.context - 1, (batch_size, 1), generator=generator)
        loss = next_byte_loss(model, corpus.train[starts + offsets].long())
        if not math.isfinite(loss.item()):
            diverged = True
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler:
            scheduler.step()
        train_losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            curve.append(dict(step=step, examples=step * batch_size, train_loss=sum(train_losses) / len(train_losses),
                              heldout_loss=evaluate()))
            train_losses = []
    if schedule_free:
        optimizer.eval()
    diverged = diverged or not math.isfinite(curve[-1]["heldout_loss"])
    return dict(final_heldout_loss=math.inf if diverged else curve[-1]["heldout_loss"], curve=curve,
                diverged=diverged, seconds=time.perf_counter() - start_time,
                params=sum(param.numel() for param in model.parameters()))
