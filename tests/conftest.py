"""Shared fixtures. Each block belongs to the tests named beside it; add new ones, keep them additive."""

from __future__ import annotations

import pytest

# ---------------------------------------------------------------- trained_tiny (test_attention)

#: A tiny GPT trained briefly on FFL(0.8) at T=64: long enough for a read head to form
#: (the attention tests check that the head found is stable across two sets).
TRAINED_TINY = dict(
    preset="tiny",
    seq_len=64,
    steps=300,
    batch_size=32,
    lr=3e-3,
    warmup=20,
    eval_every=0,
    ckpt_every=0,
    seed=0,
    device="cpu",
)


@pytest.fixture(scope="session")
def trained_tiny_path(tmp_path_factory):
    """``ckpt.pt`` of the tiny model above, trained once per test session."""
    import torch

    from ffinterp.train import TrainConfig, train

    out = tmp_path_factory.mktemp("trained_tiny")
    # One thread: a tiny model gains nothing from more, and on a shared or xdist-loaded
    # machine several threads spin against each other (10x the CPU time per step).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(TrainConfig(**TRAINED_TINY), out, progress=False).path
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_tiny(trained_tiny_path):
    """The trained tiny model as an :class:`~ffinterp.hooked.FFLModel` on CPU."""
    from ffinterp.hooked import load_model

    return load_model(trained_tiny_path, device="cpu")
