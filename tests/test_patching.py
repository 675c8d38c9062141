"""Causal patching: pairs, metrics, batched activation patching, path and attribution
patching, ablations, result objects and the ``ffinterp patch`` command.

Ground truth comes from two places: ``transformer_lens.patching`` (the same sweeps, one
forward pass per site) on a random model, and the hand-built circuit, whose read head and
previous-token head are known by construction. Tests marked ``tl3`` also run on
TransformerLens 3.x (``HookedTransformer``).
"""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
from transformer_lens import patching as tlp

from ffinterp.analysis.ablation import ablate_edges, ablate_heads, ablate_mlps
from ffinterp.analysis.attribution import attribution_patch, compare_attribution
from ffinterp.analysis.pairs import (
    Pair,
    custom_pair,
    flip_last_write,
    ignore_last_write,
    make_pair,
    move_last_write,
    read_positions,
    relabel,
)
from ffinterp.analysis.patching import activation_patch, patch_metric, path_patch
from ffinterp.analysis.results import PatchResult
from ffinterp.errors import FFInterpError
from ffinterp.hooked import FFLModel
from ffinterp.language import I, W, read_mask, sample, to_text, validate
from ffinterp.models.constructed import PREV_TOKEN_HEAD, READ_HEAD, circuit_model, save_circuit
from ffinterp.models.gpt import GPT, GPTConfig

T = 32
TOL = 1e-5


def random_gpt(seed: int = 0, **kw) -> GPT:
    """A small GPT pushed far from init, so every site has a visible effect."""
    torch.manual_seed(seed)
    cfg = GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 64, **kw})
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def rand() -> FFLModel:
    return FFLModel.from_fast(random_gpt(), device="cpu", name="random")


@pytest.fixture(scope="module")
def linear() -> FFLModel:
    """Three attention-only layers without LayerNorm: the logits are linear in head outputs,
    and a receiver's input is the residual sum (closed forms for path and attribution)."""
    return FFLModel.from_fast(random_gpt(seed=4, n_layer=3, attn_only=True, layer_norm=False), device="cpu")


@pytest.fixture(scope="module")
def circuit() -> FFLModel:
    return circuit_model(block_size=64)


@pytest.fixture(scope="module")
def flip(rand: FFLModel) -> Pair:
    return best_pair(rand, flip_last_write)


def best_pair(model: FFLModel, build, seq_len: int = T, n: int = 8, seed: int = 3) -> Pair:
    """The sampled pair whose clean and corrupted logit differences are furthest apart,
    so the normalised metric is well conditioned."""
    best, gap = None, -1.0
    for row in sample(n, seq_len, p_i=0.5, seed=seed):
        try:
            pair = build(row)
            m = patch_metric(model, pair)
        except FFInterpError:
            continue
        if abs(m.clean - m.corrupted) > gap:
            best, gap = pair, abs(m.clean - m.corrupted)
    assert best is not None
    return best


# ---------------------------------------------------------------- pairs


def _same_frame(pair: Pair) -> None:
    assert pair.clean.shape == pair.corrupted.shape
    assert read_positions(pair.clean) == read_positions(pair.corrupted)
    validate(pair.corrupted, labelled=True)


@pytest.mark.tl3
def test_flip_last_write_flips_only_that_bit_and_relabels_reads() -> None:
    last = flip_last_write("w1i0w0i1r0i1r0w1r1")  # default: the last read
    assert last.read_pos == 16 and last.corrupted_text == "w1i0w0i1r0i1r0w0r0"
    pair = flip_last_write("w1i0w0i1r0i1r0w1r1", read=1)
    assert pair.read_pos == 12 and pair.write_pos == 4
    # every read of that write is relabelled; later writes and their reads stay
    assert pair.corrupted_text == "w1i0w1i1r1i1r1w1r1"
    assert pair.answer_changes and pair.first_diff == 5
    _same_frame(pair)


@pytest.mark.tl3
def test_ignore_and_move_last_write() -> None:
    ign = ignore_last_write("w1i0w0i1r0")
    assert ign.corrupted_text == "w1i0i0i1r1" and ign.corrupted_write_pos == 0
    _same_frame(ign)
    mv = move_last_write("w1i0i1w0i1w1i0r1")
    # the last write (w1 at 10) jumps before the previous write (w0 at 6), onto the ignore at 4
    assert mv.corrupted_text == "w1i0w1w0i1i1i0r0"
    assert mv.corrupted_write_pos == 6 and mv.corrupted_bit != mv.clean_bit
    assert sorted(mv.clean[0::2].tolist()) == sorted(mv.corrupted[0::2].tolist())
    _same_frame(mv)
    same = move_last_write("w1i0i1w0i1w1i0r1", to=8, require_change=False)
    assert same.corrupted_text == "w1i0i1w0w1i1i0r1" and not same.answer_changes


@pytest.mark.tl3
@pytest.mark.parametrize("kind", ["flip-last-write", "ignore-last-write", "move-last-write"])
def test_pairs_on_sampled_sequences_stay_valid(kind: str) -> None:
    made = 0
    for row in sample(64, 64, p_i=0.6, seed=1):
        try:
            pair = make_pair(row, kind)
        except FFInterpError:
            continue
        made += 1
        _same_frame(pair)
        assert pair.answer_changes
        assert torch.equal(pair.clean, row)
        assert read_mask(pair.corrupted[None])[0, pair.read_pos]
    assert made >= 32


@pytest.mark.tl3
def test_pair_errors_are_one_line() -> None:
    cases = [
        (lambda: ignore_last_write("w1r1i0r1"), "no earlier write"),
        (lambda: move_last_write("w1i0w0r0"), "no ignore slot"),
        (lambda: move_last_write("w1i0i1w0i1w1i0r1", to=6), "not an ignore"),
        (lambda: flip_last_write("w1r1", read=5), "out of range"),
        (lambda: custom_pair("w1r1", "w1i0r1"), "lengths differ"),
        (lambda: custom_pair("w1i0r1", "w1r1r1"), "reads differ"),
        (lambda: custom_pair("w1r1", "w1r0"), "contradicts"),
        (lambda: make_pair("w1r1", "swap"), "unknown corruption"),
    ]
    for call, text in cases:
        with pytest.raises(FFInterpError, match=text) as e:
            call()
        assert "\n" not in str(e.value)


@pytest.mark.tl3
def test_relabel_makes_reads_repeat_the_last_write() -> None:
    tokens = sample(8, 32, p_i=0.3, seed=2)
    broken = tokens.clone()
    broken[:, 0::2] = torch.where(broken[:, 0::2] == W, I, broken[:, 0::2])
    broken[:, 0] = W
    for row in relabel(broken):
        validate(row, labelled=True)


# ---------------------------------------------------------------- metric


@pytest.mark.tl3
@pytest.mark.parametrize("metric", ["logit_diff", "prob", "ce"])
def test_metric_is_one_on_clean_and_zero_on_corrupted(rand: FFLModel, flip: Pair, metric: str) -> None:
    pair = flip
    m = patch_metric(rand, pair, metric)
    logits = rand.hooked_logits(pair.tokens())
    assert torch.allclose(m(logits), torch.tensor([1.0, 0.0]), atol=1e-5)
    with pytest.raises(FFInterpError, match="same"):
        patch_metric(rand, custom_pair(pair.clean, pair.clean), metric)


# ---------------------------------------------------------------- equality with TransformerLens

# Every one of these runs on the TransformerLens 4.x native bridge as well as on 3.x's
# HookedTransformer (checked on 4.3 and 3.9), so no per-site fallback loop is needed.
TL_SWEEPS = [
    ("resid_pre", True, tlp.get_act_patch_resid_pre),
    ("attn_out", True, tlp.get_act_patch_attn_out),
    ("mlp_out", True, tlp.get_act_patch_mlp_out),
    ("z", True, tlp.get_act_patch_attn_head_out_by_pos),
    ("z", False, tlp.get_act_patch_attn_head_out_all_pos),
    ("q", True, tlp.get_act_patch_attn_head_q_by_pos),
    ("k", True, tlp.get_act_patch_attn_head_k_by_pos),
    ("v", True, tlp.get_act_patch_attn_head_v_by_pos),
    ("q", False, tlp.get_act_patch_attn_head_q_all_pos),
    ("k", False, tlp.get_act_patch_attn_head_k_all_pos),
    ("v", False, tlp.get_act_patch_attn_head_v_all_pos),
    ("pattern", True, tlp.get_act_patch_attn_head_pattern_by_pos),
    ("pattern", False, tlp.get_act_patch_attn_head_pattern_all_pos),
]


@pytest.fixture(scope="module")
def tl_setup(rand: FFLModel):
    pair = best_pair(rand, ignore_last_write)
    m = patch_metric(rand, pair)
    _, cache = rand.hooked.run_with_cache(pair.clean[None])
    return pair, m, cache


@pytest.mark.tl3
@pytest.mark.parametrize(
    "kind,by_pos,tl_fn", TL_SWEEPS, ids=[f"{k}-{'pos' if b else 'all'}" for k, b, _ in TL_SWEEPS]
)
def test_equals_transformer_lens_patching(rand: FFLModel, tl_setup, kind, by_pos, tl_fn) -> None:
    pair, m, cache = tl_setup
    with contextlib.redirect_stderr(io.StringIO()), torch.no_grad():  # TL's tqdm bar
        want = tl_fn(rand.hooked, pair.corrupted[None], cache, lambda logits: m(logits).mean()).float()
    got = activation_patch(rand, pair, kind, by_pos=by_pos, metric=m)
    assert got.shape == tuple(want.shape)
    assert (got.values - want).abs().max() <= TOL
    assert want.abs().max() > 1e-3  # a sweep with real effects, not all zeros
    # the batched sweep itself (no exact skipping, several chunks) agrees as well
    full = activation_patch(rand, pair, kind, by_pos=by_pos, metric=m, skip_exact=False, batch_size=23)
    assert (full.values - want).abs().max() <= TOL
    assert got.axes[0] == "layer" and len(got.labels) == got.values.ndim


# ---------------------------------------------------------------- path patching


@pytest.mark.tl3
def test_path_patching_equals_closed_form_on_attn_only_model(linear: FFLModel) -> None:
    """With no MLPs, no LayerNorm and every other head frozen, the receiver's key input is
    the corrupted residual plus the sender's output change: compute it by hand, patch it."""
    hk = linear.hooked
    pair = best_pair(linear, ignore_last_write)
    m = patch_metric(linear, pair)
    t = pair.read_pos + 1
    _, cache = hk.run_with_cache(pair.tokens()[:, :t])
    recv = (2, 1)
    got = path_patch(linear, pair, [recv], via="k", metric=m)
    assert torch.isnan(got.values[2]).all() and not torch.isnan(got.values[:2]).any()
    for layer in range(2):
        for head in range(2):
            z = cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
            resid = cache[f"blocks.{recv[0]}.hook_resid_pre"][1] + (z[0] - z[1]) @ hk.W_O[layer, head]
            k = resid @ hk.W_K[recv[0], recv[1]] + hk.b_K[recv[0], recv[1]]

            def put(act, hook=None, k=k):
                act = act.clone()
                act[:, :, recv[1]] = k
                return act

            with torch.no_grad():
                logits = hk.run_with_hooks(
                    pair.corrupted[None, :t], fwd_hooks=[(f"blocks.{recv[0]}.attn.hook_k", put)]
                )
            want = float(m(logits)[0])
            assert abs(float(got.values[layer, head]) - want) <= 1e-4, (layer, head)
    assert got.values[:2].abs().max() > 0.01


def _path_reference(model: FFLModel, pair: Pair, m, sender, recv, via: str) -> float:
    """One sender at a time, unbatched: the two steps of the IOI recipe."""
    hk = model.hooked
    t = pair.read_pos + 1
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(hk.cfg.n_layers)]
    _, cache = hk.run_with_cache(pair.tokens()[:, :t], names_filter=names)
    hooks = []
    for layer, name in enumerate(names):

        def freeze(act, hook=None, layer=layer, name=name):
            out = cache[name][1:].clone()
            if layer == sender[0]:
                out[:, :, sender[1]] = cache[name][0:1, :, sender[1]]
            return out

        hooks.append((name, freeze))
    rec = {}
    rname = f"blocks.{recv[0]}.attn.hook_{via}"
    with torch.no_grad():
        hk.run_with_hooks(
            pair.corrupted[None, :t],
            fwd_hooks=hooks + [(rname, lambda a, hook=None: rec.setdefault("x", a.clone()))],
        )

        def put(act, hook=None):
            act = act.clone()
            act[:, :, recv[1]] = rec["x"][:, :, recv[1]]
            return act

        logits = hk.run_with_hooks(pair.corrupted[None, :t], fwd_hooks=[(rname, put)])
    return float(m(logits)[0])


@pytest.mark.tl3
def test_path_patching_batched_equals_per_sender_loop(rand: FFLModel, flip: Pair) -> None:
    """On a model with MLPs and LayerNorm (which path patching recomputes), against the
    IOI recipe run one sender at a time."""
    m = patch_metric(rand, flip)
    for via in "qkv":
        got = path_patch(rand, flip, ["L1H0"], via=via, metric=m, batch_size=1)
        for head in range(2):
            want = _path_reference(rand, flip, m, (0, head), (1, 0), via)
            assert abs(float(got.values[0, head]) - want) <= 1e-4, (via, head)
        assert torch.isnan(got.values[1]).all()


@pytest.mark.tl3
def test_path_patching_to_logits_of_last_layer_head_equals_activation_patching(
    rand: FFLModel, flip: Pair
) -> None:
    """A last-layer head reaches the logits only directly (plus the last MLP), so path
    patching it to the logits equals patching its output."""
    pair = flip
    m = patch_metric(rand, pair)
    path = path_patch(rand, pair, "logits", metric=m)
    act = activation_patch(rand, pair, "z", by_pos=False, metric=m)
    assert (path.values[1] - act.values[1]).abs().max() <= 1e-4


@pytest.mark.tl3
def test_path_patching_bad_arguments(rand: FFLModel, flip: Pair) -> None:
    pair = flip
    for kwargs, text in [
        (dict(receivers=["L0H0"]), "no sender heads"),
        (dict(receivers=["L1H0"], senders=["L1H1"]), "not before"),
        (dict(receivers=["L9H0"]), "does not exist"),
        (dict(receivers=["L1H0"], via="x"), "via must be made of q, k and v"),
        (dict(receivers=["nonsense"]), "not a head"),
    ]:
        with pytest.raises(FFInterpError, match=text):
            path_patch(rand, pair, **kwargs)


# ---------------------------------------------------------------- the hand-built circuit


@pytest.mark.tl3
def test_circuit_read_head_output_carries_all_of_the_effect(circuit: FFLModel) -> None:
    seq = sample(1, 64, p_i=0.6, seed=5)[0]
    pair = flip_last_write(seq)
    heads = activation_patch(circuit, pair, "heads", by_pos=False)
    want = torch.zeros(2, 2)
    want[READ_HEAD] = 1.0
    assert (heads.values - want).abs().max() <= 1e-4
    by_pos = activation_patch(circuit, pair, "z", by_pos=True)
    only = torch.zeros_like(by_pos.values)
    only[READ_HEAD[0], pair.read_pos, READ_HEAD[1]] = 1.0
    assert (by_pos.values - only).abs().max() <= 1e-4
    top = by_pos.top(3)
    assert len(top) == 1 and (top[0]["layer"], top[0]["head"]) == ("L1", "H0")


@pytest.mark.tl3
@pytest.mark.parametrize("build", [ignore_last_write, move_last_write])
def test_circuit_path_prev_token_head_to_read_head_through_k(circuit: FFLModel, build) -> None:
    pair = build(sample(1, 64, p_i=0.6, seed=5)[0])
    k = path_patch(circuit, pair, [READ_HEAD], via="k")
    assert abs(float(k.values[PREV_TOKEN_HEAD]) - 1.0) <= 1e-4
    assert abs(float(k.values[0, 1])) <= 1e-4
    for via in ("q", "v"):
        assert path_patch(circuit, pair, [READ_HEAD], via=via).values[0].abs().max() <= 1e-4
    # the previous-token head has no direct path to the logits
    logits = path_patch(circuit, pair, "logits")
    assert abs(float(logits.values[PREV_TOKEN_HEAD])) <= 1e-4
    assert abs(float(logits.values[READ_HEAD]) - 1.0) <= 1e-4


# ---------------------------------------------------------------- attribution patching


@pytest.mark.tl3
def test_attribution_is_exact_for_linear_sites(linear: FFLModel) -> None:
    """On an attention-only model with no LayerNorm, the logits are linear in the last
    layer's head outputs, so attribution of z there equals exact patching."""
    pair = best_pair(linear, flip_last_write)
    attr = attribution_patch(linear, pair, "z", by_pos=True)
    exact = activation_patch(linear, pair, "z", by_pos=True)
    assert attr.shape == exact.shape and attr.axes == exact.axes
    assert (attr.values[2] - exact.values[2]).abs().max() <= 1e-4
    assert exact.values[2].abs().max() > 0.01


def test_attribution_tracks_exact_patching_on_trained_tiny(trained_tiny: FFLModel) -> None:
    """Head outputs and layer outputs of a trained model respond almost linearly to a
    flipped bit; the residual stream at the flipped token is the looser case (a large
    patch), so it is reported, not held to the same bar."""
    r: dict[str, list[float]] = {"z": [], "attn_out": [], "resid_pre": []}
    for row in sample(8, 64, p_i=0.8, seed=11):
        try:
            pair = flip_last_write(row)
            m = patch_metric(trained_tiny, pair)
        except FFInterpError:
            continue
        for what in r:
            check = compare_attribution(trained_tiny, pair, what, by_pos=True, metric=m)
            text = check.summary()
            print(text)  # the report a user reads: it states the correlation
            assert f"r = {check.correlation:.3f}" in text
            r[what].append(check.correlation)
        if len(r["z"]) >= 3:
            break
    assert len(r["z"]) == 3
    median = {k: sorted(v)[1] for k, v in r.items()}
    print("median correlation with exact patching:", median)
    assert median["z"] > 0.8 and median["attn_out"] > 0.8
    assert median["resid_pre"] > 0.3


@pytest.mark.tl3
def test_attribution_flags_the_saturated_read_head(circuit: FFLModel) -> None:
    pair = ignore_last_write(sample(1, 64, p_i=0.6, seed=5)[0])
    check = compare_attribution(circuit, pair, "z", by_pos=True)
    assert not check.agrees
    assert "WARNING" in check.summary() and "saturated" in check.summary()
    worst = check.disagreements[0]
    assert (worst["layer"], worst["head"]) == ("L0", "H0") and worst["exact"] > 0.99
    assert "WARNING" in str(check) and "<table" in check._repr_html_()


# ---------------------------------------------------------------- ablations


def _logit_diff(model: FFLModel, tokens: torch.Tensor, p: int, hooks) -> float:
    with torch.no_grad():
        logits = model.hooked.run_with_hooks(tokens[None, : p + 1], fwd_hooks=hooks)
    bit = int(tokens[int(torch.nonzero(tokens[: p + 1] == W).max()) + 1])
    return float(logits[0, p, bit] - logits[0, p, 7 - bit])


@pytest.mark.tl3
def test_head_and_mlp_ablations_equal_per_site_hooks(rand: FFLModel) -> None:
    seq = sample(1, T, p_i=0.5, seed=8)[0]
    p = read_positions(seq)[-1]
    ref = sample(5, T, p_i=0.5, seed=9)
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(2)]
    _, rcache = rand.hooked.run_with_cache(ref[:, : p + 1])
    zero = ablate_heads(rand, seq, mode="zero")
    mean = ablate_heads(rand, seq, mode="mean", reference=ref)
    res = ablate_heads(rand, seq, mode="resample", reference=ref, n_resample=3)
    for layer in range(2):
        for h in range(2):

            def put(value, h=h):
                def hook(act, hook=None):
                    act = act.clone()
                    act[:, :, h] = value
                    return act

                return hook

            z = rcache[names[layer]][:, :, h]
            assert abs(zero.values[layer, h] - _logit_diff(rand, seq, p, [(names[layer], put(0.0))])) <= 1e-4
            assert (
                abs(mean.values[layer, h] - _logit_diff(rand, seq, p, [(names[layer], put(z.mean(0)))]))
                <= 1e-4
            )
            draws = res.meta["draws"]
            each = [_logit_diff(rand, seq, p, [(names[layer], put(z[j]))]) for j in draws]
            assert len(each) == 3 and abs(res.values[layer, h] - sum(each) / 3) <= 1e-4
    assert zero.null == pytest.approx(_logit_diff(rand, seq, p, []), abs=1e-5)
    mlp = ablate_mlps(rand, seq, mode="zero")
    for layer in range(2):
        name = f"blocks.{layer}.hook_mlp_out"
        want = _logit_diff(rand, seq, p, [(name, lambda a, hook=None: torch.zeros_like(a))])
        assert abs(mlp.values[layer] - want) <= 1e-4


@pytest.mark.tl3
@pytest.mark.parametrize("mode", ["zero", "renorm"])
def test_edge_ablation_equals_editing_the_pattern(rand: FFLModel, mode: str) -> None:
    seq = sample(1, T, p_i=0.5, seed=8)[0]
    p = read_positions(seq)[-1]
    got = ablate_edges(rand, seq, (1, 1), mode=mode)
    assert got.shape == (p + 1,)
    name = "blocks.1.attn.hook_pattern"
    for key in range(0, p + 1, 3):

        def edit(act, hook=None, key=key):
            act = act.clone()
            act[:, 1, p, key] = 0.0
            if mode == "renorm":
                act[:, 1, p] = act[:, 1, p] / act[:, 1, p].sum(-1, keepdim=True)
            return act

        assert abs(float(got.values[key]) - _logit_diff(rand, seq, p, [(name, edit)])) <= 1e-4


@pytest.mark.tl3
def test_circuit_ablations(circuit: FFLModel) -> None:
    seq = sample(1, 64, p_i=0.6, seed=5)[0]
    heads = ablate_heads(circuit, seq, mode="zero")
    assert heads.null == pytest.approx(20.0, abs=1e-3)
    assert abs(float(heads.values[READ_HEAD])) <= 1e-4  # no read head, no answer
    assert float(heads.values[1, 1]) == pytest.approx(20.0, abs=1e-3)  # the start head writes nothing
    assert float(heads.values[0, 1]) == pytest.approx(20.0, abs=1e-3)
    edges = ablate_edges(circuit, seq, READ_HEAD, mode="zero")
    p, wp = edges.meta["read_pos"], edges.meta["write_pos"]
    assert abs(float(edges.values[wp + 1])) <= 1e-3  # the last write's bit carries the answer
    others = torch.cat([edges.values[: wp + 1], edges.values[wp + 2 :]])
    assert (others - 20.0).abs().max() <= 1e-3
    assert p == read_positions(seq)[-1]
    with pytest.raises(FFInterpError, match="attention-only"):
        ablate_mlps(circuit, seq)
    with pytest.raises(FFInterpError, match="unknown ablation mode"):
        ablate_heads(circuit, seq, mode="noise")


# ---------------------------------------------------------------- results


@pytest.mark.tl3
def test_result_object_table_plot_and_export(circuit: FFLModel, tmp_path) -> None:
    pair = flip_last_write(sample(1, 64, p_i=0.6, seed=5)[0])
    res = activation_patch(circuit, pair, "z", by_pos=True)
    assert isinstance(res, PatchResult) and res.axes == ("layer", "pos", "head")
    assert res.labels[1][pair.read_pos] == f"{pair.read_pos} r"
    text = str(res.top(5))
    assert "L1" in text and "H0" in text and "+1.0000" in text
    html = res._repr_html_()
    assert "<table" in html and "activation patching of z" in html
    fig = res.plot()
    assert len(fig.data) == 1 and len(fig.data[0].y) == 4  # one row per head (L0H0 ... L1H1)
    out = res.save(tmp_path / "z.html")
    assert out.exists() and out.stat().st_size > 1000
    grid = activation_patch(circuit, pair, "pattern", by_pos=True).plot()
    assert len(grid.data[0].x) == 64


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def circuit_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("circ") / "ckpt.pt"
    save_circuit(path, block_size=64)
    return path


def _cli(args: list[str]) -> int:
    from ffinterp.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


@pytest.mark.tl3
def test_cli_patch_heads_and_path(circuit_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "heads.html"
    assert _cli(["patch", str(circuit_ckpt), "--what", "heads", "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if line.strip().startswith("1 ")]
    assert rows and rows[0][:3] == ["1", "L1", "H0"]
    assert "clean:" in text and out.exists()
    seq = to_text(sample(1, 64, p_i=0.6, seed=5)[0])
    args = ["patch", str(circuit_ckpt), "--seq", seq, "--corrupt", "ignore-last-write", "--what", "path"]
    assert _cli([*args, "--receiver", "L1H0", "--via", "k", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if line.strip().startswith("1 ")]
    assert rows[0][:3] == ["1", "L0", "H0"] and "via k" in text


@pytest.mark.tl3
@pytest.mark.parametrize(
    "extra,text",
    [
        (["--what", "bogus"], "--what must be one of"),
        (["--corrupt", "swap"], "--corrupt must be one of"),
        (["--seq", "w1r0"], "contradicts"),
        (["--seq", "w1r1", "--corrupt", "ignore-last-write"], "no earlier write"),
        (["--out", "fig.txt"], "unknown figure format"),
        (["--what", "mlp"], "attention-only"),
        (["--what", "path", "--receiver", "L5H0"], "does not exist"),
    ],
)
def test_cli_patch_bad_input_is_one_line_exit_2(circuit_ckpt, capsys, extra, text) -> None:
    assert _cli(["patch", str(circuit_ckpt), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert text in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_math_helpers() -> None:
    from ffinterp.analysis.attribution import pearson

    a = torch.tensor([1.0, 2.0, 3.0])
    assert pearson(a, 2 * a) == pytest.approx(1.0)
    assert math.isnan(pearson(a, torch.ones(3)))
