"""The paper's recurrent baseline: one LSTM layer of 128 units, which does not glitch.

It shares the fast model's interface (tokens in, logits at every position out), so
training, evaluation and the glitch finder treat it like any other model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from jaxtyping import Float, Int
from torch import Tensor, nn

from ffinterp.language import VOCAB_SIZE


@dataclass
class LSTMConfig:
    hidden: int = 128
    n_layer: int = 1
    vocab_size: int = VOCAB_SIZE
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LSTMConfig:
        return cls(**{k: d[k] for k in ("hidden", "n_layer", "vocab_size", "dropout") if k in d})


class LSTM(nn.Module):
    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.lstm = nn.LSTM(cfg.hidden, cfg.hidden, num_layers=cfg.n_layer, batch_first=True)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch seq vocab"]:
        out, _ = self.lstm(self.embed(idx))
        return self.head(out)
