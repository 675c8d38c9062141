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
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.rate("resid"))
        self.attn_p = cfg.rate("attn")

    def forward(self, x: Tensor, need_pattern: bool = False) -> tuple[Tensor, Tensor | None]:
        b, t, c = x.shape
        h = self.cfg.n_head
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))
        pattern = None
        if need_pattern:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // h)
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            pattern = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            y = F.dropout(pattern, self.attn_p, self.training) @ v
        else:
            p = self.attn_p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.resid_drop(self.c_proj(y)), pattern


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.rate("resid"))
        self.approximate = "tanh" if cfg.activation == "gelu_new" else "none"

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


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

    def forward(self, x: Tensor, need_pattern: bool = False) -> tuple[Tensor, Tensor | None]:
        a, pattern = self.attn(self.ln_1(x), need_pattern)
        x = x + a
        if not self.attn_only:
            x = x + self.mlp(self.ln_2(x))
        return x, pattern


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
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
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

        In eval mode without autograd (``torch.inference_mode`` / ``no_grad``) the trunk runs
        :meth:`_inference_trunk`, which gives the same logits (to float rounding) faster.
        """
        t = idx.shape[1]
        if t > self.cfg.block_size:
            raise ValueError(f"sequence of length {t} exceeds block_size {self.cfg.block_size}")
        tr = self.transformer
        patterns = []
        if not (need_patterns or self.training or torch.is_grad_enabled() or self._hooked_modules()):
            x = self._inference_trunk(idx)
        else:
            x = tr.drop(tr.wte(idx) + tr.wpe.weight[:t])
            for block in tr.h:
                x, pattern = block(x, need_patterns)
                patterns.append(pattern)
        if positions is not None:
            x = x[:, positions]
        logits = self.lm_head(tr.ln_f(x))
        return (logits, patterns) if need_patterns else logits

    @torch.inference_mode()
    def logits_at(
        self, idx: Int[Tensor, "batch seq"], query: Bool[Tensor, "batch seq"]
    ) -> Float[Tensor, "n vocab"]:
        """Logits at the positions where ``query`` is true (row-major order), for bulk scoring.

        Only reads are scored, and on a sparse sequence they are about 1% of the positions, so
        the last block runs its queries, attention output and MLP at those positions alone
        (keys and values still at every position). Same weights and operations as
        :meth:`forward`; the result equals ``forward(idx)[query]`` to float rounding.
        Falls back to the full forward when hooks, dropout or autograd need it.
        """
        per_row = query.sum(1)
        width = int(per_row.max()) if query.numel() else 0
        if self.training or self._hooked_modules() or width == 0 or 4 * width > idx.shape[1]:
            return self(idx)[query]
        cfg, tr = self.cfg, self.transformer
        b, t = idx.shape
        c, h = cfg.n_embd, cfg.n_head
        x = self._inference_trunk(idx, skip_last=True)
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

    def _hooked_modules(self) -> bool:
        """Whether module hooks are registered, which the inference trunk would bypass."""
        from torch.nn.modules import module as torch_module

        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.transformer.h.modules())

    def _inference_trunk(
        self, idx: Int[Tensor, "batch seq"], skip_last: bool = False
    ) -> Float[Tensor, "batch seq d_model"]:
        """The residual stream after the last block (before it, with ``skip_last``), for eval
        mode without autograd.

        Same weights and operations as the blocks' forward, rearranged for CPU speed (the
        bulk-scoring path: evaluation and glitch search). Each layer writes into buffers
        reused across layers instead of allocating ~100 MB tensors the OS must zero again;
        the residual adds are GEMM accumulations in place (``addmm_``); GELU runs in place.
        Differences from the training path are float rounding (~1e-7), not approximations.
        """
        cfg, tr = self.cfg, self.transformer
        b, t = idx.shape
        c, h = cfg.n_embd, cfg.n_head
        x = tr.wte(idx)
        x += tr.wpe.weight[:t]
        flat = x.view(b * t, c)
        buffers: dict[str, Tensor] = {}
        for block in tr.h[:-1] if skip_last else tr.h:
            attn = block.attn
            qkv = _linear_into(block.ln_1(flat), attn.c_attn, buffers, "qkv")
            q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in qkv.view(b, t, 3 * c).split(c, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            merged = _buffer(buffers, "merged", (b * t, c), flat)
            merged.view(b, t, h, c // h).copy_(y.transpose(1, 2))
            del y
            _add_linear_(flat, merged, attn.c_proj)
            if not block.attn_only:
                mlp = block.mlp
                hidden = _linear_into(block.ln_2(flat), mlp.c_fc, buffers, "hidden")
                torch.ops.aten.gelu_(hidden, approximate=mlp.approximate)
                _add_linear_(flat, hidden, mlp.c_proj)
        return x


def _buffer(buffers: dict[str, Tensor], key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A scratch tensor reused by every layer of one inference forward."""
    buf = buffers.get(key)
    if buf is None or buf.shape != shape:
        buf = buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf


def _linear_into(x: Tensor, lin: nn.Linear, buffers: dict[str, Tensor], key: str) -> Tensor:
    """``lin(x)`` for 2-D ``x``, written into a reused buffer (same kernel as ``F.linear``)."""
    out = _buffer(buffers, key, (x.shape[0], lin.out_features), x)
    if lin.bias is None:
        return torch.mm(x, lin.weight.t(), out=out)
    return torch.addmm(lin.bias, x, lin.weight.t(), out=out)


def _add_linear_(residual: Tensor, x: Tensor, lin: nn.Linear) -> None:
    """``residual += lin(x)`` in place: the GEMM accumulates straight into the stream."""
    residual.addmm_(x, lin.weight.t())
    if lin.bias is not None:
        residual.add_(lin.bias)
