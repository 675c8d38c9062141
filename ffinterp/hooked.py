"""One FFL model, two views: the fast model for bulk work, the hooked model for analysis.

:class:`FFLModel` holds the fast ``nn.Module`` (which trains and scores millions of reads)
and, for transformers, a TransformerLens hooked model on the same weights (which exposes
activations for attention, patching and glitch diagnosis). The hooked model comes from
:mod:`ffinterp.tl_seam`, so it is a ``TransformerBridge`` on TransformerLens 4.x and a
``HookedTransformer`` on 3.x; code here uses only what both share.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ffinterp import language
from ffinterp.device import resolve_device
from ffinterp.models.gpt import GPT
from ffinterp.models.lstm import LSTM
from ffinterp.scoring import ReadScores, rows_per_pass, score_tokens
from ffinterp.tl_seam import TL_LINE, build_hooked

TokensOrText = str | list[str] | tuple[str, ...] | Int[Tensor, "*batch seq"]


class FFLModel:
    """A flip-flop model with its fast view (``.fast``) and hooked view (``.hooked``).

    ``.hooked`` is ``None`` for the LSTM, which has no attention to analyse; its reads are
    scored with the fast model.
    """

    def __init__(
        self,
        fast: nn.Module,
        hooked: nn.Module | None,
        *,
        arch: str,
        device: torch.device,
        meta: dict | None = None,
        name: str = "model",
        source: str = "memory",
    ) -> None:
        self.fast = fast
        self.hooked = hooked
        self.cfg = fast.cfg
        self.arch = arch
        self.device = device
        self.meta = meta or {}
        self.name = name
        self.source = source

    # ------------------------------------------------------------ constructors

    @classmethod
    def from_fast(
        cls,
        model: nn.Module,
        device: str | torch.device = "auto",
        name: str = "model",
        meta: dict | None = None,
        source: str = "memory",
        **tl3_options: bool,
    ) -> FFLModel:
        """Wrap a fast GPT or LSTM, building the hooked view on the same weights.

        The hooked model gets a copy of the weights as they are now; rebuild after training.
        ``tl3_options`` (``use_attn_result`` ...) go to :func:`ffinterp.tl_seam.build_hooked`.
        """
        dev = resolve_device(device)
        model = model.to(dev).eval()
        if isinstance(model, GPT):
            hooked = build_hooked(model.cfg, model.state_dict(), dev, **tl3_options)
            arch = "gpt"
        elif isinstance(model, LSTM):
            if any(tl3_options.values()):
                raise ValueError("hooked-model options do not apply to an LSTM (it has no hooked view)")
            hooked, arch = None, "lstm"
        else:
            raise TypeError(f"expected an ffinterp GPT or LSTM, got {type(model).__name__}")
        return cls(model, hooked, arch=arch, device=dev, meta=meta, name=name, source=source)

    # ------------------------------------------------------------ shape of the model

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layer

    @property
    def n_heads(self) -> int:
        """Attention heads per layer (0 for the LSTM)."""
        return getattr(self.cfg, "n_head", 0)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.fast.parameters())

    @property
    def tl_line(self) -> str:
        return TL_LINE if self.hooked is not None else "none (LSTM)"

    # ------------------------------------------------------------ tokens

    def to_tokens(self, text: str | list[str] | tuple[str, ...]) -> Int[Tensor, "*batch seq"]:
        """The dataset's text (``'w1i0r1'``) to token ids on the model's device."""
        return language.from_text(text).to(self.device)

    def to_text(self, tokens: Int[Tensor, "*batch seq"]) -> str | list[str]:
        """Token ids back to the dataset's text; a batch gives a list."""
        return language.to_text(tokens)

    def _as_batch(self, tokens_or_text: TokensOrText) -> Int[Tensor, "batch seq"]:
        if isinstance(tokens_or_text, (str, list, tuple)):
            tokens = language.from_text(tokens_or_text)
        else:
            tokens = torch.as_tensor(tokens_or_text)
        return tokens[None] if tokens.ndim == 1 else tokens

    # ------------------------------------------------------------ logits and reads

    @torch.no_grad()
    def fast_logits(self, tokens: TokensOrText) -> Float[Tensor, "batch seq vocab"]:
        """Logits of the fast model (the view for bulk scoring), no gradients."""
        return self._in_passes(self.fast, tokens)

    @torch.no_grad()
    def hooked_logits(self, tokens: TokensOrText) -> Float[Tensor, "batch seq vocab"]:
        """Logits of the hooked model, which must equal :meth:`fast_logits` (see the README
        for the tolerance)."""
        if self.hooked is None:
            raise ValueError(f"{self.name}: an LSTM has no hooked view")
        return self._in_passes(self.hooked, tokens)

    def _in_passes(self, forward: nn.Module, tokens: TokensOrText) -> Float[Tensor, "batch seq vocab"]:
        """``forward`` over the batch in passes of :func:`rows_per_pass` rows: the logits are
        the whole batch's, the activations only one pass's."""
        batch = self._as_batch(tokens)
        rows = rows_per_pass(forward, batch.shape[1])
        return torch.cat([forward(chunk.to(self.device)) for chunk in batch.split(rows)])

    def predict_reads(self, tokens_or_text: TokensOrText) -> ReadScores:
        """For every read: the predicted token, p(correct bit) and the margin (on CPU).

        Uses the hooked model, the analysis view, so these are the numbers that attention
        and patching results explain; the LSTM uses its fast model. Any number of sequences:
        they run in passes of bounded memory, keeping only the logits at reads.
        """
        forward = self.hooked if self.hooked is not None else self.fast
        return score_tokens(forward, self._as_batch(tokens_or_text), device=self.device)

    # ------------------------------------------------------------ display

    def summary(self) -> dict[str, Any]:
        """What the notebook table and ``repr`` show."""
        if self.arch == "gpt":
            shape = f"{self.cfg.n_layer} / {self.cfg.n_head} / {self.cfg.n_embd}"
        else:
            shape = f"{self.cfg.n_layer} / - / {self.cfg.hidden}"
        return {
            "name": self.name,
            "arch": self.arch,
            "layers / heads / d_model": shape,
            "params": f"{self.num_params:,}",
            "TransformerLens": self.tl_line,
            "device": str(self.device),
        }

    def __repr__(self) -> str:
        s = self.summary()
        return (
            f"FFLModel({s['name']!r}, arch={s['arch']}, layers/heads/d={s['layers / heads / d_model']}, "
            f"params={s['params']}, hooked={s['TransformerLens']}, device={s['device']})"
        )

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
            f"{html.escape(str(v))}</td></tr>"
            for k, v in self.summary().items()
        )
        return f"<table class='ffinterp-model'>{rows}</table>"


def _name_of(spec: str | os.PathLike, path: Path) -> str:
    text = str(spec)
    if text.startswith("pretrained:"):
        return text
    if path.name in ("ckpt.pt", "") or path.is_dir():
        return path.resolve().name if path.is_dir() else path.resolve().parent.name
    return path.stem


def load_model(path_or_name: str | os.PathLike, device: str = "auto", **tl3_options: bool) -> FFLModel:
    """Load a checkpoint (ffinterp, nanoGPT ``ckpt.pt``, HF GPT-2 folder or ``pretrained:NAME``)
    into an :class:`FFLModel` with both views on ``device`` (``auto``: CUDA if present)."""
    from ffinterp.checkpoints import load_checkpoint
    from ffinterp.pretrained import resolve

    path = resolve(path_or_name)
    loaded = load_checkpoint(path)
    return FFLModel.from_fast(
        loaded.model,
        device=device,
        name=_name_of(path_or_name, path),
        meta=loaded.meta,
        source=loaded.source,
        **tl3_options,
    )
