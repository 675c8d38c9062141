"""Tools users combine with ffinterp see what they expect.

nnsight and other wrappers must see every module of the fast model run, in
``torch.inference_mode()`` too, where the fast model takes its inference path; and the code
in the README's "Using ffinterp with other tools" runs as written where it can run offline.
"""

from __future__ import annotations

import linecache

import nnsight
import pytest
import torch
from test_readme import python_blocks
from torch import nn

import ffinterp
from ffinterp.analysis.patching import activation_patch
from ffinterp.models import gpt
from ffinterp.models.gpt import GPT

T = 128


@pytest.fixture(scope="module")
def glitchy() -> ffinterp.FFLModel:
    return ffinterp.load_model("pretrained:glitchy-128", device="cpu")


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return ffinterp.sample(2, seq_len=T, seed=0)


def fresh_fast() -> GPT:
    """A model of its own per test: nnsight and wrappers change the modules they touch."""
    return ffinterp.load_model("pretrained:glitchy-128", device="cpu").fast


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to float32 rounding, relative to the largest value: the inference path fuses
    the residual adds into GEMMs, which moves glitchy-128's logits by up to ~1.2e-5 of
    their largest (1e-4 of 9). A tensor overwritten by a later layer is off by O(1)."""
    return a.shape == b.shape and (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


def direct(fast: GPT, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each block's output and the last attention output, computed one module at a time on
    the block path (autograd on, so no inference path anywhere)."""
    tr = fast.transformer
    with torch.enable_grad():
        x = tr.wte(tokens) + tr.wpe.weight[: tokens.shape[1]]
        h0, _ = tr.h[0](x)
        attn1, _ = tr.h[1].attn(tr.h[1].ln_1(h0))
        h1, _ = tr.h[1](h0)
        logits = fast.lm_head(tr.ln_f(h1))
    return {k: v.detach() for k, v in dict(h0=h0, attn1=attn1, h1=h1, logits=logits).items()}


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad, torch.enable_grad])
def test_nnsight_traces_blocks_in_every_grad_mode(mode, tokens: torch.Tensor) -> None:
    fast = fresh_fast()
    want = direct(fast, tokens)
    model = nnsight.NNsight(fast)
    with mode(), model.trace(tokens):
        h0 = model.transformer.h[0].output[0].save()
        attn1 = model.transformer.h[1].attn.output[0].save()
        h1 = model.transformer.h[1].output[0].save()
        logits = model.output.save()
    got = dict(h0=h0, attn1=attn1, h1=h1, logits=logits)
    for name in want:
        assert torch.equal(got[name].detach(), want[name]), name


def test_nnsight_edit_inside_inference_mode_changes_the_output(tokens: torch.Tensor) -> None:
    """Zeroing layer 1's attention through nnsight is what the model then computes."""
    fast = fresh_fast()
    with torch.enable_grad():
        tr = fast.transformer
        h0, _ = tr.h[0](tr.wte(tokens) + tr.wpe.weight[:T])
        mid = tr.h[1].ln_2(h0)
        want = fast.lm_head(tr.ln_f(h0 + tr.h[1].mlp(mid))).detach()
    model = nnsight.NNsight(fast)
    with torch.inference_mode(), model.trace(tokens):
        model.transformer.h[1].attn.output[0][:] = 0
        logits = model.output.save()
    assert (logits - want).abs().max() <= 1e-5
    assert (logits - direct(fresh_fast(), tokens)["logits"]).abs().max() > 1e-2


class Recorder(nn.Module):
    """A wrapper module swapped in for a block, as tools that wrap layers do."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[torch.Tensor] = []

    def forward(self, x, *args, **kwargs):
        out = self.inner(x, *args, **kwargs)
        self.seen.append(out[0])
        return out


def test_hooks_wrappers_and_replaced_forwards_see_blocks_in_inference_mode(tokens: torch.Tensor) -> None:
    fast = fresh_fast()
    want = direct(fast, tokens)
    tr = fast.transformer
    hooked: list[torch.Tensor] = []
    handle = tr.h[0].register_forward_hook(lambda m, args, out: hooked.append(out[0]))  # kept, not cloned
    wrapper = Recorder(tr.h[1])
    tr.h[1] = wrapper
    with torch.inference_mode():
        logits = fast(tokens)
    handle.remove()
    assert len(hooked) == 1 and close(hooked[0], want["h0"])  # later layers did not overwrite it
    assert len(wrapper.seen) == 1 and close(wrapper.seen[0], want["h1"])
    assert close(logits, want["logits"])

    # A forward replaced on the instance (accelerate's hooks, nnsight's controllers) runs too.
    tr.h[1] = wrapper.inner
    calls: list[torch.Tensor] = []
    block_forward = tr.h[1].forward

    def spy(x, *args, **kwargs):
        out = block_forward(x, *args, **kwargs)
        calls.append(out[0])
        return out

    tr.h[1].forward = spy
    with torch.inference_mode():
        assert close(fast(tokens), want["logits"])
        at_reads = fast.logits_at(tokens, ffinterp.language.read_mask(tokens))
    assert len(calls) == 2 and close(calls[0], want["h1"])  # logits_at ran the block too
    assert close(at_reads, want["logits"][ffinterp.language.read_mask(tokens)])


def test_inference_path_runs_when_nothing_watches(monkeypatch, tokens: torch.Tensor) -> None:
    """The speed stays: an unwatched model shares one Scratch over its blocks; a hooked one
    does not, and its hooked block keeps its own inference path inside."""
    made: list[bool] = []

    class Counted(gpt.Scratch):
        def __init__(self, own_stream: bool = False) -> None:
            super().__init__(own_stream)
            made.append(True)

    monkeypatch.setattr(gpt, "Scratch", Counted)
    fast = fresh_fast()
    want = direct(fast, tokens)["logits"]
    with torch.inference_mode():
        assert close(fast(tokens), want)
    assert len(made) == 1
    made.clear()
    with torch.enable_grad():
        fast(tokens)
    assert made == []
    handle = fast.transformer.h[0].register_forward_hook(lambda *a: None)
    with torch.inference_mode():
        assert close(fast(tokens), want)
    handle.remove()
    assert len(made) == 2  # each block its own: nothing watches inside either


# ---------------------------------------------------------------- the README's section

TOOLS = "Using ffinterp with other tools"
# Tools that are not ffinterp dependencies (auto-circuit cannot even install beside it as
# declared): their blocks were run by hand in a TransformerLens 3.9 environment.
NOT_INSTALLED = ("auto_circuit", "circuitsvis")


def tools_block(marker: str) -> str:
    """The one block of the section that contains ``marker``."""
    found = [b for b in python_blocks(TOOLS) if marker in b]
    assert len(found) == 1, marker
    return found[0]


def run_block(marker: str) -> dict:
    """Run a block as a user would paste it. nnsight reads the source of a trace's body, so the
    block's lines go into linecache under their own name (not README.md's)."""
    code, name = tools_block(marker), f"<README.md: {marker}>"
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    scope: dict = {}
    exec(compile(code, name, "exec"), scope)
    return scope


def test_readme_tools_section_runs_every_block_that_can_run_here() -> None:
    blocks = python_blocks(TOOLS)
    runnable = [b for b in blocks if not any(f"import {m}" in b or f"from {m}" in b for m in NOT_INSTALLED)]
    assert len(blocks) == 5
    # each of these is run by a test below
    assert [
        m for m in ("nnsight.NNsight", "patching.get_act_patch", "full_patterns") for b in runnable if m in b
    ] == [
        "nnsight.NNsight",
        "patching.get_act_patch",
        "full_patterns",
    ]
    assert len(runnable) == 3


def test_readme_nnsight_block_traces_in_inference_mode() -> None:
    scope = run_block("nnsight.NNsight")
    want = direct(scope["model"].fast, scope["x"])
    assert tuple(scope["attn"].shape) == (8, T, 128)
    assert torch.equal(scope["attn"], want["attn1"])
    assert torch.equal(scope["resid"], want["h1"])
    assert torch.equal(scope["logits"], want["logits"])


@pytest.mark.tl3
def test_readme_transformer_lens_patching_block_finds_the_heads_ffinterp_finds() -> None:
    scope = run_block("patching.get_act_patch")
    restored = scope["restored"].detach()
    assert tuple(restored.shape) == (2, 4)
    ours = activation_patch(scope["model"], scope["pair"], "z", by_pos=False).values
    assert (restored - ours).abs().max() <= 1e-4
    # the figures the README quotes
    assert round(float(restored[0, 0]), 2) == 1.00 and round(float(restored[1, 0]), 2) == 0.98
    others = torch.cat([restored[0, 1:], restored[1, 1:]])
    assert others.abs().max() <= 0.03


@pytest.mark.tl3
def test_readme_circuitsvis_inputs_are_the_hooked_patterns() -> None:
    scope = run_block("full_patterns")
    patterns, tokens, x = scope["patterns"], scope["tokens"], scope["x"]
    assert tuple(patterns.shape) == (4, 64, 64) and patterns.dtype == torch.float32
    assert len(tokens) == 64 and all(len(t) == 1 for t in tokens) and scope["names"][0] == "L1H0"
    _, cache = scope["model"].hooked.run_with_cache(x, names_filter=["blocks.1.attn.hook_pattern"])
    assert (patterns - cache["blocks.1.attn.hook_pattern"][0].cpu()).abs().max() <= 1e-6
    assert torch.allclose(patterns.sum(-1), torch.ones(4, 64), atol=1e-5)
