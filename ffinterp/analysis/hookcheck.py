"""Hooks that fire and patches that take effect, checked on every run.

TransformerLens users report hooks that silently never fire and patches that change
nothing: a hook added to a hook point outside the forward path, a name that resolves to
another point, a return value the model drops. A sweep built on such a hook returns zeros
that look like "no effect". Every patching, ablation and diagnosis routine in ffinterp
therefore runs its hooks through one :class:`HookCheck`, which

* records the name of each hook as it fires and, after the run, raises
  :class:`~ffinterp.errors.DeadHookError` for any that did not (for ``run_with_cache``:
  any name missing from the cache);
* compares each patched run's logits with the unpatched run's. A hook name whose patches
  never moved the output gets one *canary*: a large random perturbation at that hook alone.
  If that leaves the output unchanged too, what the hook returns is dropped:
  :class:`~ffinterp.errors.DeadHookError`. If the canary moves the output, the patches'
  null effect is real (a saturated softmax, a head with no output weights) and is reported
  as a value, as it should be.

The cost is a set of names per run and one comparison of logits per pass; the canary pass
(one batched forward for all such names) runs only when some patched hook moved nothing.
Only hook names, ``run_with_hooks`` and ``run_with_cache`` are used, which TransformerLens
3.x and 4.x share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ffinterp.errors import DeadHookError

#: Logits move when some entry changes by more than this times (1 + the largest |logit|):
#: far above float noise between batch sizes, far below any patch worth reporting.
MOVE_TOL = 1e-4

#: The canary adds noise this many times the activation's largest entry: large enough that even
#: a saturated model (the hand-built circuit's sharp softmaxes) moves when the hook is live.
CANARY_SCALE = 100.0

Hook = tuple[str, Callable]


def moved(
    logits: Float[Tensor, "batch seq vocab"], base: Float[Tensor, "1 seq vocab"]
) -> Float[Tensor, " batch"]:
    """Per row: do these logits differ from the unpatched ``base`` beyond float noise?"""
    base = base.float()
    tol = MOVE_TOL * (1.0 + float(base.abs().amax()))
    return (logits.float() - base).flatten(1).abs().amax(1).cpu() > tol


class HookCheck:
    """The checks for one call of one routine on one (corrupted or target) sequence.

    ``routine`` names the caller in errors (``activation_patch``, ``ablate_heads`` ...);
    ``tokens`` is the unpatched input ``[1, seq]`` the canary runs on; ``base`` its logits
    when the caller already has them (else one forward computes them when first needed).
    """

    def __init__(
        self,
        hk,
        routine: str,
        tokens: Int[Tensor, "1 seq"],
        base: Float[Tensor, "1 seq vocab"] | None = None,
    ) -> None:
        self.hk, self.routine, self.tokens = hk, routine, tokens[:1]
        self._base = base
        self.fired: set[str] = set()
        self.live: set[str] = set()  # names whose patches moved the output (or passed the canary)
        self.patched: set[str] = set()  # names that patched something, in order to verify

    @property
    def base(self) -> Float[Tensor, "1 seq vocab"]:
        """The unpatched logits that patched runs are compared with."""
        if self._base is None:
            with torch.inference_mode():
                self._base = self.hk(self.tokens)
        return self._base

    @base.setter
    def base(self, logits: Float[Tensor, "1 seq vocab"]) -> None:
        self._base = logits

    def dead(self, name: str, what: str) -> DeadHookError:
        return DeadHookError(f"{self.routine}: hook {name} {what}")

    # ------------------------------------------------------------ runs

    def wrap(self, hooks: Iterable[Hook]) -> list[Hook]:
        """The hooks, each recording its name in :attr:`fired` before it runs."""
        fired = self.fired

        def recording(name: str, fn: Callable) -> Callable:
            def hook(act: Tensor, hook=None) -> Tensor:
                fired.add(name)
                return fn(act, hook=hook)

            return hook

        return [(name, recording(name, fn)) for name, fn in hooks]

    def run(
        self,
        tokens: Int[Tensor, "batch seq"],
        hooks: Sequence[Hook],
        patched: Mapping[str, Tensor | None] | None = None,
    ) -> Float[Tensor, "batch seq vocab"]:
        """``run_with_hooks`` that raises if a hook did not fire. ``patched`` maps the names
        whose hooks change the run to the rows they change (``None``: all); a name is live
        once one of its rows moves the output. Gradients follow the caller's context."""
        self.fired.clear()
        logits = self.hk.run_with_hooks(tokens, fwd_hooks=self.wrap(hooks))
        for name, _ in hooks:
            if name not in self.fired:
                raise self.dead(name, "never fired (is it on the forward path?)")
        if patched:
            rows = moved(logits.detach(), self.base)
            for name, idx in patched.items():
                self.patched.add(name)
                if name not in self.live and bool(rows.any() if idx is None else rows[idx.cpu()].any()):
                    self.live.add(name)
        return logits

    def cache(
        self, tokens: Int[Tensor, "batch seq"], names: Sequence[str]
    ) -> tuple[Float[Tensor, "batch seq vocab"], dict[str, Tensor]]:
        """``run_with_cache`` of ``names`` that raises if one of them was not cached."""
        logits, c = self.hk.run_with_cache(tokens, names_filter=list(names))
        got = set(c.keys())
        for name in names:
            if name not in got:
                raise self.dead(name, "never fired (it is missing from the cache)")
        return logits, {n: c[n] for n in names}

    # ------------------------------------------------------------ after the runs

    def verify(self, also: Iterable[str] = ()) -> None:
        """Canary every patched name (and those in ``also``) not yet shown live: one batched
        run, row ``i + 1`` perturbed at name ``i``; a name whose row stays put is dead."""
        todo = [n for n in dict.fromkeys([*sorted(self.patched), *also]) if n not in self.live]
        if not todo:
            return
        gen = torch.Generator().manual_seed(0)

        def perturb(row: int) -> Callable:
            def hook(act: Tensor, hook=None) -> Tensor:
                act = act.clone()
                noise = torch.randn(act.shape[1:], generator=gen).to(act.device, act.dtype)
                scale = CANARY_SCALE * act[row].float().abs().amax().clamp_min(1.0)
                act[row] = act[row] + noise * scale.to(act.dtype)
                return act

            return hook

        hooks = [(name, perturb(k + 1)) for k, name in enumerate(todo)]
        with torch.inference_mode():
            logits = self.run(self.tokens.repeat(len(todo) + 1, 1), hooks)
        rows = moved(logits[1:], logits[:1])
        for k, name in enumerate(todo):
            if not rows[k]:
                raise self.dead(
                    name,
                    "fires, but what it returns never reaches the output (even a random "
                    "perturbation there changes nothing)",
                )
            self.live.add(name)

    def check_grads(self, names: Sequence[str], grads: Sequence[Tensor | None]) -> None:
        """Attribution: a hook whose returned activation has no gradient was cut out of the graph."""
        for name, g in zip(names, grads):
            if g is None:
                raise self.dead(
                    name, "fires, but what it returns is not on the path to the output (no gradient)"
                )


__all__ = ["CANARY_SCALE", "MOVE_TOL", "HookCheck", "moved"]
