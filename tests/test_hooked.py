"""The hooked view equals the fast model and behaves like TransformerLens on both lines.

Tests marked ``tl3`` also run in the TransformerLens 3.x environment (``.venv-tl3``), where
the hooked model is a ``HookedTransformer`` instead of a ``TransformerBridge``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformer_lens import patching

import ffinterp
from ffinterp.checkpoints import save_checkpoint
from ffinterp.errors import FFInterpError
from ffinterp.hooked import FFLModel, load_model
from ffinterp.language import sample
from ffinterp.models.gpt import GPT, GPTConfig
from ffinterp.models.lstm import LSTM, LSTMConfig
from ffinterp.pretrained import index
from ffinterp.scoring import score_tokens
from ffinterp.tl_seam import IS_BRIDGE, TL_LINE, shared_hook_names

T = 64
TOL = 1e-4  # the small random models here; the shipped ones get NOISE_FACTOR x float32 noise

# The fast and hooked views round differently, and a trained model's LayerNorms amplify
# rounding where the residual stream's spread is small (glitchy-512: std 0.18 beside
# entries of 32), so a fixed tolerance does not fit every model. The yardstick is the fast
# model's own float32 error on the batch. Measured on 336 batches of 4 x T over the six shipped
# transformers, |fast - hooked| reached 4.2 times it (median 0.9); 8 leaves twice that.
NOISE_FACTOR = 8.0
SHIPPED_GPTS = [e["name"] for e in index() if e["arch"] == "gpt"]


def random_gpt(seed: int = 0, **kw) -> GPT:
    """A tiny GPT whose weights are far from init (non-zero biases, LN gains off 1), so a
    mis-mapped weight cannot hide."""
    torch.manual_seed(seed)
    cfg = GPTConfig(**{"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": T, **kw})
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "transformer.wpe.weight" or cfg.pos_embedding == "learned":
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tiny() -> FFLModel:
    return FFLModel.from_fast(random_gpt(), device="cpu", name="tiny")


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return sample(3, T, p_i=0.5, seed=7)


CONFIGS = [
    pytest.param(dict(pos_embedding=pos, bias=bias, activation=act), id=f"{pos}-bias{int(bias)}-{act}")
    for pos in ("learned", "sinusoidal")
    for bias in (True, False)
    for act in ("gelu", "gelu_new")
] + [
    pytest.param(dict(layer_norm=False, attn_only=True), id="circuit-noln-attnonly"),
    pytest.param(dict(attn_only=True, bias=False), id="attnonly-ln"),
    pytest.param(dict(ln_eps=1e-1, activation="gelu_new"), id="hf-like-large-eps"),
]


@pytest.mark.tl3
@pytest.mark.parametrize("kw", CONFIGS)
def test_hooked_logits_equal_fast(kw: dict, tokens: torch.Tensor) -> None:
    m = FFLModel.from_fast(random_gpt(**kw), device="cpu")
    fast, hooked = m.fast_logits(tokens), m.hooked_logits(tokens)
    assert fast.shape == (3, T, 5)
    assert (fast - hooked).abs().max().item() <= TOL
    assert not m.hooked.training


def float32_noise(fast: GPT, tokens: torch.Tensor) -> float:
    """How far float32 arithmetic alone moves ``fast``'s logits on ``tokens``: the largest
    distance from the same model in float64, and at least one ulp of the largest logit."""
    f64 = copy.deepcopy(fast).double()
    with torch.inference_mode():
        f32 = fast(tokens)
        exact = f64(tokens)
    eps = torch.finfo(torch.float32).eps
    return max((f32.double() - exact).abs().max().item(), eps * f32.abs().max().item())


@pytest.mark.tl3
@pytest.mark.parametrize("name", SHIPPED_GPTS)
def test_shipped_models_hooked_equals_fast_within_float32_noise(name: str) -> None:
    m = load_model(f"pretrained:{name}", device="cpu")
    x = sample(4, m.cfg.block_size, p_i=0.8, seed=0)
    noise = float32_noise(m.fast, x)
    diff = (m.fast_logits(x) - m.hooked_logits(x)).abs().max().item()
    assert diff <= NOISE_FACTOR * noise, f"{name}: {diff:.2e} > {NOISE_FACTOR} x {noise:.2e}"
    assert noise <= 1e-2  # float32 noise, not a mapping error hiding in the yardstick


@pytest.mark.tl3
def test_shared_hook_names_and_shapes(tiny: FFLModel, tokens: torch.Tensor) -> None:
    _, cache = tiny.hooked.run_with_cache(tokens)
    names = shared_hook_names(tiny.cfg)
    missing = [n for n in names if n not in cache.keys()]
    assert not missing
    b, h, d, dh = 3, 4, 32, 8
    shapes = {
        "hook_embed": (b, T, d),
        "blocks.1.hook_resid_pre": (b, T, d),
        "blocks.1.attn.hook_q": (b, T, h, dh),
        "blocks.1.attn.hook_k": (b, T, h, dh),
        "blocks.1.attn.hook_v": (b, T, h, dh),
        "blocks.1.attn.hook_z": (b, T, h, dh),
        "blocks.1.attn.hook_pattern": (b, h, T, T),
        "blocks.1.attn.hook_attn_scores": (b, h, T, T),
        "blocks.1.hook_attn_out": (b, T, d),
        "blocks.1.hook_mlp_out": (b, T, d),
        "blocks.1.hook_resid_post": (b, T, d),
    }
    for name, shape in shapes.items():
        assert tuple(cache[name].shape) == shape, name
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert torch.allclose(pattern.sum(-1), torch.ones(b, h, T), atol=1e-5)
    assert pattern.triu(1).abs().max() == 0  # causal
    # the fast model's own attention rows are the hooked pattern
    _, fast_patterns = tiny.fast(tokens, need_patterns=True)
    assert (fast_patterns[0] - pattern).abs().max() <= TOL
    cfg = tiny.hooked.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model, cfg.n_ctx) == (2, 4, 8, 32, T)
    assert tiny.n_layers == 2 and tiny.n_heads == 4


@pytest.mark.tl3
def test_names_filter_returns_only_those(tiny: FFLModel, tokens: torch.Tensor) -> None:
    wanted = ["blocks.0.attn.hook_pattern", "blocks.1.hook_resid_pre"]
    logits, cache = tiny.hooked.run_with_cache(tokens, names_filter=wanted)
    assert set(wanted) <= set(cache.keys())
    # The bridge also files an activation under its alias (blocks.1.hook_in is
    # blocks.1.hook_resid_pre); anything extra must be the very same tensor.
    for extra in set(cache.keys()) - set(wanted):
        assert any(cache[extra] is cache[w] or torch.equal(cache[extra], cache[w]) for w in wanted), extra
    assert len(cache.keys()) <= 2 * len(wanted)
    _, cache = tiny.hooked.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    assert sorted(cache.keys()) == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    assert (logits - tiny.fast_logits(tokens)).abs().max() <= TOL


@pytest.mark.tl3
def test_weight_properties_match_nanogpt_layout(tiny: FFLModel) -> None:
    hk, sd = tiny.hooked, tiny.fast.state_dict()
    l, h, d, dh = 2, 4, 32, 8
    assert tuple(hk.W_Q.shape) == (l, h, d, dh) and tuple(hk.W_V.shape) == (l, h, d, dh)
    assert tuple(hk.W_O.shape) == (l, h, dh, d) and tuple(hk.b_O.shape) == (l, d)
    c_attn = sd["transformer.h.1.attn.c_attn.weight"]
    assert torch.equal(hk.W_Q[1, 2], c_attn[2 * dh : 3 * dh].T)
    assert torch.equal(hk.W_K[1, 3], c_attn[d + 3 * dh : d + 4 * dh].T)
    c_proj = sd["transformer.h.0.attn.c_proj.weight"]
    assert torch.equal(hk.W_O[0, 1], c_proj[:, dh : 2 * dh].T)
    assert torch.equal(hk.b_O[0], sd["transformer.h.0.attn.c_proj.bias"])
    assert torch.equal(hk.W_E, sd["transformer.wte.weight"])
    assert torch.equal(hk.W_U, sd["lm_head.weight"].T)


@pytest.mark.tl3
def test_per_head_outputs_from_hook_z_and_W_O(tiny: FFLModel, tokens: torch.Tensor) -> None:
    """The shared way to get per-head outputs (hook_result is 3.x-only)."""
    _, cache = tiny.hooked.run_with_cache(tokens)
    z = cache["blocks.1.attn.hook_z"]  # [b, pos, head, d_head]
    per_head = torch.einsum("bphd,hdm->bphm", z, tiny.hooked.W_O[1])
    total = per_head.sum(2) + tiny.hooked.b_O[1]
    assert (total - cache["blocks.1.hook_attn_out"]).abs().max() <= TOL


@pytest.mark.tl3
def test_run_with_hooks_and_hooks_context(tiny: FFLModel, tokens: torch.Tensor) -> None:
    def ablate(act, hook):
        return torch.zeros_like(act)

    name = "blocks.1.hook_attn_out"
    ablated = tiny.hooked.run_with_hooks(tokens, fwd_hooks=[(name, ablate)])
    with tiny.hooked.hooks(fwd_hooks=[(name, ablate)]):
        again = tiny.hooked(tokens)
    clean = tiny.hooked_logits(tokens)
    assert (ablated - again).abs().max() <= TOL
    assert (ablated - clean).abs().max() > 1e-3
    assert (tiny.hooked_logits(tokens) - clean).abs().max() == 0  # hooks removed


@pytest.mark.tl3
def test_transformer_lens_patching_functions(tiny: FFLModel) -> None:
    seq = 8  # every (layer, pos) is a forward pass: keep it short
    clean = sample(1, seq, p_i=0.5, seed=3)
    k = 2  # an instruction slot: flip w/r/i there
    corrupted = clean.clone()
    corrupted[0, k] = (clean[0, k] + 1) % 3
    last = seq - 2  # the last read

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, last, 4] - logits[0, last, 3]

    clean_logits, clean_cache = tiny.hooked.run_with_cache(clean)
    clean_metric = metric(clean_logits)
    same = patching.get_act_patch_resid_pre(tiny.hooked, clean, clean_cache, metric)
    assert tuple(same.shape) == (2, seq)
    assert (same - clean_metric).abs().max() <= TOL
    patched = patching.get_act_patch_resid_pre(tiny.hooked, corrupted, clean_cache, metric)
    corrupted_metric = metric(tiny.hooked_logits(corrupted))
    assert abs(corrupted_metric - clean_metric) > 1e-4
    # At layer 0 the corrupted run differs only at position k: patching it back restores
    # the clean run exactly, and patching any other position changes nothing.
    assert abs(patched[0, k] - clean_metric) <= TOL
    others = torch.cat([patched[0, :k], patched[0, k + 1 :]])
    assert (others - corrupted_metric).abs().max() <= TOL


@pytest.mark.tl3
def test_predict_reads_agrees_with_fast_scoring(tiny: FFLModel, tokens: torch.Tensor) -> None:
    got = tiny.predict_reads(tokens)
    want = score_tokens(tiny.fast, tokens)
    assert len(got) == len(want) > 0
    assert torch.equal(got.pred, want.pred)
    assert (got.margin - want.margin).abs().max() <= TOL
    assert (got.p_correct - want.p_correct).abs().max() <= TOL
    text = tiny.to_text(tokens[0])
    assert isinstance(text, str) and len(text) == T
    one = tiny.predict_reads(text)
    assert torch.equal(one.pred, want.pred[want.reads.batch == 0])
    assert torch.equal(tiny.to_tokens(text), tokens[0])


@pytest.mark.tl3
def test_load_model_from_saved_checkpoint(tmp_path, tokens: torch.Tensor) -> None:
    fast = random_gpt(seed=5, pos_embedding="sinusoidal", bias=False)
    path = tmp_path / "run1" / "ckpt.pt"
    save_checkpoint(path, fast, iter_num=7, ffl={"train_dist": "FFL(0.8)"})
    m = ffinterp.load_model(path)
    assert isinstance(m, FFLModel) and m.arch == "gpt" and m.name == "run1"
    assert m.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert m.meta["train_dist"] == "FFL(0.8)" and m.meta["pos_embedding"] == "sinusoidal"
    with torch.no_grad():
        want = fast(tokens)
    assert (m.hooked_logits(tokens).cpu() - want).abs().max() <= TOL
    assert (m.fast_logits(tokens).cpu() - want).abs().max() <= TOL
    assert m.cfg.pos_embedding == "sinusoidal" and not m.cfg.bias
    html = m._repr_html_()
    for part in ("run1", "gpt", "2 / 4 / 32", TL_LINE, str(m.device)):
        assert part in html
    assert load_model(path, device="cpu").device == torch.device("cpu")


def test_lstm_has_no_hooked_view(tokens: torch.Tensor) -> None:
    torch.manual_seed(0)
    m = FFLModel.from_fast(LSTM(LSTMConfig(hidden=16)), device="cpu", name="lstm")
    assert m.hooked is None and m.arch == "lstm" and m.n_heads == 0
    s = m.predict_reads(tokens)
    assert torch.equal(s.pred, score_tokens(m.fast, tokens).pred)
    assert "lstm" in m._repr_html_()
    with pytest.raises(ValueError, match="no hooked view"):
        m.hooked_logits(tokens)


@pytest.mark.tl3
def test_use_hook_mlp_in_on_both_lines(tokens: torch.Tensor) -> None:
    m = FFLModel.from_fast(random_gpt(), device="cpu", use_hook_mlp_in=True)
    logits, cache = m.hooked.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_mlp_in"))
    assert tuple(cache["blocks.0.hook_mlp_in"].shape) == (3, T, 32)
    assert (logits - m.fast_logits(tokens)).abs().max() <= TOL


@pytest.mark.tl3
@pytest.mark.skipif(IS_BRIDGE, reason="use_attn_result, use_split_qkv_input: HookedTransformer (3.x) only")
def test_tl3_edge_level_options(tokens: torch.Tensor) -> None:
    from transformer_lens import HookedTransformer

    m = FFLModel.from_fast(
        random_gpt(), device="cpu", use_attn_result=True, use_split_qkv_input=True, use_hook_mlp_in=True
    )
    assert isinstance(m.hooked, HookedTransformer)
    cfg = m.hooked.cfg
    assert cfg.use_attn_result and cfg.use_split_qkv_input and cfg.use_hook_mlp_in
    logits, cache = m.hooked.run_with_cache(tokens)
    assert (logits - m.fast_logits(tokens)).abs().max() <= TOL
    assert tuple(cache["blocks.0.attn.hook_result"].shape) == (3, T, 4, 32)
    assert tuple(cache["blocks.0.hook_q_input"].shape) == (3, T, 4, 32)
    assert tuple(cache["blocks.1.hook_v_input"].shape) == (3, T, 4, 32)
    assert "blocks.1.hook_mlp_in" in cache.keys()
    total = cache["blocks.1.attn.hook_result"].sum(2) + m.hooked.b_O[1]
    assert (total - cache["blocks.1.hook_attn_out"]).abs().max() <= TOL


@pytest.mark.skipif(not IS_BRIDGE, reason="on 3.x these options are supported")
def test_bridge_refuses_per_head_options_clearly() -> None:
    with pytest.raises(FFInterpError, match="use_attn_result is not available"):
        FFLModel.from_fast(random_gpt(), device="cpu", use_attn_result=True)


def test_unknown_option_is_one_clear_error() -> None:
    with pytest.raises(FFInterpError, match="unknown hooked-model option"):
        FFLModel.from_fast(random_gpt(), device="cpu", use_attn_results=True)


def test_device_auto_is_cuda_when_present_else_cpu(tiny: FFLModel) -> None:
    want = "cuda" if torch.cuda.is_available() else "cpu"
    m = FFLModel.from_fast(random_gpt(), device="auto")
    assert m.device.type == want
    assert next(m.hooked.parameters()).device.type == want


@pytest.mark.tl3
def test_load_model_hf_gpt2_folder_matches_hf_logits(tmp_path, tokens: torch.Tensor) -> None:
    """A Hugging Face GPT-2 folder: tanh GELU, its own eps, Conv1D weights, tied lm_head."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        vocab_size=5,
        n_positions=T,
        n_embd=32,
        n_layer=2,
        n_head=4,
        layer_norm_epsilon=1e-3,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))
        want = hf(tokens).logits
    hf.save_pretrained(tmp_path / "hf-gpt2")
    m = load_model(tmp_path / "hf-gpt2", device="cpu")
    assert m.cfg.activation == "gelu_new" and m.cfg.ln_eps == 1e-3
    assert (m.fast_logits(tokens) - want).abs().max() <= TOL
    assert (m.hooked_logits(tokens) - want).abs().max() <= TOL
