"""The fast model: a GPT-2-style decoder with nanoGPT's parameter names.

This view trains and does bulk scoring, so attention goes through
``scaled_dot_product_attention``; the explicit softmax path runs only when a caller asks
for the attention rows (the sharpening regularizer). Analysis uses the hooked view.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from ffinterp.language import VOCAB_SIZE

# nanoGPT's own GPTConfig fields: these go to ckpt["model_args"]; the rest to ckpt["ffl"].
NANOGPT_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")


@dataclass
class GPTConfig:
    """Architecture of the fast transformer.

    ``dropout`` is nanoGPT's single rate; ``embd_dropout``, ``attn_dropout`` and
    ``resid_dropout`` override it per site (the paper's embedding-dropout mitigation).
    ``activation`` is ``gelu`` (exact, nanoGPT) or ``gelu_new`` (tanh, HF GPT-2).
    """

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 512
    vocab_size: int = VOCAB_SIZE
    bias: bool = True
    dropout: float = 0.0
    embd_dropout: float | None = None
    attn_dropout: float | None = None
    resid_dropout: float | None = None
    pos_embedding: str = "learned"  # or "sinusoidal" (fixed, stored in wpe, frozen)
    activation: str = "gelu"
    ln_eps: float = 1e-5
    layer_norm: bool = True
    attn_only: bool = False

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.pos_embedding not in ("learned", "sinusoidal"):
            raise ValueError(f"pos_embedding must be 'learned' or 'sinusoidal', got {self.pos_embedding!r}")
        if self.activation not in ("gelu", "gelu_new"):
            raise ValueError(f"activation must be 'gelu' or 'gelu_new', got {self.activation!r}")

    @property
    def d_head(self) -> int:
        return self.n_embd // self.n_head

    def rate(self, site: str) -> float:
        """Dropout rate at ``embd``, ``attn`` or ``resid``."""
        own = getattr(self, f"{site}_dropout")
        return self.dropout if own is None else own

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def model_args(self) -> dict:
        """nanoGPT's ``model_args`` (so nanoGPT itself can load our checkpoints)."""
        return {k: getattr(self, k) for k in NANOGPT_ARGS}


PRESETS: dict[str, dict] = {
    # micro: the T=512 zoo's size; on one CPU thread a step of 16 x 512 takes 0.3 s (tiny: 0.6 s)
    "micro": dict(n_layer=2, n_embd=64, n_head=4),
    "tiny": dict(n_layer=2, n_embd=128, n_head=4),
    "small": dict(n_layer=4, n_embd=256, n_head=8),
    "paper": dict(n_layer=6, n_embd=512, n_head=8),
}


def preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)}, lstm)")
    return GPTConfig(**{**PRESETS[name], **overrides})


def sinusoidal_table(n_pos: int, d: int) -> Float[Tensor, "pos d"]:
    """The fixed position embeddings of Vaswani et al. (sin on even, cos on odd dims)."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float64) / d)
    table = torch.zeros(n_pos, d, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return table.float()


class Scratch:
    """Buffers that one inference forward reuses across its layers, one per name and shape.

    Allocating the ~100 MB intermediates of a large batch anew in every layer costs as much
    as a GEMM on a CPU (the OS zeroes every fresh page), so the inference path writes them
    into these instead. Only tensors that no tool can see go here (see :func:`_unwatched`).

    ``own_stream``: the caller holds the residual stream alone (nothing watches the model),
    so each block adds into its input rather than into a new tensor.
    """

    def __init__(self, own_stream: bool = False) -> None:
        self._buffers: dict[str, Tensor] = {}
        self.own_stream = own_stream

    def get(self, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf


class Linear(nn.Linear):
    """``nn.Linear`` that can write into a given buffer and add into a given tensor, for the
    inference path (the same GEMM kernel as ``F.linear``).

    ``add``: return ``add + linear(x)``, the addition done in the GEMM's accumulator (the
    residual add fused into the projection); ``out``: write the result there (it may be
    ``add`` itself, for an add in place).
    """

    def forward(self, x: Tensor, out: Tensor | None = None, add: Tensor | None = None) -> Tensor:
        if out is None and add is None:
            return F.linear(x, self.weight, self.bias)
        shape = (*x.shape[:-1], self.out_features)
        x2, w = x.reshape(-1, self.in_features), self.weight.t()
        if add is None:
            res = out.view(-1, self.out_features)
            if self.bias is None:
                return torch.mm(x2, w, out=res).view(shape)
            return torch.addmm(self.bias, x2, w, out=res).view(shape)
        acc = add.view(-1, self.out_features) if out is add else add.reshape(-1, self.out_features)
        if out is add:
            res = acc.addmm_(x2, w)
        else:
            res = torch.addmm(acc, x2, w, **({} if out is None else {"out": out.view(-1, self.out_features)}))
        if self.bias is not None:
            res.add_(self.bias)
        return res.view(shape)


class LayerNorm(nn.Module):
    """LayerNorm with optional bias (nanoGPT's); eps follows the source checkpoint."""

    def __init__(self, ndim: int, bias: bool, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.rate("resid"))
        self.attn_p = cfg.rate("attn")

    def forward(
        self,
        x: Tensor,
        need_pattern: bool = False,
        scratch: Scratch | None = None,
        residual: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The attention output and, with ``need_pattern``, its rows ``[batch, head, q, k]``.

        With ``residual`` the output is ``residual + attention``, which the inference path
        computes in one GEMM (into ``residual`` itself when ``scratch.own_stream``).
        """
        b, t, c = x.shape
        h = self.cfg.n_head
        scratch = _scratch_for(self, scratch, need_pattern)
        qkv = self.c_attn(x, scratch.get("qkv", (b, t, 3 * c), x)) if scratch is not None else self.c_attn(x)
        q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in qkv.split(c, dim=2))
        pattern = None
        if need_pattern:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // h)
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            pattern = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            y = F.dropout(pattern, self.attn_p, self.training) @ v
        else:
            p = self.attn_p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        if scratch is not None:  # heads merged into a reused buffer rather than a fresh copy
            merged = scratch.get("merged", (b, t, c), x)
            merged.view(b, t, h, c // h).copy_(y.transpose(1, 2))
            into = residual if scratch.own_stream else None
            return self.resid_drop(self.c_proj(merged, out=into, add=residual)), None  # eval: identity
        out = self.resid_drop(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))
        return (out if residual is None else residual + out), pattern


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.rate("resid"))
        self.approximate = "tanh" if cfg.activation == "gelu_new" else "none"

    def forward(self, x: Tensor, scratch: Scratch | None = None, residual: Tensor | None = None) -> Tensor:
        """The MLP's output; with ``residual``, ``residual + output``, which the inference path
        adds into ``residual`` in place (the caller's own fresh tensor)."""
        scratch = _scratch_for(self, scratch)
        if scratch is not None:  # the hidden layer in a reused buffer, GELU in place
            hidden = self.c_fc(x, scratch.get("hidden", (*x.shape[:-1], self.c_fc.out_features), x))
            torch.ops.aten.gelu_(hidden, approximate=self.approximate)
            return self.drop(self.c_proj(hidden, out=residual, add=residual))  # dropout: eval, identity
        out = self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))
        return out if residual is None else residual + out


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        norm = (lambda: LayerNorm(cfg.n_embd, cfg.bias, cfg.ln_eps)) if cfg.layer_norm else nn.Identity
        self.ln_1 = norm()
        self.attn = CausalSelfAttention(cfg)
        if not cfg.attn_only:
            self.ln_2 = norm()
            self.mlp = MLP(cfg)
        self.attn_only = cfg.attn_only

    def forward(
        self, x: Tensor, need_pattern: bool = False, scratch: Scratch | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """The residual stream after this block.

        In eval mode without autograd, and with nothing watching its parts, the block takes
        its inference path: buffers reused across layers, residual adds fused into the
        projections. The result is a new tensor and ``x`` is left as it was, unless the
        caller's ``scratch.own_stream`` lets the block add into ``x``.
        """
        scratch = _scratch_for(self, scratch, need_pattern)
        if scratch is None:
            a, pattern = self.attn(self.ln_1(x), need_pattern)
            x = x + a
            if not self.attn_only:
                x = x + self.mlp(self.ln_2(x))
            return x, pattern
        out, _ = self.attn(self.ln_1(x), scratch=scratch, residual=x)  # nobody else holds out
        if not self.attn_only:
            out = self.mlp(self.ln_2(out), scratch=scratch, residual=out)  # added into out
        return out, None


# What the inference path knows the forward of; anything else swapped in is a wrapper.
_OWN_MODULES = (Block, CausalSelfAttention, MLP, LayerNorm, Linear, nn.Identity, nn.Dropout, nn.Embedding)


def _unwatched(module: nn.Module) -> bool:
    """Whether nothing can see inside ``module``: no forward hooks on its submodules (nor
    global ones), no ``forward`` replaced on an instance (nnsight and accelerate wrap modules
    that way, without hooks), no foreign module swapped in.

    Only then may its forward reuse buffers and add in place, which would otherwise change
    a tensor that a tool holds. Either way every submodule is called.
    """
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return False
    for m in module.modules():
        if m is module or isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            continue
        if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ or type(m) not in _OWN_MODULES:
            return False
    return True


def _scratch_for(module: nn.Module, scratch: Scratch | None, need_pattern: bool = False) -> Scratch | None:
    """The buffers ``module``'s forward may reuse, or None for its plain path.

    The inference path needs eval mode, no autograd and no attention rows asked for. A
    caller that passes ``scratch`` has checked :func:`_unwatched` over this module already.
    """
    if need_pattern or module.training or torch.is_grad_enabled():
        return None
    if scratch is not None:
        return scratch
    return Scratch() if _unwatched(module) else None


class GPT(nn.Module):
    """GPT-2-style decoder; parameter names match nanoGPT's ``model.py``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        norm = LayerNorm(cfg.n_embd, cfg.bias, cfg.ln_eps) if cfg.layer_norm else nn.Identity()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.rate("embd")),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=norm,
            )
        )
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.pos_embedding == "sinusoidal":
            with torch.no_grad():
                self.transformer.wpe.weight.copy_(sinusoidal_table(cfg.block_size, cfg.n_embd))
            self.transformer.wpe.weight.requires_grad_(False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: Int[Tensor, "batch seq"],
        need_patterns: bool = False,
        positions: Int[Tensor, " pos"] | slice | None = None,
    ) -> Float[Tensor, "batch pos vocab"] | tuple[Float[Tensor, "batch pos vocab"], list[Tensor]]:
        """Logits at every position (or only at ``positions``, e.g. the instruction slots
        that can hold reads); with ``need_patterns`` also each layer's attention pattern
        ``[batch, head, query, key]``.

        Every block is called as a module, so hooks and wrappers (nnsight) see it run. In
        eval mode without autograd (``torch.inference_mode`` / ``no_grad``) each block takes
        its inference path, which gives the same logits (to float rounding) faster.
        """
        x, patterns = self._blocks(idx, self.transformer.h, need_patterns)
        if positions is not None:
            x = x[:, positions]
        logits = self.lm_head(self.transformer.ln_f(x))
        return (logits, patterns) if need_patterns else logits

    def _blocks(
        self, idx: Int[Tensor, "batch seq"], blocks: nn.ModuleList, need_patterns: bool = False
    ) -> tuple[Float[Tensor, "batch seq d_model"], list[Tensor | None]]:
        """The residual stream after ``blocks``, each called as a module, and their patterns.

        When nothing watches the model the blocks share one :class:`Scratch` and one
        residual stream, added into in place.
        """
        t = idx.shape[1]
        if t > self.cfg.block_size:
            raise ValueError(f"sequence of length {t} exceeds block_size {self.cfg.block_size}")
        tr = self.transformer
        shared = _scratch_for(self, None, need_patterns)
        if shared is not None:
            shared.own_stream = True  # x below is this call's own; no hook or wrapper sees it
        x = tr.wte(idx)
        x = tr.drop(x.add_(tr.wpe.weight[:t]) if shared is not None else x + tr.wpe.weight[:t])
        patterns = []
        for block in blocks:
            x, pattern = (
                block(x, need_patterns, scratch=shared) if shared is not None else block(x, need_patterns)
            )
            patterns.append(pattern)
        return x, patterns

    @torch.inference_mode()
    def logits_at(
        self, idx: Int[Tensor, "batch seq"], query: Bool[Tensor, "batch seq"]
    ) -> Float[Tensor, "n vocab"]:
        """Logits at the positions where ``query`` is true (row-major order), for bulk scoring.

        Only reads are scored, and on a sparse sequence they are about 1% of the positions, so
        the last block runs its queries, attention output and MLP at those positions alone
        (keys and values still at every position). Same weights and operations as
        :meth:`forward`; the result equals ``forward(idx)[query]`` to float rounding.
        Falls back to the full forward when dropout needs it or when anything watches the
        model (hooks, wrappers), since the last block's own forward is not called.
        """
        per_row = query.sum(1)
        width = int(per_row.max()) if query.numel() else 0
        if self.training or not _unwatched(self) or width == 0 or 4 * width > idx.shape[1]:
            return self(idx)[query]
        cfg, tr = self.cfg, self.transformer
        b, t = idx.shape
        c, h = cfg.n_embd, cfg.n_head
        x, _ = self._blocks(idx, tr.h[:-1])
        last = tr.h[-1]
        attn = last.attn
        ln = last.ln_1(x)
        w_q, w_kv = attn.c_attn.weight[:c], attn.c_attn.weight[c:]
        b_q = b_kv = None
        if attn.c_attn.bias is not None:
            b_q, b_kv = attn.c_attn.bias[:c], attn.c_attn.bias[c:]
        k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in F.linear(ln, w_kv, b_kv).split(c, dim=2))
        # Each row's query positions, left-aligned and padded to the widest row.
        slot = torch.arange(width, device=idx.device)
        valid = slot[None, :] < per_row[:, None]
        pos = torch.zeros(b, width, dtype=torch.long, device=idx.device)
        pos[valid] = query.nonzero()[:, 1]
        rows = torch.arange(b, device=idx.device)[:, None]
        q = F.linear(ln[rows, pos], w_q, b_q).view(b, width, h, c // h).transpose(1, 2)
        mask = torch.arange(t, device=idx.device)[None, None, :] <= pos[:, :, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        y = y.transpose(1, 2).reshape(b, width, c)[valid]
        xq = x[rows, pos][valid] + attn.c_proj(y)
        if not last.attn_only:
            xq = xq + last.mlp(last.ln_2(xq))
        return self.lm_head(tr.ln_f(xq))
