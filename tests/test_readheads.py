"""Read heads named by effect, checked with plain TransformerLens hooks; carriers; circuits.

The reference computations here use only ``run_with_cache``/``run_with_hooks`` and hook
names, never ffinterp's patching code, so a bug there cannot hide itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ffinterp.analysis.readheads import FlipBatch, detect_read_heads, flip_batch, offset_mass
from ffinterp.data import eval_set
from ffinterp.hooked import load_model
from ffinterp.language import ONE, ZERO, reads
from ffinterp.models.constructed import PREV_TOKEN_HEAD, READ_HEAD, circuit_model

INDEX = Path(__file__).parents[1] / "ffinterp" / "pretrained" / "index.json"
TRANSFORMERS = [m["name"] for m in json.loads(INDEX.read_text())["models"] if m["arch"] != "lstm"]


def _logit_diff(logits, fb):
    rows = torch.arange(len(fb))
    at = logits[rows, fb.read_pos]
    return at[rows, fb.clean_bit] - at[rows, ZERO + ONE - fb.clean_bit]


def plain_effects(model, fb) -> torch.Tensor:
    """Share of the logit difference restored by each head's clean ``hook_z`` at the read."""
    hk = model.hooked
    names = [f"blocks.{l}.attn.hook_z" for l in range(model.n_layers)]
    rows = torch.arange(len(fb))
    with torch.no_grad():
        lc, cache = hk.run_with_cache(fb.clean, names_filter=names)
        lx = hk(fb.corrupted)
        c, x = _logit_diff(lc, fb), _logit_diff(lx, fb)
        out = torch.zeros(model.n_layers, model.n_heads)
        for l, name in enumerate(names):
            for h in range(model.n_heads):

                def put(z, hook, h=h, clean=cache[name]):
                    z[rows, fb.read_pos, h] = clean[rows, fb.read_pos, h]
                    return z

                p = _logit_diff(hk.run_with_hooks(fb.corrupted, fwd_hooks=[(name, put)]), fb)
                out[l, h] = (p - x).sum() / (c - x).sum()
    return out


@pytest.mark.tl3
@pytest.mark.parametrize("name", TRANSFORMERS)
def test_the_named_read_head_is_the_one_that_carries_the_answer(name):
    """On every shipped transformer: the head ffinterp names restores the most of the logit
    difference by plain hooks, more than half of it, and ffinterp's effects equal them."""
    model = load_model(f"pretrained:{name}", device="cpu")
    T = model.cfg.block_size
    n = 8 if T > 128 else 16
    rh = detect_read_heads(model, "in", None, n=n, circuit=False)
    fb = flip_batch(eval_set("in", n, T))
    plain = plain_effects(model, fb)
    best = divmod(int(plain.flatten().argmax()), model.n_heads)
    assert rh.heads[0] == best, (name, plain, rh.table())
    assert float(plain[best]) > 0.5 and rh.passed
    assert torch.allclose(rh.effect, plain, atol=1e-3), (rh.effect, plain)


def test_on_the_trained_models_the_head_on_the_w_token_carries_nothing():
    """What the attention-only story got wrong, kept as a fact: glitchy-128's L1H2 puts about
    all its attention on the last write's w token and restores nothing; the read head L1H0
    looks at the token after the bit (its carrier, +2)."""
    model = load_model("pretrained:glitchy-128", device="cpu")
    rh = detect_read_heads(model, "in", "sparse", n=32, circuit=False)
    assert rh.heads == [(1, 0)] and rh.carrier == 2
    assert float(rh.write_mass[1, 2]) > 0.9 and abs(float(rh.effect[1, 2])) < 0.05
    assert float(rh.offsets[1, 0, 2]) > 0.5 and float(rh.offsets[1, 0, :2].sum()) < 0.2
    assert rh.stable, rh.table()
    # ...yet the read needs it: a companion that looks at the w token. Checked by hand: mean-
    # ablating L1H2's output at the read (plain hooks) loses over half the logit difference.
    assert rh.companions == {(1, 2): 0}, rh.table()
    fb = flip_batch(eval_set("in", 32, 128))
    rows = torch.arange(32)
    name = "blocks.1.attn.hook_z"
    with torch.no_grad():
        lc, cache = model.hooked.run_with_cache(fb.clean, names_filter=[name])
        mean = cache[name][rows, fb.read_pos, 2].mean(0)

        def ablate(z, hook):
            z[rows, fb.read_pos, 2] = mean
            return z

        la = model.hooked.run_with_hooks(fb.clean, fwd_hooks=[(name, ablate)])
    c, a = _logit_diff(lc, fb), _logit_diff(la, fb)
    assert float((c - a).sum() / c.sum()) == pytest.approx(float(rh.needed[1, 2]), abs=1e-3)
    assert float(rh.needed[1, 2]) > 0.5
    text = rh.table()
    assert text.index("restored") < text.index("by offset from the last write")  # causal table first


def test_offset_mass_bins_exactly():
    rows = torch.zeros(1, 1, 1, 16)
    rows[0, 0, 0, [1, 4, 5, 6, 14]] = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    m = offset_mass(rows, torch.tensor([14]), torch.tensor([4]))[0, 0, 0]
    # keys 1 (before), 4 (w), 5 (bit), 6 (+2), 14 (+10: later)
    assert m.tolist() == pytest.approx([0.2, 0.3, 0.15, 0, 0, 0, 0, 0, 0.25, 0.1])


def test_flip_batch_flips_the_last_write_of_one_read_per_sequence():
    x = eval_set("in", 32, 64)
    fb = flip_batch(x, seed=3)
    rows = torch.arange(32)
    assert torch.equal(x[rows, fb.write_pos + 1], fb.clean_bit)
    assert torch.equal(fb.corrupted[rows, fb.write_pos + 1], ZERO + ONE - fb.clean_bit)
    rc = reads(fb.corrupted)  # the flipped rows are valid, relabelled sequences
    assert torch.equal(fb.corrupted[rc.batch, rc.pos + 1], rc.bit)
    assert (fb.write_pos >= 2).float().mean() > 0.9  # reads past the opening write first
    assert torch.equal(flip_batch(x, seed=3).read_pos, fb.read_pos)


@pytest.mark.tl3
def test_circuit_summary_recovers_the_hand_built_wiring():
    """The circuit's read head reads the bit token itself (carrier = bit); no earlier head
    carries the bit there, and the previous-token head tells it where the writes are (its
    mark reaches the read head's keys)."""
    model = circuit_model(block_size=64)
    rh = detect_read_heads(model, "in", "sparse", n=16, seq_len=64, circuit_pairs=6)
    assert rh.heads == [READ_HEAD] and rh.carrier == 1 and rh.stable
    c = rh.circuit
    assert c.main_sender is None and max(c.value_senders.values()) < 0.05
    prev = f"L{PREV_TOKEN_HEAD[0]}H{PREV_TOKEN_HEAD[1]}"
    assert c.position_senders[prev]["k"] > 0.9
    assert "its own embedding" in str(c) and "<li>" in c._repr_html_()


def _plain_path_v(model, pair, sender, receiver) -> float:
    """Path patching sender -> receiver via v on one pair, by hand, for a 2-layer model: the
    corrupted run with the sender's z clean gives the receiver's values; the corrupted run with
    only those values put in gives the logit difference."""
    fb = FlipBatch(
        pair.clean[None], pair.corrupted[None], torch.tensor([pair.read_pos]),
        torch.tensor([pair.write_pos]), torch.tensor([pair.clean_bit]),
    )  # fmt: skip
    hk = model.hooked
    zs, vs = f"blocks.{sender[0]}.attn.hook_z", f"blocks.{receiver[0]}.attn.hook_v"
    with torch.no_grad():
        lc, cache = hk.run_with_cache(fb.clean, names_filter=[zs])
        lx = hk(fb.corrupted)
        rec = {}

        def put_z(z, hook):
            z[:, :, sender[1]] = cache[zs][:, :, sender[1]]
            return z

        def grab(v, hook):
            rec["v"] = v.clone()
            return v

        hk.run_with_hooks(fb.corrupted, fwd_hooks=[(zs, put_z), (vs, grab)])

        def put_v(v, hook):
            v[:, :, receiver[1]] = rec["v"][:, :, receiver[1]]
            return v

        lp = hk.run_with_hooks(fb.corrupted, fwd_hooks=[(vs, put_v)])
    c, x, p = (float(_logit_diff(t, fb)[0]) for t in (lc, lx, lp))
    return (p - x) / (c - x)


@pytest.mark.slow
def test_circuit_summary_agrees_with_path_patching_by_hand_on_a_trained_model():
    from ffinterp.analysis.pairs import flip_last_write

    model = load_model("pretrained:glitchy-128", device="cpu")
    x = eval_set("in", 4, 128)
    rh = detect_read_heads(model, x, None, n=4, circuit_pairs=4)
    c = rh.circuit
    assert c.read_head == (1, 0) and c.main_sender == "L0H0"
    by_hand = [_plain_path_v(model, flip_last_write(seq), (0, 0), (1, 0)) for seq in x]
    assert c.value_senders["L0H0"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-3), by_hand
    assert c.value_senders["L0H0"] > 0.8
    assert c.sender_offsets["bit"] > 0.02  # from the carrier, L0H0 looks at the last write's bit
