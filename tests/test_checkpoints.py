"""Checkpoint loading: every source gives its own logits, every bad file one clear line."""

from __future__ import annotations

import json
import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from ffinterp.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from ffinterp.errors import FFInterpError
from ffinterp.language import sample
from ffinterp.models.gpt import GPT, GPTConfig
from ffinterp.models.lstm import LSTM, LSTMConfig

T = 64


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return sample(4, T, 0.5, seed=11)


def one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg, msg
    return msg


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Weights far from the init, so a transposed or mis-mapped tensor shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else noise)


# ---------------------------------------------------------------- ffinterp and LSTM


@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_ffinterp_round_trip_keeps_logits(tmp_path, tokens, pos):
    model = GPT(
        GPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=T, pos_embedding=pos, ln_eps=1e-3)
    ).eval()
    randomize(model)
    save_checkpoint(tmp_path / "run" / "ckpt.pt", model, iter_num=7, ffl={"note": "x"})
    for spec in (tmp_path / "run" / "ckpt.pt", tmp_path / "run", str(tmp_path / "run" / "ckpt.pt")):
        loaded = load_checkpoint(spec)
        assert (loaded.arch, loaded.source) == ("gpt", "ffinterp")
        assert loaded.model.cfg == model.cfg and loaded.meta["note"] == "x" and loaded.raw["iter_num"] == 7
        assert not loaded.model.training
        with torch.no_grad():
            assert torch.equal(loaded.model(tokens), model(tokens))
    assert not [p for p in (tmp_path / "run").iterdir() if p.name != "ckpt.pt"]  # no temp files left


def test_lstm_round_trip(tmp_path, tokens):
    model = LSTM(LSTMConfig(hidden=16)).eval()
    save_checkpoint(tmp_path / "ckpt.pt", model)
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded.arch == "lstm" and loaded.model.cfg.hidden == 16 and "LSTM" in loaded.summary
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens), model(tokens))
    # Without the ffl entry the shape is read off the weights.
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    del ckpt["ffl"]
    torch.save(ckpt, tmp_path / "bare.pt")
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "bare.pt").model(tokens), model(tokens))


# ---------------------------------------------------------------- nanoGPT


def nanogpt_reference(sd: dict, args: dict, idx: torch.Tensor) -> torch.Tensor:
    """nanoGPT's model.py forward written out from its state dict (explicit mask, exact GELU)."""
    d, h = args["n_embd"], args["n_head"]
    t = idx.shape[1]

    def ln(x, name):
        return F.layer_norm(x, (d,), sd[f"{name}.weight"], sd.get(f"{name}.bias"), 1e-5)

    def lin(x, name):
        return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:t]
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
    for i in range(args["n_layer"]):
        p = f"transformer.h.{i}"
        q, k, v = lin(ln(x, f"{p}.ln_1"), f"{p}.attn.c_attn").split(d, dim=2)
        q, k, v = (z.view(*z.shape[:2], h, d // h).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
        y = att.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        x = x + lin(y.transpose(1, 2).reshape(*x.shape), f"{p}.attn.c_proj")
        x = x + lin(F.gelu(lin(ln(x, f"{p}.ln_2"), f"{p}.mlp.c_fc")), f"{p}.mlp.c_proj")
    return F.linear(ln(x, "transformer.ln_f"), sd["lm_head.weight"])


def nanogpt_checkpoint(bias: bool, *, compiled: bool, mask_buffer: bool) -> tuple[dict, dict]:
    """A ``ckpt.pt`` dict exactly as nanoGPT's train.py writes it (tied lm_head included)."""
    args = dict(n_layer=2, n_head=4, n_embd=32, block_size=T, bias=bias, vocab_size=5, dropout=0.0)
    model = GPT(GPTConfig(**args))
    randomize(model, seed=3)
    sd = model.state_dict()
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # nanoGPT ties them
    if mask_buffer:  # nanoGPT before flash attention registered the causal mask
        for i in range(args["n_layer"]):
            sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(sample(2, T, seed=0)).sum().backward()
    opt.step()
    ckpt = {
        "model": {("_orig_mod." if compiled else "") + k: v for k, v in sd.items()},
        "optimizer": opt.state_dict(),
        "model_args": args,
        "iter_num": 5000,
        "best_val_loss": torch.tensor(0.0123),
        "config": {"out_dir": "out-flipflop", "compile": compiled, "learning_rate": 3e-4, "dataset": "ff"},
    }
    return ckpt, {k: v.clone() for k, v in sd.items()}


@pytest.mark.parametrize("bias,compiled,mask_buffer", [(True, True, True), (False, False, True)])
def test_nanogpt_checkpoint_gives_nanogpts_logits(tmp_path, tokens, bias, compiled, mask_buffer):
    ckpt, sd = nanogpt_checkpoint(bias, compiled=compiled, mask_buffer=mask_buffer)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded.source == "nanogpt" and loaded.model.cfg.activation == "gelu"
    with torch.no_grad():
        got = loaded.model(tokens)
    want = nanogpt_reference(sd, ckpt["model_args"], tokens)
    assert (got - want).abs().max() <= 1e-4


def test_nanogpt_wrong_vocab_says_what_was_expected(tmp_path):
    ckpt, _ = nanogpt_checkpoint(True, compiled=False, mask_buffer=False)
    ckpt["model_args"]["vocab_size"] = 50304
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "ckpt.pt")
    assert "vocab_size is 50304, expected 5" in one_line_error(e)


def test_weights_that_do_not_fit_are_named(tmp_path):
    ckpt, _ = nanogpt_checkpoint(True, compiled=False, mask_buffer=False)
    ckpt["model_args"]["n_embd"] = 64
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "ckpt.pt")
    assert "do not fit the gpt architecture" in one_line_error(e)


# ---------------------------------------------------------------- Hugging Face GPT-2


def hf_gpt2(tmp_path, fmt: str, **cfg_overrides):
    """A random small GPT2LMHeadModel saved to a folder; returns (folder, model)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=5, n_layer=2, n_embd=64, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    for k, v in cfg_overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    randomize(hf, seed=1, std=0.15)
    hf.tie_weights()
    folder = tmp_path / f"hf-{fmt}"
    if fmt == "safetensors":
        hf.save_pretrained(folder)
    elif fmt == "sharded":
        hf.save_pretrained(folder, max_shard_size="100KB")
        assert (folder / "model.safetensors.index.json").exists()
    else:  # what transformers 4.x wrote: a pickled state dict, tied head and mask buffers included
        hf.config.save_pretrained(folder)
        sd = dict(hf.state_dict())
        for i in range(cfg.n_layer):
            sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool))[None, None]
            sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(sd, folder / "pytorch_model.bin")
    return folder, hf


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded"])
def test_hf_gpt2_folder_gives_hfs_own_logits(tmp_path, tokens, fmt):
    folder, hf = hf_gpt2(tmp_path, fmt, layer_norm_epsilon=1e-3)
    with torch.no_grad():
        want = hf(tokens).logits
    loaded = load_checkpoint(folder)
    cfg = loaded.model.cfg
    assert loaded.source == "hf" and (cfg.activation, cfg.ln_eps, cfg.block_size) == ("gelu_new", 1e-3, 64)
    with torch.no_grad():
        got = loaded.model(tokens)
    assert (got - want).abs().max() <= 1e-4
    # The weights file itself is accepted too; it means its folder.
    weights = next(folder.glob("*.safetensors" if fmt != "bin" else "*.bin"))
    assert load_checkpoint(weights).path == str(folder)


def test_hf_numerics_matter(tmp_path, tokens):
    """Exact GELU instead of HF's tanh GELU would be visibly wrong: the test above has teeth."""
    folder, hf = hf_gpt2(tmp_path, "safetensors")
    model = load_checkpoint(folder).model
    with torch.no_grad():
        want = hf(tokens).logits
        model.cfg.activation = "gelu"
        for block in model.transformer.h:
            block.mlp.approximate = "none"
        assert (model(tokens) - want).abs().max() > 1e-4


def test_hf_folder_refusals(tmp_path):
    folder, _ = hf_gpt2(tmp_path, "safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    cases = {
        "vocab_size is 50257, expected 5": {"vocab_size": 50257},
        "activation_function 'relu' is not supported": {"activation_function": "relu"},
        "model_type is 'llama', expected 'gpt2'": {"model_type": "llama"},
    }
    for expected, change in cases.items():
        (folder / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(folder)
        assert expected in one_line_error(e)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(folder)
    assert "truncated or corrupt" in one_line_error(e)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights: expected model.safetensors or pytorch_model.bin"):
        load_checkpoint(folder)


# ---------------------------------------------------------------- unsafe and broken files


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the refused file is a plain pickle
@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_pickle_that_would_run_code_is_refused(tmp_path, how):
    marker = tmp_path / "pwned"
    evil = {"model_args": {"vocab_size": 5}, "model": RunsCode(marker)}
    path = tmp_path / "ckpt.pt"
    if how == "torch.save":
        torch.save(evil, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(evil, f)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = one_line_error(e)
    assert "refused: unpickling would run code" in msg and "only tensors and plain data" in msg
    assert not marker.exists()


def test_broken_files_get_one_clear_line(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=T))
    save_checkpoint(tmp_path / "ckpt.pt", model)
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_bytes(b"hello, not a checkpoint")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "nothing").mkdir()
    cases = {
        "trunc.pt": "truncated or corrupt",
        "empty.pt": "empty file",
        "text.pt": "not a torch checkpoint: it looks like text ('hello, not a checkpoint')",
        "bare.pt": "unknown layout: expected nanoGPT's keys 'model_args' and 'model'",
        "list.pt": "expected a dict checkpoint",
        "missing.pt": "no such checkpoint file",
        "nothing": "folder holds neither ckpt.pt nor a Hugging Face GPT-2 model",
    }
    for name, expected in cases.items():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / name)
        assert expected in one_line_error(e), name
    # Other files that are not checkpoints say what they look like, never a bare number.
    (tmp_path / "notes.txt").write_text("101\nsome notes\n")
    (tmp_path / "config.pt").write_text('{"n_layer": 2}')
    (tmp_path / "noise.pt").write_bytes(bytes([6, 47, 41, 206, 108, 199, 89, 123]) * 8)
    for name, expected in {
        "notes.txt": "looks like text ('101'), not a zip or pickle checkpoint",
        "config.pt": "looks like JSON",
        "noise.pt": "starts with bytes 06 2f 29 ce",
    }.items():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / name)
        assert expected in one_line_error(e), (name, one_line_error(e))


def test_pretrained_names_resolve_through_the_index(tmp_path, monkeypatch, tokens):
    import ffinterp.pretrained as zoo

    model = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=T)).eval()
    save_checkpoint(tmp_path / "m.pt", model)
    index = {"models": [{"name": "m", "file": "m.pt", "sha256": zoo.sha256_of(tmp_path / "m.pt")}]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    monkeypatch.setattr(zoo, "INDEX_PATH", tmp_path / "index.json")
    with torch.no_grad():
        assert torch.equal(load_checkpoint("pretrained:m").model(tokens), model(tokens))
    with pytest.raises(FFInterpError) as e:
        load_checkpoint("pretrained:nope")
    assert "unknown pretrained model 'nope'" in one_line_error(e)
