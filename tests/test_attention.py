"""Attention at reads: exact categories, streaming extraction, top keys, read heads, the CLI.

Tests marked ``tl3`` also run on TransformerLens 3.x (``HookedTransformer``).
"""

from __future__ import annotations

import struct

import plotly.graph_objects as go
import pytest
import torch

from ffinterp.analysis.attention import (
    CATEGORIES,
    FUTURE,
    IGNORES,
    LAST_WRITE,
    OPPOSITE,
    READS,
    SAME,
    START,
    Labelled,
    ReadAttention,
    auto_batch_size,
    iter_read_attention,
    key_categories,
    last_write_mass,
    read_attention,
)
from ffinterp.analysis.readheads import name_by_effect
from ffinterp.cli import main
from ffinterp.data import iter_batches
from ffinterp.hooked import FFLModel
from ffinterp.language import Mix, from_text, reads, sample
from ffinterp.models.constructed import READ_HEAD, save_circuit
from ffinterp.models.gpt import GPT, GPTConfig

T = 64


@pytest.fixture(scope="module")
def random_model() -> FFLModel:
    """A small GPT far from init, so its attention is spread over many kinds of keys."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=T)).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return FFLModel.from_fast(gpt, device="cpu", name="random")


@pytest.fixture(scope="module")
def mixed_tokens() -> torch.Tensor:
    return torch.cat([sample(4, T, p, seed=3) for p in (0.1, 0.8, 0.98)])


@pytest.mark.tl3
def test_key_categories_by_hand():
    #         0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15
    tokens = from_text("w1w0i1r0w1w1i0r1")[None]
    rd = reads(tokens)
    assert rd.pos.tolist() == [6, 14] and rd.write_pos.tolist() == [2, 10]
    cat = key_categories(tokens, rd)
    S, LW, OP, SA, IG, RD, F = START, LAST_WRITE, OPPOSITE, SAME, IGNORES, READS, FUTURE
    assert cat[0].tolist() == [S, S, LW, LW, IG, IG, RD] + [F] * 9
    assert cat[1].tolist() == [S, S, OP, OP, IG, IG, RD, RD, SA, SA, LW, LW, IG, IG, RD, F]
    # When the opening write is the last write, it counts as the last write, not as start.
    opening = from_text("w1i0r1")[None]
    assert key_categories(opening, reads(opening))[0].tolist() == [LW, LW, IG, IG, RD, F]


@pytest.mark.tl3
def test_masses_partition_exactly_and_match_a_brute_force_count(random_model, mixed_tokens):
    ra = read_attention(random_model, mixed_tokens, batch_size=5)
    assert ra.mass.shape == (len(ra), 2, 4, len(CATEGORIES))
    assert torch.allclose(ra.mass.sum(-1), torch.ones(len(ra), 2, 4), atol=1e-5)
    assert (ra.mass > 1e-3).any(0).any(0).any(0).all()  # every category gets some mass somewhere
    # Brute force, key by key, for a sample of reads.
    for r in range(0, len(ra), 37):
        b, t, wp = int(ra.reads.batch[r]), int(ra.reads.pos[r]), int(ra.reads.write_pos[r])
        toks = ra.tokens[b].tolist()
        want = torch.zeros(2, 4, len(CATEGORIES))
        for k in range(t + 1):
            p = k - k % 2
            if p == wp:
                c = LAST_WRITE
            elif p == 0:
                c = START
            elif toks[p] == 0:
                c = SAME if toks[p + 1] == toks[wp + 1] else OPPOSITE
            elif toks[p] == 1:
                c = READS
            else:
                c = IGNORES
            want[:, :, c] += ra.rows[r, :, :, k]
        assert torch.allclose(ra.mass[r], want, atol=1e-6)
        assert ra.categories_of(r, 1, 2).keys() == set(CATEGORIES)


@pytest.mark.tl3
def test_rows_equal_the_fast_models_own_patterns(random_model, mixed_tokens):
    ra = read_attention(random_model, mixed_tokens)
    _, patterns = random_model.fast(mixed_tokens, need_patterns=True)
    rd = ra.reads
    want = torch.stack([p[rd.batch, :, rd.pos, :] for p in patterns], 1)
    assert torch.allclose(ra.rows, want, atol=1e-5)
    lw = want[torch.arange(len(rd)), :, :, rd.write_pos] + want[torch.arange(len(rd)), :, :, rd.write_pos + 1]
    assert torch.allclose(ra.last_write_mass, lw, atol=1e-5)


@pytest.mark.tl3
def test_streaming_does_not_depend_on_chunking(random_model, mixed_tokens):
    full = last_write_mass(random_model, mixed_tokens)
    one = last_write_mass(random_model, mixed_tokens, batch_size=1)
    assert torch.allclose(full, one, atol=1e-6)
    stream = iter_batches(10, 3, T, mix=Mix.ffl(0.8), seed=3)
    streamed = last_write_mass(random_model, stream)
    assert torch.allclose(streamed, last_write_mass(random_model, sample(10, T, 0.8, seed=3)), atol=1e-6)
    chunks = list(iter_read_attention(random_model, mixed_tokens, batch_size=4))
    assert len(chunks) == 3 and all(c.rows is None for c in chunks)
    joined = ReadAttention.concat(chunks)
    assert torch.allclose(joined.last_write_mass, full, atol=1e-6)
    assert torch.equal(joined.reads.batch, reads(mixed_tokens).batch)
    # The chunk size keeps one chunk's cached patterns within the budget.
    assert auto_batch_size(random_model, 512, memory_mb=64) == 64 * 2**20 // (2 * 4 * 512 * 512 * 4)


@pytest.mark.tl3
def test_top_keys_have_token_and_distance(random_model, mixed_tokens):
    ra = read_attention(random_model, mixed_tokens, top_k=5)
    rows = ra.rows.masked_fill(ra.rows < 0, 0)
    valid = ra.top_pos >= 0
    assert torch.equal(ra.top_mass[valid], rows.gather(-1, ra.top_pos.clamp_min(0))[valid])
    assert (ra.top_mass[..., :-1] >= ra.top_mass[..., 1:]).all()
    assert (ra.top_distance[valid] >= 0).all()
    assert ((ra.top_pos <= ra.reads.pos[:, None, None, None]) | ~valid).all()
    b = ra.reads.batch[:, None, None, None].expand_as(ra.top_pos)
    assert torch.equal(ra.top_token[valid], ra.tokens[b[valid], ra.top_pos[valid]])
    # A read at position 2 sees 3 keys: the remaining two slots are empty.
    early = from_text("w1r1" + "i0" * 30)[None]
    ra2 = read_attention(random_model, early, top_k=5)
    assert ra2.top_pos[0, 0, 0].tolist()[3:] == [-1, -1]
    top = ra2.top(0, 0, 0)
    assert len(top) == 3 and {t["pos"] for t in top} == {0, 1, 2}
    assert {t["token"] for t in top} == {"w", "1", "r"} and all(t["distance"] == 2 - t["pos"] for t in top)


@pytest.mark.tl3
def test_result_objects_show_and_plot(random_model, mixed_tokens):
    ra = read_attention(random_model, mixed_tokens[:2], read_heads=[(1, 0)])
    page = ra._repr_html_()
    assert all(c in page for c in CATEGORIES) and "L1H0 ★" in page
    fig = ra.plot(read=1)
    assert isinstance(fig, go.Figure) and len(fig.data) == 2
    lab = ra.labelled("last_write_mass")
    assert lab.dims == ("read", "layer", "head")
    one = lab.sel(read=0, layer=1)
    assert one.dims == ("head",) and torch.equal(one.values, ra.last_write_mass[0, 1])
    by_label = ra.labelled("mass").sel(category="start")
    assert torch.equal(by_label.values, ra.mass[..., START])
    summary = ra.head_summary()
    assert summary.shape == (8, len(CATEGORIES)) and "<table>" in summary._repr_html_()
    assert isinstance(lab.mean("read").plot(), go.Figure)
    with pytest.raises(KeyError):
        lab.sel(category="x")
    with pytest.raises(ValueError):
        Labelled(torch.zeros(2, 3), ("a",))


def test_name_by_effect_rule():
    effect = torch.tensor([[0.1, 0.7], [0.9, float("nan")]])
    assert name_by_effect(effect, 0.5) == ([(1, 0), (0, 1)], True)
    assert name_by_effect(effect, 0.95) == ([(1, 0)], False)  # none pass: the best, flagged
    assert name_by_effect(effect, 0.5, top=1) == ([(1, 0)], True)


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def circuit_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("circuit") / "ckpt.pt"
    save_circuit(path, 1000.0, block_size=T)
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(["attention", *map(str, args)])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_cli_prints_the_read_heads_and_writes_a_png(circuit_ckpt, tmp_path, capsys):
    seq = "w1w0i1r0w1w1i0r1" + "i0" * 23 + "r1"
    png = tmp_path / "grid.png"
    code, out, err = run_cli(capsys, circuit_ckpt, "--seq", seq, "--all-heads", "--read", "all", "--out", png)
    assert code == 0, err
    assert "read heads: L1H0" in out and "wrote" in out
    lines = [ln.split() for ln in out.splitlines() if ln.split()[:1] in (["0"], ["1"], ["2"])]
    assert [ln[1] for ln in lines] == ["6", "14", "62"]  # pos of each read
    assert all(float(ln[6]) > 0.99 for ln in lines)  # L1H0's last_write_mass
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24])[0] > 300


def test_cli_defaults_to_a_sparse_sequence_and_html(circuit_ckpt, tmp_path, capsys):
    code, out, err = run_cli(
        capsys, circuit_ckpt, "--layer", "0", "--head", "0", "--out", tmp_path / "h.html"
    )
    assert code == 0, err
    assert "sampled sparse FFL(0.98), seed 0" in out and "L0H0" in out
    assert (tmp_path / "h.html").stat().st_size > 1_000_000


@pytest.mark.tl3
@pytest.mark.parametrize(
    "args, message",
    [
        (["--seq", "w1i0r0"], "read bit '0' contradicts the last write"),
        (["--seq", "w1i0x1r1"], "unknown character 'x'"),
        (["--seq", "w1i0r1" * 20], "takes at most 64"),
        (["--layer", "1"], "--layer and --head go together"),
        (["--layer", "5", "--head", "0"], "the model has 2 layers"),
        (["--out", "x.gif"], "unknown figure format"),
        (["--seq", "w1r1", "--read", "3"], "--read 3: the sequence has 1 read (use 0..0"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(circuit_ckpt, capsys, args, message):
    code, out, err = run_cli(capsys, circuit_ckpt, *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.tl3
def test_cli_circuit_read_head_is_detected(circuit_ckpt, capsys):
    code, out, _ = run_cli(capsys, circuit_ckpt, "--seq", "w0i1w1r1", "--ref-n", "8")
    assert code == 0
    first = out.splitlines()[2]
    assert first.startswith(f"read heads: L{READ_HEAD[0]}H{READ_HEAD[1]}")
