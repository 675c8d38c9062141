"""Model definitions: the fast transformer, the LSTM baseline, the hand-built circuit."""

from ffinterp.models.gpt import GPT, PRESETS, GPTConfig, preset
from ffinterp.models.lstm import LSTM, LSTMConfig

__all__ = ["GPT", "GPTConfig", "LSTM", "LSTMConfig", "PRESETS", "preset"]
