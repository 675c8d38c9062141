"""The seam between ffinterp and TransformerLens: the one module that checks its version.

TransformerLens 4.x removed ``HookedTransformer``; its successor is ``TransformerBridge``,
booted here with ``boot_native`` from a config. Many researchers still run 3.x, whose
``HookedTransformer`` their other tools (auto-circuit, EAP-IG) need. ffinterp supports both
lines: :func:`build_hooked` builds whichever the installed TransformerLens offers and maps
the fast model's nanoGPT weights into it. Everything else in ffinterp uses only what both
lines share (see :data:`SHARED_HOOKS`): the hook names below, ``run_with_cache`` (with
``names_filter``), ``run_with_hooks``, ``hooks()``, ``cfg`` (``n_layers``, ``n_heads``,
``d_head``, ``d_model``, ``n_ctx``, ``d_vocab``) and the stacked weight properties
``W_Q W_K W_V`` ``[layer, head, d_model, d_head]``, ``W_O`` ``[layer, head, d_head, d_model]``,
``b_Q b_K b_V`` ``[layer, head, d_head]``, ``b_O`` ``[layer, d_model]``, ``W_E``, ``W_pos``,
``W_U``.

Not shared: per-head ``blocks.{l}.attn.hook_result`` and the split Q/K/V inputs exist only
on 3.x with ``use_attn_result`` / ``use_split_qkv_input``; a native bridge cannot compute
them, so compute per-head outputs from ``hook_z`` and ``W_O`` instead.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ffinterp.errors import FFInterpError
from ffinterp.models.gpt import GPTConfig

TL_VERSION: str = importlib.metadata.version("transformer-lens")
TL_MAJOR: int = int(TL_VERSION.split(".")[0])
#: ``True`` on TransformerLens 4.x (``TransformerBridge``), ``False`` on 3.x (``HookedTransformer``).
IS_BRIDGE: bool = TL_MAJOR >= 4
#: A short human name of the line in use, for reprs and reports.
TL_LINE: str = f"TransformerLens {TL_VERSION} ({'TransformerBridge' if IS_BRIDGE else 'HookedTransformer'})"

#: Options of 3.x's ``HookedTransformerConfig`` that edge-level tools switch on.
TL3_OPTIONS = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in")

#: Hook names (``{l}`` is the layer) present on both lines for every GPT config; ffinterp's
#: analysis code uses only these. ``hook_mlp_out`` exists only when the model has MLPs.
SHARED_HOOKS = (
    "hook_embed",
    "hook_pos_embed",
    "blocks.{l}.hook_resid_pre",
    "blocks.{l}.attn.hook_q",
    "blocks.{l}.attn.hook_k",
    "blocks.{l}.attn.hook_v",
    "blocks.{l}.attn.hook_attn_scores",
    "blocks.{l}.attn.hook_pattern",
    "blocks.{l}.attn.hook_z",
    "blocks.{l}.hook_attn_out",
    "blocks.{l}.hook_resid_post",
)
MLP_HOOKS = ("blocks.{l}.hook_mlp_out",)


def shared_hook_names(cfg: GPTConfig) -> list[str]:
    """Every shared hook name of a model with this config, layer by layer."""
    per_layer = [h for h in SHARED_HOOKS if "{l}" in h] + ([] if cfg.attn_only else list(MLP_HOOKS))
    top = [h for h in SHARED_HOOKS if "{l}" not in h]
    return top + [h.format(l=layer) for layer in range(cfg.n_layer) for h in per_layer]


def build_hooked(
    cfg: GPTConfig,
    state_dict: dict[str, Tensor],
    device: torch.device | str = "cpu",
    **tl3_options: bool,
) -> nn.Module:
    """The hooked view of a fast GPT: a ``TransformerBridge`` on 4.x, a ``HookedTransformer`` on 3.x.

    ``state_dict`` is the fast model's (nanoGPT names). ``tl3_options`` are 3.x's
    ``use_attn_result``, ``use_split_qkv_input`` and ``use_hook_mlp_in``; on 4.x those the
    bridge can honour are set through its setters and the others raise one clear error.
    The model comes back in eval mode on ``device``.
    """
    unknown = sorted(set(tl3_options) - set(TL3_OPTIONS))
    if unknown:
        raise FFInterpError(f"unknown hooked-model option(s) {unknown} (known: {', '.join(TL3_OPTIONS)})")
    sd = {k.removeprefix("_orig_mod."): v.detach().to("cpu", torch.float32) for k, v in state_dict.items()}
    if IS_BRIDGE:
        return _build_bridge(cfg, sd, torch.device(device), tl3_options)
    return _build_hooked_transformer(cfg, sd, torch.device(device), tl3_options)


# ---------------------------------------------------------------- shared weight mapping


def _get(sd: dict[str, Tensor], key: str, shape: tuple[int, ...] | None = None) -> Tensor:
    """A weight, or zeros of ``shape`` where the source has no bias (``bias=False``)."""
    if key in sd:
        return sd[key]
    if shape is None:
        raise FFInterpError(f"fast-model state dict lacks {key!r}; cannot build the hooked model")
    return torch.zeros(shape)


def _native_weights(cfg: GPTConfig, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """nanoGPT names -> the TL-native model's Linear/Embedding names (same [out, in] layout)."""
    c, n_ctx = cfg.n_embd, cfg.block_size
    out = {
        "tok_embed.weight": sd["transformer.wte.weight"],
        "pos.weight": sd["transformer.wpe.weight"][:n_ctx],
    }
    for layer in range(cfg.n_layer):
        src, dst = f"transformer.h.{layer}.", f"layers.{layer}."
        w_qkv = sd[src + "attn.c_attn.weight"]
        b_qkv = _get(sd, src + "attn.c_attn.bias", (3 * c,))
        for k, name in enumerate("qkv"):
            out[dst + f"attn.{name}.weight"] = w_qkv[k * c : (k + 1) * c]
            out[dst + f"attn.{name}.bias"] = b_qkv[k * c : (k + 1) * c]
        out[dst + "attn.o.weight"] = sd[src + "attn.c_proj.weight"]
        out[dst + "attn.o.bias"] = _get(sd, src + "attn.c_proj.bias", (c,))
        lns = [("ln_1", "ln1")] + ([] if cfg.attn_only else [("ln_2", "ln2")])
        if not cfg.attn_only:
            out[dst + "mlp.fc_in.weight"] = sd[src + "mlp.c_fc.weight"]
            out[dst + "mlp.fc_in.bias"] = _get(sd, src + "mlp.c_fc.bias", (4 * c,))
            out[dst + "mlp.fc_out.weight"] = sd[src + "mlp.c_proj.weight"]
            out[dst + "mlp.fc_out.bias"] = _get(sd, src + "mlp.c_proj.bias", (c,))
        if cfg.layer_norm:
            for a, b in lns:
                out[dst + f"{b}.weight"] = sd[src + f"{a}.weight"]
                out[dst + f"{b}.bias"] = _get(sd, src + f"{a}.bias", (c,))
    if cfg.layer_norm:
        out["ln_out.weight"] = sd["transformer.ln_f.weight"]
        out["ln_out.bias"] = _get(sd, "transformer.ln_f.bias", (c,))
    out["head.weight"] = sd["lm_head.weight"]
    return out


# ---------------------------------------------------------------- 4.x: TransformerBridge


def _build_bridge(cfg: GPTConfig, sd: dict[str, Tensor], device: torch.device, options: dict) -> nn.Module:
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    tl_cfg = TransformerBridgeConfig(
        d_model=cfg.n_embd,
        d_head=cfg.d_head,
        n_layers=cfg.n_layer,
        n_ctx=cfg.block_size,
        n_heads=cfg.n_head,
        d_vocab=cfg.vocab_size,
        d_mlp=4 * cfg.n_embd,
        act_fn=cfg.activation,
        eps=cfg.ln_eps,
        normalization_type="LN" if cfg.layer_norm else None,
        attn_only=cfg.attn_only,
        positional_embedding_type="standard",  # sinusoidal tables live in wpe, so both are a table
        init_weights=False,  # every weight is overwritten below
        device=str(device),
        default_prepend_bos=False,
        tokenizer_prepends_bos=False,
        model_name="ffinterp",
    )
    bridge = TransformerBridge.boot_native(tl_cfg, device=device).eval()
    # The bridge wraps each native submodule; its parameters keep the native names with
    # "_original_component." segments inserted. Copy in place so every view shares them.
    params = {k.replace("_original_component.", ""): p for k, p in bridge.original_model.named_parameters()}
    weights = _native_weights(cfg, sd)
    missing = sorted(set(params) - set(weights))
    extra = sorted(set(weights) - set(params))
    if missing or extra:
        raise FFInterpError(
            "TransformerBridge layout differs from ffinterp's mapping "
            f"(missing {missing[:4]}, unexpected {extra[:4]})"
        )
    with torch.no_grad():
        for k, p in params.items():
            if p.shape != weights[k].shape:
                raise FFInterpError(f"{k}: shape {tuple(weights[k].shape)} does not fit {tuple(p.shape)}")
            p.copy_(weights[k])
    for name, on in options.items():
        if not on:
            continue
        try:
            getattr(bridge, f"set_{name}")(True)
        except NotImplementedError:
            raise FFInterpError(
                f"{name} is not available on a native TransformerBridge ({TL_LINE}); install "
                '"transformer-lens>=3.5,<4" for HookedTransformer, '
                "or compute per-head terms from hook_z and W_O"
            ) from None
    return bridge


# ---------------------------------------------------------------- 3.x: HookedTransformer


def _ht_weights(cfg: GPTConfig, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """nanoGPT names -> HookedTransformer's per-head layout (W_Q ``[head, d_model, d_head]`` ...)."""
    c, h, d = cfg.n_embd, cfg.n_head, cfg.d_head
    nat = _native_weights(cfg, sd)
    out = {"embed.W_E": nat["tok_embed.weight"], "pos_embed.W_pos": nat["pos.weight"]}
    for layer in range(cfg.n_layer):
        src, dst = f"layers.{layer}.", f"blocks.{layer}."
        for name in "qkv":
            # Linear weight [h*d, c] -> [h, c, d]
            out[dst + f"attn.W_{name.upper()}"] = (
                nat[src + f"attn.{name}.weight"].view(h, d, c).transpose(1, 2)
            )
            out[dst + f"attn.b_{name.upper()}"] = nat[src + f"attn.{name}.bias"].view(h, d)
        out[dst + "attn.W_O"] = nat[src + "attn.o.weight"].T.reshape(h, d, c)
        out[dst + "attn.b_O"] = nat[src + "attn.o.bias"]
        if not cfg.attn_only:
            out[dst + "mlp.W_in"] = nat[src + "mlp.fc_in.weight"].T
            out[dst + "mlp.b_in"] = nat[src + "mlp.fc_in.bias"]
            out[dst + "mlp.W_out"] = nat[src + "mlp.fc_out.weight"].T
            out[dst + "mlp.b_out"] = nat[src + "mlp.fc_out.bias"]
        if cfg.layer_norm:
            for ln in ("ln1",) + (() if cfg.attn_only else ("ln2",)):
                out[dst + f"{ln}.w"] = nat[src + f"{ln}.weight"]
                out[dst + f"{ln}.b"] = nat[src + f"{ln}.bias"]
    if cfg.layer_norm:
        out["ln_final.w"] = nat["ln_out.weight"]
        out["ln_final.b"] = nat["ln_out.bias"]
    out["unembed.W_U"] = nat["head.weight"].T
    out["unembed.b_U"] = torch.zeros(cfg.vocab_size)
    return {k: v.contiguous() for k, v in out.items()}


def _build_hooked_transformer(
    cfg: GPTConfig, sd: dict[str, Tensor], device: torch.device, options: dict[str, Any]
) -> nn.Module:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tl_cfg = HookedTransformerConfig(
        d_model=cfg.n_embd,
        d_head=cfg.d_head,
        n_layers=cfg.n_layer,
        n_ctx=cfg.block_size,
        n_heads=cfg.n_head,
        d_vocab=cfg.vocab_size,
        d_mlp=4 * cfg.n_embd,
        act_fn=cfg.activation,
        eps=cfg.ln_eps,
        normalization_type="LN" if cfg.layer_norm else None,
        attn_only=cfg.attn_only,
        positional_embedding_type="standard",
        init_weights=False,
        device=str(device),
        default_prepend_bos=False,
        model_name="ffinterp",
        **{k: bool(v) for k, v in options.items()},
    )
    with warnings.catch_warnings():
        # 3.9 warns that HookedTransformer goes away in 4.0; a 3.x user chose it on purpose.
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        model = HookedTransformer(tl_cfg)
    weights = _ht_weights(cfg, sd)
    result = model.load_state_dict(weights, strict=False)
    params = {k for k, _ in model.named_parameters()}
    missing = sorted(k for k in result.missing_keys if k in params)
    if missing or result.unexpected_keys:
        raise FFInterpError(
            f"HookedTransformer layout differs from ffinterp's mapping "
            f"(missing {missing[:4]}, unexpected {list(result.unexpected_keys)[:4]})"
        )
    return model.eval()  # the constructor already placed it on cfg.device
