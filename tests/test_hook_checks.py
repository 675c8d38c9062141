"""Dead hooks are errors, not zeros: every patching, ablation and diagnosis routine checks
that each hook it relies on fired and that its patches reached the output.

A dead hook is simulated at one hook point by wrapping what TransformerLens registers there
(``HookPoint.add_hook``, which both 3.x and 4.x use):

* ``never_fires``: the hook is registered but never called (as on a hook point the forward
  pass skips);
* ``skipped``: the same for ffinterp's hooks only (TransformerLens's caching still works);
* ``drops_return``: the hook is called but what it returns is ignored (the patch changes
  nothing although the clean and corrupted activations differ).

``test_without_the_check_*`` switch the check off and show the same routines would then
return quietly wrong numbers, so the errors asserted here come from the check alone.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from ffinterp.analysis import hookcheck
from ffinterp.analysis.ablation import ablate_edges, ablate_heads, ablate_mlps
from ffinterp.analysis.attribution import attribution_patch
from ffinterp.analysis.diagnose import Diagnoser
from ffinterp.analysis.hookcheck import HookCheck
from ffinterp.analysis.pairs import Pair, flip_last_write, ignore_last_write
from ffinterp.analysis.patching import activation_patch, patch_metric, path_patch
from ffinterp.errors import DeadHookError, FFInterpError
from ffinterp.hooked import FFLModel
from ffinterp.language import sample
from ffinterp.models.constructed import READ_HEAD, circuit_model, decoy_sequence
from ffinterp.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.tl3

T = 16


def random_gpt(seed: int = 0) -> GPT:
    """Two layers with MLPs, pushed far from init so every site has a visible effect."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def rand() -> FFLModel:
    return FFLModel.from_fast(random_gpt(), device="cpu", name="random")


@pytest.fixture(scope="module")
def frozen() -> FFLModel:
    """Weights without gradients: attribution then captures each activation as a new leaf,
    so a dropped return value would leave that leaf out of the graph."""
    m = FFLModel.from_fast(random_gpt(), device="cpu", name="frozen")
    m.hooked.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def pair(rand: FFLModel) -> Pair:
    for row in sample(16, T, p_i=0.5, seed=3):
        try:
            p = flip_last_write(row)
            patch_metric(rand, p)
            return p
        except FFInterpError:
            continue
    raise AssertionError("no usable pair")


@pytest.fixture(scope="module")
def circuit() -> FFLModel:
    return circuit_model(block_size=64)


def _wrap_add_hook(monkeypatch, model: FFLModel, name: str, make: Callable) -> None:
    hp = model.hooked.hook_dict[name]
    original = hp.add_hook

    def add_hook(hook, *args, **kwargs):
        return original(make(hook), *args, **kwargs)

    monkeypatch.setattr(hp, "add_hook", add_hook)


def never_fires(monkeypatch, model: FFLModel, name: str) -> None:
    """Hooks added at ``name`` are registered but never called."""
    _wrap_add_hook(monkeypatch, model, name, lambda fn: lambda act, hook=None: None)


def skipped(monkeypatch, model: FFLModel, name: str) -> None:
    """As :func:`never_fires` for ffinterp's hooks only: TransformerLens's own caching hooks
    at ``name`` still run, so the failure shows in the patched runs, not the cache."""

    def make(fn):
        module = getattr(getattr(fn, "func", fn), "__module__", "") or ""
        return fn if module.startswith("transformer_lens") else (lambda act, hook=None: None)

    _wrap_add_hook(monkeypatch, model, name, make)


def drops_return(monkeypatch, model: FFLModel, name: str) -> None:
    """Hooks added at ``name`` are called, but what they return is ignored."""

    def make(fn):
        def ignored(act, hook=None):
            fn(act, hook=hook)
            return None

        return ignored

    _wrap_add_hook(monkeypatch, model, name, make)


def _one_line(err: pytest.ExceptionInfo, routine: str, name: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(routine) and name in msg, msg


# ---------------------------------------------------------------- routine x hook x failure

CASES = [
    # (routine label in the error, hook, call)
    ("activation_patch", "blocks.0.attn.hook_z", lambda m, p: activation_patch(m, p, "z")),
    ("activation_patch", "blocks.1.hook_resid_pre", lambda m, p: activation_patch(m, p, "resid_pre")),
    ("activation_patch", "blocks.0.hook_mlp_out", lambda m, p: activation_patch(m, p, "mlp_out")),
    ("activation_patch", "blocks.1.attn.hook_pattern", lambda m, p: activation_patch(m, p, "pattern")),
    ("activation_patch", "blocks.1.attn.hook_k", lambda m, p: activation_patch(m, p, "k", by_pos=False)),
    ("path_patch", "blocks.0.attn.hook_z", lambda m, p: path_patch(m, p, "logits")),
    ("path_patch", "blocks.1.attn.hook_k", lambda m, p: path_patch(m, p, [(1, 0)], via="k")),
    ("path_patch", "blocks.1.hook_mlp_out", lambda m, p: path_patch(m, p, "logits", freeze_mlps=True)),
    ("ablate_heads", "blocks.1.attn.hook_z", lambda m, p: ablate_heads(m, p.clean)),
    ("ablate_heads", "blocks.0.attn.hook_z", lambda m, p: ablate_heads(m, p.clean, mode="mean")),
    ("ablate_mlps", "blocks.1.hook_mlp_out", lambda m, p: ablate_mlps(m, p.clean, mode="resample")),
    ("ablate_edges", "blocks.1.attn.hook_z", lambda m, p: ablate_edges(m, p.clean, (1, 0), mode="zero")),
]
IDS = [f"{k}-{routine}-{name}" for k, (routine, name, _) in enumerate(CASES)]


KILLS = [never_fires, skipped, drops_return]


@pytest.mark.parametrize("routine, name, call", CASES, ids=IDS)
@pytest.mark.parametrize("kill", KILLS, ids=[k.__name__ for k in KILLS])
def test_dead_hook_raises(rand: FFLModel, pair: Pair, monkeypatch, routine, name, call, kill) -> None:
    call(rand, pair)  # healthy: runs
    kill(monkeypatch, rand, name)
    with pytest.raises(DeadHookError) as err:
        call(rand, pair)
    _one_line(err, routine, name)


@pytest.mark.parametrize("name", ["blocks.1.attn.hook_q", "blocks.1.attn.hook_pattern"])
def test_edge_ablation_needs_every_grab(rand: FFLModel, pair: Pair, monkeypatch, name) -> None:
    never_fires(monkeypatch, rand, name)
    with pytest.raises(DeadHookError) as err:
        ablate_edges(rand, pair.clean, (1, 0), mode="renorm")
    _one_line(err, "ablate_edges", name)


@pytest.mark.parametrize("kill", KILLS, ids=[k.__name__ for k in KILLS])
def test_attribution_patch_dead_hook(frozen: FFLModel, pair: Pair, monkeypatch, kill) -> None:
    name = "blocks.0.attn.hook_z"
    attribution_patch(frozen, pair, "z")
    kill(monkeypatch, frozen, name)
    with pytest.raises(DeadHookError) as err:
        attribution_patch(frozen, pair, "z")
    _one_line(err, "attribution_patch", name)


# ---------------------------------------------------------------- diagnosis


@pytest.fixture(scope="module")
def glitchy() -> FFLModel:
    """The circuit with a weak recency bias: four decoy writes make its read head err."""
    return circuit_model(sharpness=5.0, block_size=64)


@pytest.fixture(scope="module")
def diagnoser(glitchy: FFLModel) -> Diagnoser:
    return Diagnoser(glitchy, seq_len=64, n_reference=8)


GLITCH = decoy_sequence(gap=40, n_decoys=4)


def test_diagnosis_dead_pattern_hook(glitchy: FFLModel, diagnoser: Diagnoser, monkeypatch) -> None:
    tokens, read_pos = GLITCH
    scores = glitchy.predict_reads(tokens)
    assert float(scores.margin[scores.reads.pos == read_pos]) < 0  # a glitch
    name = "blocks.1.attn.hook_pattern"
    _, margin = diagnoser.force_carrier(tokens, read_pos, [READ_HEAD])
    assert margin > 0  # forcing the read head onto the last write fixes the read
    never_fires(monkeypatch, glitchy, name)
    with pytest.raises(DeadHookError) as err:
        diagnoser.force_carrier(tokens, read_pos, [READ_HEAD])
    _one_line(err, "diagnose (force_carrier)", name)
    with pytest.raises(DeadHookError) as err:  # the cached attention rows need the hook too
        diagnoser.diagnose(tokens, read_pos)
    assert name in str(err.value)


def test_diagnosis_does_not_swallow_a_dead_patch(
    glitchy: FFLModel, diagnoser: Diagnoser, monkeypatch
) -> None:
    """The clean-output patch catches bad-input errors to record 'not applicable'; a dead
    hook must not end up there as a quiet note."""
    tokens, read_pos = GLITCH
    out = diagnoser.diagnose(tokens, read_pos)
    assert out["causal"]["clean_output"]["applicable"]
    name = "blocks.1.attn.hook_z"
    drops_return(monkeypatch, glitchy, name)
    with pytest.raises(DeadHookError) as err:
        diagnoser.diagnose(tokens, read_pos)
    _one_line(err, "activation_patch", name)


# ---------------------------------------------------------------- healthy runs and real nulls


def _canaried(monkeypatch) -> list[list[str]]:
    """Per verify call, the names it had to canary (patched but never moved the output)."""
    calls: list[list[str]] = []
    original = HookCheck.verify

    def spy(self, also=()):
        calls.append([n for n in dict.fromkeys([*self.patched, *also]) if n not in self.live])
        return original(self, also)

    monkeypatch.setattr(HookCheck, "verify", spy)
    return calls


def test_real_null_effects_pass_through_the_canary(circuit: FFLModel, monkeypatch) -> None:
    """The read head's query depends on position only, so the path from layer 0 through it
    is a true null: nothing moves, the canary proves the hooks live, and zeros come back."""
    calls = _canaried(monkeypatch)
    pair = ignore_last_write(sample(1, 64, p_i=0.6, seed=5)[0])
    res = path_patch(circuit, pair, [READ_HEAD], via="q")
    assert res.values[0].abs().max() <= 1e-4
    assert "blocks.1.attn.hook_q" in calls[-1]


def test_check_is_cheap_on_healthy_runs(rand: FFLModel, pair: Pair, monkeypatch) -> None:
    """No canary pass when every patched hook moved the output."""
    calls = _canaried(monkeypatch)
    activation_patch(rand, pair, "z")
    ablate_heads(rand, pair.clean)
    assert calls == [[], []]


def test_moved_ignores_float_noise() -> None:
    base = torch.randn(1, 8, 5)
    assert not hookcheck.moved(base + 1e-7, base).any()
    bumped = base.repeat(2, 1, 1)
    bumped[1, 3, 2] += 0.1
    assert hookcheck.moved(bumped, base).tolist() == [False, True]


# ---------------------------------------------------------------- without the check


def _no_checks(monkeypatch) -> None:
    monkeypatch.setattr(HookCheck, "verify", lambda self, also=(): None)
    monkeypatch.setattr(
        HookCheck,
        "run",
        lambda self, tokens, hooks, patched=None: self.hk.run_with_hooks(tokens, fwd_hooks=hooks),
    )


@pytest.mark.parametrize("kill", [skipped, drops_return], ids=["skipped", "drops_return"])
def test_without_the_check_patching_returns_silent_zeros(
    rand: FFLModel, pair: Pair, monkeypatch, kill
) -> None:
    healthy = activation_patch(rand, pair, "z").values
    assert healthy[0].abs().max() > 1e-3
    kill(monkeypatch, rand, "blocks.0.attn.hook_z")
    _no_checks(monkeypatch)
    silent = activation_patch(rand, pair, "z").values
    assert silent[0].abs().max() <= 1e-5  # every layer-0 head "has no effect"
    assert torch.allclose(silent[1], healthy[1], atol=1e-5)


def test_without_the_check_ablation_and_diagnosis_return_quietly(
    rand: FFLModel, pair: Pair, glitchy: FFLModel, diagnoser: Diagnoser, monkeypatch
) -> None:
    healthy = ablate_heads(rand, pair.clean)
    never_fires(monkeypatch, rand, "blocks.1.attn.hook_z")
    never_fires(monkeypatch, glitchy, "blocks.1.attn.hook_pattern")
    _no_checks(monkeypatch)
    silent = ablate_heads(rand, pair.clean)
    assert (silent.values[1] - silent.null).abs().max() <= 1e-5  # "no head in layer 1 matters"
    assert (healthy.values[1] - healthy.null).abs().max() > 1e-2
    _, margin = diagnoser.force_carrier(*GLITCH, [READ_HEAD])
    assert margin < 0  # the intervention silently did nothing: the glitch looks unfixable
