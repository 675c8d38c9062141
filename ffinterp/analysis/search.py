"""Glitch-search strategies: small frozen records sharing one signature, in a registry.

A strategy is a frozen dataclass with ``run(ctx, unit)``. Its work comes in *units* indexed
by an integer; unit ``k`` is a pure function of (seed, k, the model, the budget left when it
starts), so a resumed run redoes an interrupted unit identically, and ``torchrun`` ranks can
split the stream by taking units ``k % world_size == rank`` with no re-seeding. Every
candidate goes through :meth:`SearchContext.score`, which checks the grammar, counts the
budget, scores on the fast model under ``torch.inference_mode`` and hands errors to the
caller.

Adding a strategy::

    from ffinterp.analysis.search import SearchContext, Strategy, register

    @register
    @dataclass(frozen=True)
    class AllIgnores(Strategy):
        name: ClassVar[str] = "all-ignores"

        def run(self, ctx: SearchContext, unit: int) -> None:
            rng = ctx.rng(unit)
            instr = np.full((ctx.batch_size, ctx.seq_len // 2), I, dtype=np.int64)
            bits = rng.integers(0, 2, size=instr.shape)
            ctx.score(assemble(instr, bits), origin={"unit": unit})

after which ``find_glitches(model, strategy="all-ignores")`` and
``ffinterp find-glitches --strategy all-ignores`` use it.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ffinterp.errors import FFInterpError
from ffinterp.language import ONE, VOCAB_SIZE, ZERO, I, R, Reads, W, read_mask, reads, sample
from ffinterp.models.gpt import GPT
from ffinterp.scoring import ReadScores, score_read_logits

# ---------------------------------------------------------------- seeds and sequences


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed from (seed, keys): stable across processes, machines and ranks."""
    ints = [int(seed) & (2**63 - 1)]
    for k in keys:
        ints.append(zlib.crc32(k.encode()) if isinstance(k, str) else int(k) & (2**63 - 1))
    state = np.random.SeedSequence(ints).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def relabel(tokens: Int[Tensor, "batch seq"]) -> Int[Tensor, "batch seq"]:
    """Set every read's bit to the most recent write's bit (the language's rule), in place."""
    instr, bits = tokens[:, 0::2], tokens[:, 1::2]
    slots = torch.arange(instr.shape[1], device=tokens.device).expand_as(instr)
    last = torch.cummax(torch.where(instr == W, slots, torch.zeros_like(slots)), dim=1).values
    copied = bits.gather(1, last)
    tokens[:, 1::2] = torch.where(instr == R, copied, bits)
    return tokens


def assemble(instr: np.ndarray | Tensor, bits: np.ndarray | Tensor) -> Int[Tensor, "batch seq"]:
    """Tokens from instruction ids [batch, slots] and 0/1 bits; fixes the first write, the
    final read and the read labels, so any instruction/bit arrays give a valid sequence."""
    instr = torch.as_tensor(np.asarray(instr), dtype=torch.long).clone()
    bits = torch.as_tensor(np.asarray(bits), dtype=torch.long)
    instr[:, 0] = W
    instr[:, -1] = R
    out = torch.empty((instr.shape[0], 2 * instr.shape[1]), dtype=torch.long)
    out[:, 0::2] = instr
    out[:, 1::2] = bits.clamp(0, 1) + ZERO
    return relabel(out)


def invalid_rows(tokens: Int[Tensor, "batch seq"]) -> Int[Tensor, " bad"]:
    """Indices of rows that break the grammar (vectorised :func:`ffinterp.language.validate`)."""
    instr, bits = tokens[:, 0::2], tokens[:, 1::2]
    bad = ((instr < W) | (instr > I)).any(1) | ((bits != ZERO) & (bits != ONE)).any(1)
    bad |= (instr[:, 0] != W) | (instr[:, -1] != R)
    fixed = relabel(tokens.clone().clamp(0, VOCAB_SIZE - 1))
    bad |= (fixed != tokens).any(1)
    return bad.nonzero().flatten()


def read_features(tokens: Int[Tensor, "batch seq"], rd: Reads) -> dict[str, Int[Tensor, " reads"]]:
    """Per read: gap (tokens from the last write's ``w`` to the read's ``r``), decoys (earlier
    writes of the opposite bit) and writes (all writes up to the read)."""
    instr, bits = tokens[:, 0::2], tokens[:, 1::2]
    w0 = torch.cumsum((instr == W) & (bits == ZERO), 1)
    w1 = torch.cumsum((instr == W) & (bits == ONE), 1)
    a = rd.write_pos // 2
    s = rd.pos // 2
    last_bit = rd.bit
    decoys = torch.where(last_bit == ONE, w0[rd.batch, a], w1[rd.batch, a])
    writes = w0[rd.batch, s] + w1[rd.batch, s]
    return {"gap": rd.gap, "decoys": decoys, "writes": writes}


# ---------------------------------------------------------------- scoring context


@dataclass(frozen=True)
class Scored:
    """One scored batch: tokens (CPU), per-read scores, and each row's weakest read."""

    tokens: Int[Tensor, "batch seq"]
    scores: ReadScores
    min_margin: Float[Tensor, " batch"]
    weakest_pos: Int[Tensor, " batch"]


class BudgetSpent(Exception):
    """Raised inside a strategy when the context stops (budget spent or caller's stop)."""


class SearchContext:
    """What a strategy sees: the model's length, seeded RNGs and a budgeted scorer.

    ``on_scored(scored, origin, record)`` is called for every scored batch; the glitch finder
    uses it to verify, minimise and write errors. ``record`` (None = all) limits how many of
    the batch's failing rows, lowest margin first, the strategy wants reported.
    """

    def __init__(
        self,
        model: nn.Module,
        seq_len: int,
        *,
        seed: int = 0,
        budget: int = 10_000,
        batch_size: int = 256,
        device: torch.device | str = "cpu",
        strategy: str = "",
        on_scored: Callable[[Scored, list[dict], int | None], None] | None = None,
        check: bool = True,
    ):
        self.model = model
        self.seq_len = seq_len
        self.seed = seed
        self.budget = budget
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.strategy = strategy
        self.on_scored = on_scored
        self.check = check
        self.scored = 0  # sequences through the fast model (forward, or forward + backward)
        self.grad_evals = 0
        self.best_margin = float("inf")
        self.stopped = False
        # Under torchrun: the best candidates other ranks found so far (island-model
        # migration for evolve and gradient); None in a single process.
        self.migrants: Int[Tensor, "m seq"] | None = None
        # What a unit learned beyond its glitches (the distribution adversary's best
        # distribution); the finder keeps them in the summary under the strategy.
        self.findings: list[dict] = []

    @property
    def remaining(self) -> int:
        return max(0, self.budget - self.scored)

    @property
    def done(self) -> bool:
        return self.stopped or self.remaining <= 0

    def stop(self) -> None:
        self.stopped = True

    def rng(self, *keys: int | str) -> np.random.Generator:
        """A NumPy generator for (seed, strategy, keys): the only randomness a strategy uses."""
        return np.random.Generator(np.random.PCG64(derive_seed(self.seed, self.strategy, *keys)))

    def score(
        self,
        tokens: Int[Tensor, "batch seq"],
        *,
        origin: dict | Sequence[dict] | None = None,
        record: int | None = None,
    ) -> Scored:
        """Score candidates on the fast model (truncated to the budget left) and report them.

        Raises :class:`BudgetSpent` when nothing is left to score.
        """
        if self.done:
            raise BudgetSpent
        tokens = torch.as_tensor(tokens, dtype=torch.long).cpu()
        if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
            raise FFInterpError(
                f"strategy {self.strategy!r}: candidates must have shape [batch, {self.seq_len}], "
                f"got {tuple(tokens.shape)}"
            )
        if self.check:
            bad = invalid_rows(tokens)
            if len(bad):
                raise FFInterpError(
                    f"internal error: strategy {self.strategy!r} emitted an invalid sequence "
                    f"(row {int(bad[0])})"
                )
        n = min(len(tokens), self.remaining)
        tokens = tokens[:n]
        origins = [dict(origin or {})] * n if origin is None or isinstance(origin, dict) else list(origin)[:n]
        scored = self._score(tokens)
        self.scored += n
        self.best_margin = min(self.best_margin, float(scored.min_margin.min()))
        if self.on_scored is not None:
            self.on_scored(scored, origins, record)
        return scored

    def _score(self, tokens: Int[Tensor, "batch seq"]) -> Scored:
        return score_batch(self.model, tokens, self.device, self.batch_size)

    def gradient(
        self, tokens: Int[Tensor, "batch seq"], read_pos: Int[Tensor, " batch"]
    ) -> tuple[Float[Tensor, "batch seq vocab"], Float[Tensor, " batch"]]:
        """d(margin at ``read_pos``)/d(one-hot input) per row, with the margins (fast model).

        Costs one forward and backward per row; counted in ``scored`` like any candidate.
        """
        if self.done:
            raise BudgetSpent
        n = min(len(tokens), self.remaining)
        g, m = onehot_gradient(self.model, tokens[:n], read_pos[:n], self.device)
        self.scored += n
        self.grad_evals += n
        return g, m


@torch.inference_mode()
def score_batch(
    model: nn.Module, tokens: Int[Tensor, "batch seq"], device: torch.device, batch_size: int = 256
) -> Scored:
    """Score every read of ``tokens`` on the fast model in chunks; results on CPU."""
    rd = reads(tokens)
    parts = []
    for lo in range(0, len(tokens), max(1, batch_size)):
        chunk = tokens[lo : lo + batch_size].to(device)
        if isinstance(model, GPT):  # the last block runs at the reads alone
            parts.append(model.logits_at(chunk, read_mask(chunk)).float().cpu())
        else:
            parts.append(model(chunk)[read_mask(chunk)].float().cpu())
    s = score_read_logits(torch.cat(parts) if parts else torch.empty(0, VOCAB_SIZE), rd)
    b = len(tokens)
    min_margin = torch.full((b,), float("inf")).scatter_reduce(0, rd.batch, s.margin, "amin")
    # The weakest read of each row: lowest margin, first position on ties.
    is_min = s.margin == min_margin[rd.batch]
    big = torch.full((b,), tokens.shape[1], dtype=torch.long)
    weakest = big.scatter_reduce(0, rd.batch[is_min], rd.pos[is_min], "amin")
    return Scored(tokens, s, min_margin, weakest)


def _embedding(model: nn.Module) -> nn.Embedding:
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.num_embeddings == VOCAB_SIZE:
            return m
    raise FFInterpError(f"the gradient strategy needs a token embedding of size {VOCAB_SIZE} in the model")


def onehot_gradient(
    model: nn.Module, tokens: Int[Tensor, "batch seq"], read_pos: Int[Tensor, " batch"], device: torch.device
) -> tuple[Float[Tensor, "batch seq vocab"], Float[Tensor, " batch"]]:
    """Gradient of each row's margin at ``read_pos`` with respect to its one-hot tokens.

    The token embedding's output is replaced by ``one_hot @ W_E`` through a forward hook, so
    any model with an ``nn.Embedding`` over the flip-flop vocabulary works unchanged.
    """
    emb = _embedding(model)
    # clones outside inference mode: scored batches are inference tensors
    tokens = tokens.clone().to(device)
    read_pos = read_pos.clone().to(device)
    onehot = torch.nn.functional.one_hot(tokens, VOCAB_SIZE).to(emb.weight.dtype).requires_grad_(True)
    handle = emb.register_forward_hook(lambda mod, inp, out: onehot @ mod.weight)
    try:
        with torch.enable_grad():
            logits = model(tokens).float()
            rows = torch.arange(len(tokens), device=device)
            at = logits[rows, read_pos]
            rd = reads(tokens.cpu())
            # the correct bit of the chosen read (reads() gives it for every read)
            key = {(int(b), int(p)): int(bit) for b, p, bit in zip(rd.batch, rd.pos, rd.bit)}
            bit = torch.tensor([key[(k, int(p))] for k, p in enumerate(read_pos.cpu())], device=device)
            correct = at.gather(1, bit[:, None]).squeeze(1)
            others = at.scatter(1, bit[:, None], float("-inf")).amax(1)
            margin = correct - others
            (grad,) = torch.autograd.grad(margin.sum(), onehot)
    finally:
        handle.remove()
    return grad.detach().float().cpu(), margin.detach().cpu()


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Strategy:
    """Base of every search strategy: a frozen record whose ``run`` scores one unit of work."""

    name: ClassVar[str] = ""

    def run(self, ctx: SearchContext, unit: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def unit_cost(self, ctx: SearchContext) -> int | None:
        """Sequences every unit scores, if fixed (a sampling stream): then unit k starts at
        sequence k * cost of the stream, so ranks can take units in any split and still score
        exactly what one process would. None (searches that stop early) splits the budget."""
        return None

    def params(self) -> dict:
        """The record's fields, for summaries and the resume fingerprint."""
        return {"name": self.name, **asdict(self)}


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a :class:`Strategy` subclass available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name`")
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(spec: str | Strategy) -> Strategy:
    """A strategy instance from its registered name (default parameters) or as given."""
    if isinstance(spec, Strategy):
        return spec
    try:
        return STRATEGIES[spec]()
    except KeyError:
        known = ", ".join(sorted(STRATEGIES))
        raise FFInterpError(f"unknown strategy {spec!r} (known: {known}, all)") from None


def resolve_strategies(spec: str | Strategy | Sequence[str | Strategy]) -> list[Strategy]:
    """``"all"`` (the four built-ins), a name, an instance, or a list of those."""
    if isinstance(spec, str) and spec == "all":
        return [get_strategy(n) for n in DEFAULT_ORDER]
    if isinstance(spec, (str, Strategy)):
        return [get_strategy(spec)]
    return [get_strategy(s) for s in spec]


# ---------------------------------------------------------------- random


SWEEP = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


@register
@dataclass(frozen=True)
class Random(Strategy):
    """The paper's baseline: FFL(p_i) samples over a sweep of p_i.

    Unit k is batch ``k // len(p_is)`` of the FFL(p_is[k % len(p_is)]) stream, so the union
    of any partition of units is one fixed set of sequences.
    """

    name: ClassVar[str] = "random"
    p_is: tuple[float, ...] = SWEEP

    def unit_cost(self, ctx: SearchContext) -> int:
        return ctx.batch_size

    def run(self, ctx: SearchContext, unit: int) -> None:
        j = unit % len(self.p_is)
        p = self.p_is[j]
        n = ctx.batch_size
        tokens = sample(
            n,
            ctx.seq_len,
            p,
            seed=derive_seed(ctx.seed, "random", p),
            offset=(unit // len(self.p_is)) * n,
            threads=1,
        )
        ctx.score(tokens, origin={"p_i": p, "unit": unit})


# ---------------------------------------------------------------- families


def _ffl_slots(
    rng: np.random.Generator, shape: tuple[int, int], p_i: float, writes: bool = True
) -> np.ndarray:
    """Random instructions of FFL(p_i) (or reads/ignores only, when ``writes`` is False)."""
    u = rng.random(shape)
    pw = (1 - p_i) / 2 if writes else 0.0
    pr = (1 - p_i) / 2
    return np.where(u < pw, W, np.where(u < pw + pr, R, I))


def _family_long_gap(rng, b, s, gap_frac, prefix_p_i):
    """The last write far from the read: an FFL prefix, one write, then only ignores/reads."""
    instr = _ffl_slots(rng, (b, s), prefix_p_i)
    gap = max(1, min(s - 2, round(gap_frac * (s - 1))))
    a = s - 1 - gap
    instr[:, a] = W
    instr[:, a + 1 :] = I
    return instr, rng.integers(0, 2, (b, s))


def _family_decoys(rng, b, s, n_decoys, gap_frac, near):
    """Earlier writes of the opposite bit (decoys: the opening write and ``n_decoys`` more,
    packed right before the last write when ``near``, else spread over the prefix), then a
    gap with a few reads probing it."""
    gap = max(1, min(s - 3, round(gap_frac * (s - 1))))
    a = s - 1 - gap
    instr = np.where(rng.random((b, s)) < 0.1, R, I)
    instr[:, : a + 1] = I
    bits = rng.integers(0, 2, (b, s))
    bit = rng.integers(0, 2, b)
    k = min(n_decoys, a - 1)
    for row in range(b):
        pos = np.arange(a - k, a) if near else rng.choice(np.arange(1, a), size=k, replace=False)
        instr[row, pos] = W
        bits[row, pos] = 1 - bit[row]
        bits[row, 0] = 1 - bit[row]
    instr[:, a] = W
    bits[:, a] = bit
    return instr, bits


def _family_dense_sparse(rng, b, s, prefix_frac, dense_p_i, sparse_p_i):
    """A dense-write prefix followed by a sparse tail whose reads come long after the last write."""
    cut = max(1, round(prefix_frac * s))
    instr = _ffl_slots(rng, (b, s), dense_p_i)
    tail = _ffl_slots(rng, (b, s - cut), sparse_p_i, writes=sparse_p_i < 1.0)
    if sparse_p_i >= 1.0:  # no writes in the tail; a few reads probe every gap
        tail = np.where(rng.random(tail.shape) < 0.05, R, I)
    instr[:, cut:] = tail
    return instr, rng.integers(0, 2, (b, s))


def _family_only_initial(rng, b, s, n_reads):
    """Only the initial write: attention can drift to the start (or anywhere) over time."""
    instr = np.full((b, s), I)
    for row in range(b):
        instr[row, rng.choice(np.arange(1, s), size=min(n_reads, s - 1), replace=False)] = R
    return instr, rng.integers(0, 2, (b, s))


def _family_extreme_reads(rng, b, s, where, mid_p_i):
    """Reads at the extreme positions: right after the first write, and at the final slot."""
    instr = _ffl_slots(rng, (b, s), mid_p_i)
    if where in ("first", "both"):
        instr[:, 1] = R
    if where in ("last", "both"):
        instr[:, -8:-1] = np.where(instr[:, -8:-1] == W, I, instr[:, -8:-1])
    return instr, rng.integers(0, 2, (b, s))


def _family_tied_writes(rng, b, s, n_tied, gap_frac):
    """A run of adjacent writes, nearly tied on distance to a far read: fragile tie-breaking."""
    gap = max(1, min(s - n_tied - 1, round(gap_frac * (s - 1))))
    a = s - 1 - gap
    instr = _ffl_slots(rng, (b, s), 0.9)
    instr[:, a - n_tied + 1 : a + 1] = W
    instr[:, a + 1 :] = I
    bits = rng.integers(0, 2, (b, s))
    # the last of the run differs from the one before it, so picking the wrong one shows
    bits[:, a] = 1 - bits[:, a - 1]
    return instr, bits


GAPS = (0.25, 0.5, 0.75, 0.9, 0.97)

FAMILIES: dict[str, tuple[Callable, list[dict]]] = {
    "long_gap": (
        _family_long_gap,
        [dict(gap_frac=g, prefix_p_i=p) for g in GAPS for p in (0.5, 0.9)],
    ),
    "decoys": (
        _family_decoys,
        [
            dict(n_decoys=n, gap_frac=g, near=near)
            for n in (2, 4, 8, 32)
            for g in (0.1, 0.5, 0.9)
            for near in (1, 0)
        ],
    ),
    "dense_sparse": (
        _family_dense_sparse,
        [
            dict(prefix_frac=f, dense_p_i=d, sparse_p_i=sp)
            for f in (0.1, 0.5, 0.9)
            for d in (0.1, 0.5)
            for sp in (0.98, 1.0)
        ],
    ),
    "only_initial": (_family_only_initial, [dict(n_reads=n) for n in (1, 4, 16, 64)]),
    "extreme_reads": (
        _family_extreme_reads,
        [dict(where=w, mid_p_i=p) for w in ("first", "last", "both") for p in (0.1, 0.8, 0.98)],
    ),
    "tied_writes": (
        _family_tied_writes,
        [dict(n_tied=k, gap_frac=g) for k in (2, 4, 8) for g in (0.25, 0.75, 0.95)],
    ),
}


def family_grid(names: Sequence[str]) -> list[tuple[str, dict]]:
    """(family, params) points, interleaved across families so every family is tried early."""
    lists = [[(n, p) for p in FAMILIES[n][1]] for n in names]
    out = []
    for group in itertools.zip_longest(*lists):
        out.extend(x for x in group if x is not None)
    return out


@register
@dataclass(frozen=True)
class Families(Strategy):
    """Parameterised structured families over a grid; unit k samples a batch of grid point
    ``k % len(grid)`` with RNG (seed, k)."""

    name: ClassVar[str] = "families"
    families: tuple[str, ...] = tuple(FAMILIES)

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise FFInterpError(f"unknown families {unknown} (known: {', '.join(FAMILIES)})")

    def unit_cost(self, ctx: SearchContext) -> int:
        return ctx.batch_size

    def run(self, ctx: SearchContext, unit: int) -> None:
        grid = family_grid(self.families)
        fam, params = grid[unit % len(grid)]
        fn = FAMILIES[fam][0]
        instr, bits = fn(ctx.rng(unit), ctx.batch_size, ctx.seq_len // 2, **params)
        ctx.score(assemble(instr, bits), origin={"family": fam, **params, "unit": unit})


# ---------------------------------------------------------------- evolve


def _mutate(
    rng: np.random.Generator, instr: np.ndarray, bits: np.ndarray, focus: np.ndarray, n_mut: int
) -> None:
    """Grammar-preserving point mutations in place: change an instruction, flip a bit, or
    move a write. Slots are biased towards those before each row's weakest read."""
    b, s = instr.shape
    for row in range(b):
        for _ in range(n_mut):
            hi = int(focus[row]) if rng.random() < 0.5 and focus[row] > 1 else s - 1
            slot = int(rng.integers(1, max(2, hi)))
            kind = rng.integers(0, 3)
            if kind == 0:
                instr[row, slot] = (instr[row, slot] + rng.integers(1, 3)) % 3
            elif kind == 1:
                bits[row, slot] ^= 1
            else:
                writes = np.flatnonzero(instr[row, 1:-1] == W) + 1
                if len(writes):
                    src = int(rng.choice(writes))
                    instr[row, src] = I
                    instr[row, slot] = W
                    bits[row, slot] = bits[row, src]
                else:
                    instr[row, slot] = W
        instr[row, 0], instr[row, -1] = W, R


def _split(tokens: Tensor) -> tuple[np.ndarray, np.ndarray]:
    t = tokens.numpy()
    return t[:, 0::2].copy(), (t[:, 1::2] - ZERO).copy()


@register
@dataclass(frozen=True)
class Evolve(Strategy):
    """Batched mutation search minimising the margin at a read; unit k is one restart.

    Population from FFL(p_i) over a sweep, truncation selection, elitism, grammar-preserving
    mutations; a restart ends at its first error, after ``patience`` generations without
    progress, or after ``generations``.
    """

    name: ClassVar[str] = "evolve"
    population: int = 128
    elite: int = 16
    generations: int = 40
    patience: int = 8
    max_mutations: int = 3
    p_is: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)

    def run(self, ctx: SearchContext, unit: int) -> None:
        rng = ctx.rng(unit)
        pop_n = self.population
        ps = rng.choice(np.asarray(self.p_is), size=pop_n)
        instr = np.stack([_ffl_slots(rng, (1, ctx.seq_len // 2), float(p))[0] for p in ps])
        pop = assemble(instr, rng.integers(0, 2, instr.shape))
        if ctx.migrants is not None and len(ctx.migrants):  # other ranks' best candidates
            m = min(len(ctx.migrants), pop_n // 4)
            pop[pop_n - m :] = ctx.migrants[:m]
        sc = ctx.score(pop, origin={"restart": unit, "generation": 0}, record=1)
        if bool((sc.min_margin < 0).any()) or ctx.done:  # done: the budget cut this batch short
            return
        fit, weak = sc.min_margin, sc.weakest_pos
        best, stale = float(fit.min()), 0
        for gen in range(1, self.generations + 1):
            order = torch.argsort(fit, stable=True)
            pop, fit, weak = pop[order], fit[order], weak[order]
            n_child = pop_n - self.elite
            parents = rng.integers(0, max(1, pop_n // 4), n_child)
            instr, bits = _split(pop[parents])
            _mutate(
                rng, instr, bits, (weak[parents] // 2).numpy(), int(rng.integers(1, self.max_mutations + 1))
            )
            children = assemble(instr, bits)
            sc = ctx.score(children, origin={"restart": unit, "generation": gen}, record=1)
            if bool((sc.min_margin < 0).any()) or ctx.done:
                return
            pop = torch.cat([pop[: self.elite], children])
            fit = torch.cat([fit[: self.elite], sc.min_margin])
            weak = torch.cat([weak[: self.elite], sc.weakest_pos])
            now = float(fit.min())
            best, stale = (now, 0) if now < best - 1e-6 else (best, stale + 1)
            if stale >= self.patience:
                return


# ---------------------------------------------------------------- gradient


def grammatical_substitutions(tokens: Int[Tensor, " seq"]) -> list[tuple[int, int]]:
    """Every (position, token) change that keeps the grammar (read bits follow by relabel)."""
    t = tokens.tolist()
    out = []
    for pos in range(2, len(t) - 2, 2):  # instructions, not the first write or final read
        out += [(pos, k) for k in (W, R, I) if k != t[pos]]
    for pos in range(1, len(t), 2):  # bits of writes and ignores
        if t[pos - 1] != R:
            out.append((pos, ONE if t[pos] == ZERO else ZERO))
    return out


@register
@dataclass(frozen=True)
class Gradient(Strategy):
    """GCG-style search: the gradient of the weakest read's margin with respect to one-hot
    inputs ranks grammatical substitutions; a batch of the top ones is scored and the best
    kept. Unit k is one run from an FFL(p_i) start."""

    name: ClassVar[str] = "gradient"
    steps: int = 30
    top_k: int = 64
    candidates: int = 128
    patience: int = 6
    p_is: tuple[float, ...] = (0.8, 0.9, 0.95, 0.98, 0.99)

    def run(self, ctx: SearchContext, unit: int) -> None:
        rng = ctx.rng(unit)
        p = float(self.p_is[unit % len(self.p_is)])
        instr = _ffl_slots(rng, (1, ctx.seq_len // 2), p)
        x = assemble(instr, rng.integers(0, 2, instr.shape))
        if ctx.migrants is not None and len(ctx.migrants) and rng.random() < 0.5:
            x = ctx.migrants[int(rng.integers(len(ctx.migrants)))][None].clone()  # another rank's best
        sc = ctx.score(x, origin={"restart": unit, "step": 0, "p_i": p}, record=1)
        if float(sc.min_margin[0]) < 0:
            return
        cur, weak = x[0], sc.weakest_pos[:1]
        best, stale = float(sc.min_margin[0]), 0
        for step in range(1, self.steps + 1):
            grad, _ = ctx.gradient(cur[None], weak)
            subs = grammatical_substitutions(cur)
            gain = np.array([float(grad[0, pos, tok] - grad[0, pos, cur[pos]]) for pos, tok in subs])
            top = np.argsort(gain, kind="stable")[: self.top_k]
            cands = cur.repeat(self.candidates, 1)
            for row in range(self.candidates):
                for j in rng.choice(top, size=int(rng.integers(1, 3)), replace=False):
                    pos, tok = subs[int(j)]
                    cands[row, pos] = tok
            cands = relabel(torch.unique(cands, dim=0))
            sc = ctx.score(cands, origin={"restart": unit, "step": step, "p_i": p}, record=1)
            if bool((sc.min_margin < 0).any()):
                return
            k = int(torch.argmin(sc.min_margin))
            cur, weak = sc.tokens[k], sc.weakest_pos[k : k + 1]
            now = float(sc.min_margin[k])
            best, stale = (now, 0) if now < best - 1e-6 else (best, stale + 1)
            if stale >= self.patience:
                return


DEFAULT_ORDER = ("random", "families", "evolve", "gradient")

__all__ = [
    "DEFAULT_ORDER",
    "FAMILIES",
    "STRATEGIES",
    "BudgetSpent",
    "Evolve",
    "Families",
    "Gradient",
    "Random",
    "Scored",
    "SearchContext",
    "Strategy",
    "assemble",
    "derive_seed",
    "get_strategy",
    "register",
    "relabel",
    "resolve_strategies",
]
