"""Bad-input generators and the clean-refusal check, shared by ``tests/test_fuzz.py`` (few,
derandomized examples) and ``benchmarks/fuzz.py`` (many): one definition of "bad input is
refused cleanly" for every command and reader.

A *case* is a CLI argv plus what the answer must be. :func:`run_cli` calls ``ffinterp.cli.main``
in-process (an exception escaping it is what would print a traceback at process level) and
:func:`problem` says what is wrong with the outcome, or ``None``.
"""

from __future__ import annotations

import io
import json
import os
import struct
import traceback
import zipfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

T = 32  # sequence length of every generated model and file: tiny, so a run that is accepted stays cheap


# ---------------------------------------------------------------- running and judging


@dataclass
class Outcome:
    """What one in-process CLI call did."""

    code: int | None
    out: str
    err: str
    crash: str | None = None  # the traceback, when an exception escaped main()


@dataclass
class Case:
    """One generated input: the argv, whether it must be refused, and words the refusal must hold."""

    kind: str
    argv: list[str]
    must_refuse: bool = True
    needles: tuple[str, ...] = ()  # one of them must appear in the error line (the "where")
    out: Path | None = None  # an --out that must hold nothing half-written after a refusal
    cwd: Path | None = None


def fuzz_settings(examples: int) -> settings:
    """Reproducible runs of ``examples`` cases: fixed seed, no example database, no deadline
    (a case may start a model), no health checks (inputs are large by design)."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )


def run_cli(argv: list[str]) -> Outcome:
    """``ffinterp.cli.main(argv)`` in this process, stdout and stderr captured."""
    import warnings

    from ffinterp.cli import main

    out, err = io.StringIO(), io.StringIO()
    code, crash = None, None
    with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library's own warnings are not refusals
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001 - exactly what must never happen
            crash = traceback.format_exc()
    return Outcome(code, out.getvalue(), err.getvalue(), crash)


def half_written(out: Path | None, before: set[str]) -> list[str]:
    """Files under ``out`` (or ``out`` itself) that a refused run left behind: temp files, or new files."""
    if out is None:
        return []
    root = out if out.is_dir() else out.parent
    if not root.exists():
        return []
    left = []
    for p in root.rglob("*"):
        rel = str(p.relative_to(root))
        if ".tmp" in p.name:
            left.append(rel)
        elif p.is_file() and rel not in before and p.stat().st_size > 0 and p.name != ".lock":
            left.append(rel)
    return left


def snapshot(out: Path | None) -> set[str]:
    if out is None:
        return set()
    root = out if out.is_dir() else out.parent
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def problem(case: Case, outcome: Outcome, before: set[str] = frozenset()) -> str | None:
    """Why ``outcome`` breaks the contract for ``case``; None when it keeps it."""
    if outcome.crash is not None:
        return f"traceback:\n{outcome.crash}"
    if "Traceback" in outcome.err or "Traceback" in outcome.out:
        return f"'Traceback' printed: {outcome.err[-2000:]}"
    if outcome.code == 0:
        return "accepted, but it must be refused" if case.must_refuse else None
    if outcome.code != 2:
        return f"exit status {outcome.code}, expected 2 (stderr {outcome.err[-500:]!r})"
    lines = [ln for ln in outcome.err.splitlines() if ln.strip()]
    if len(lines) != 1:
        return f"{len(lines)} lines on stderr, expected 1: {outcome.err[-1000:]!r}"
    if not lines[0].startswith("ffinterp"):
        return f"stderr line does not start with 'ffinterp': {lines[0]!r}"
    if case.needles and not any(n in lines[0] for n in case.needles):
        return f"error line names none of {case.needles}: {lines[0]!r}"
    left = half_written(case.out, before)
    if left:
        return f"refused, but left {left} in {case.out}"
    return None


def check(case: Case) -> tuple[Outcome, str | None]:
    """Run a case and judge it."""
    before = snapshot(case.out)
    cwd = os.getcwd()
    if case.cwd is not None:  # a relative or empty path lands here, not in the repository
        os.chdir(case.cwd)
    try:
        outcome = run_cli(case.argv)
    finally:
        os.chdir(cwd)
    return outcome, problem(case, outcome, before)


# ---------------------------------------------------------------- base artifacts


def tiny_gpt(seed: int = 0, n_layer: int = 2):
    from ffinterp.models.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=16, block_size=T)).eval()


def build_artifacts(root: Path) -> dict[str, Path]:
    """A valid checkpoint of every kind the loader reads, under ``root``: the inputs mutated below."""
    from ffinterp.checkpoints import HF_CONV1D, save_checkpoint
    from ffinterp.models.lstm import LSTM, LSTMConfig

    root.mkdir(parents=True, exist_ok=True)
    gpt = tiny_gpt()
    paths = {"ffinterp": root / "ffinterp" / "ckpt.pt"}
    save_checkpoint(paths["ffinterp"], gpt)
    nano = {
        "model_args": gpt.cfg.model_args(),
        "model": {f"_orig_mod.{k}": v for k, v in gpt.state_dict().items()},
        "iter_num": 3,
    }
    paths["nanogpt"] = root / "nanogpt" / "ckpt.pt"
    paths["nanogpt"].parent.mkdir(parents=True, exist_ok=True)
    torch.save(nano, paths["nanogpt"])
    torch.manual_seed(1)
    paths["lstm"] = root / "lstm" / "ckpt.pt"
    save_checkpoint(paths["lstm"], LSTM(LSTMConfig(hidden=16)))
    hf_state = {}
    for k, v in gpt.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied to wte, as save_pretrained leaves it
        hf_state[k] = (v.t() if k.endswith(HF_CONV1D) else v).contiguous().clone()
    config = {
        "model_type": "gpt2",
        "vocab_size": 5,
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 16,
        "n_positions": T,
        "activation_function": "gelu_new",
    }
    from safetensors.torch import save_file

    for fmt in ("safetensors", "bin"):
        folder = root / f"hf-{fmt}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config))
        if fmt == "safetensors":
            save_file(hf_state, folder / "model.safetensors")
        else:
            torch.save(hf_state, folder / "pytorch_model.bin")
        paths[f"hf-{fmt}"] = folder
    return paths


# ---------------------------------------------------------------- sequence files

BAD_CHARS = list("xX2W R.,;[{}]-+") + ["\x00", "\t", " ", "é", "€", "😀", "\u200b", "\ufeff", "\x7f"]


def valid_texts(n: int, seq_len: int, seed: int) -> list[str]:
    from ffinterp.language import sample, to_text

    texts = to_text(sample(n, seq_len, 0.5, seed=seed))
    return [texts] if isinstance(texts, str) else texts


@st.composite
def sequence_files(draw) -> tuple[str, bytes, str, bool, bool]:
    """(kind, file bytes, suffix, must_refuse labelled, must_refuse unlabelled)."""
    seq_len = draw(st.sampled_from([4, 8, 16, T]))
    n = draw(st.integers(1, 4))
    texts = valid_texts(n, seq_len, draw(st.integers(0, 10_000)))
    kind = draw(
        st.sampled_from(
            [
                "bad_char", "odd_length", "contradict", "blank_lines", "bom", "crlf", "huge_line",
                "huge_garbage", "mixed_lengths", "not_utf8", "empty", "whitespace_only", "jsonl_torn",
                "jsonl_no_text", "jsonl_text_type", "jsonl_deep", "binary", "parquet_torn",
                "parquet_no_text", "parquet_nulls", "parquet_ints", "parquet_fake", "starts_with_read",
                "ends_with_write", "bit_as_instruction",
            ]
        )
    )  # fmt: skip
    jsonl = draw(st.booleans())
    refuse = unl = True
    suffix = ".jsonl" if jsonl else ".txt"

    def lines(ts: list[str], nl: str = "\n") -> bytes:
        rows = [json.dumps({"text": t}) if jsonl else t for t in ts]
        return (nl.join(rows) + nl).encode("utf-8")

    if kind == "bad_char":
        k = draw(st.integers(0, n - 1))
        p = draw(st.integers(1, len(texts[k]) - 1))  # inside the line: not stripped away
        texts[k] = texts[k][:p] + draw(st.sampled_from(BAD_CHARS)) + texts[k][p:]
        data = lines(texts)
    elif kind == "odd_length":
        texts = [t[:-1] for t in texts]
        data = lines(texts)
    elif kind == "contradict":
        k = draw(st.integers(0, n - 1))
        reads = [p for p in range(0, len(texts[k]), 2) if texts[k][p] == "r"]
        p = draw(st.sampled_from(reads)) + 1
        texts[k] = texts[k][:p] + ("1" if texts[k][p] == "0" else "0") + texts[k][p + 1 :]
        data, unl = lines(texts), False
    elif kind == "blank_lines":
        rows = []
        for t in texts:
            rows += [draw(st.sampled_from(["", " ", "\t", "  \t "]))] * draw(st.integers(0, 2))
            rows.append(json.dumps({"text": t}) if jsonl else t)
        data, refuse, unl = ("\n".join(rows) + "\n").encode(), False, False
    elif kind == "bom":
        data, refuse, unl = b"\xef\xbb\xbf" + lines(texts), False, False
    elif kind == "crlf":
        data, refuse, unl = lines(texts, "\r\n"), False, False
    elif kind == "huge_line":
        big = valid_texts(1, 100_000, 7)[0]
        data = lines([big] + (texts if draw(st.booleans()) else []))
        refuse = unl = b"\n" in data.rstrip(b"\n")  # one huge valid line is fine; mixed lengths are not
    elif kind == "huge_garbage":
        data = lines([draw(st.sampled_from(["w0", "r1", "wx", "ii"])) * 60_000 + "q"])
    elif kind == "mixed_lengths":
        data = lines(texts + valid_texts(1, seq_len + 2, 1))
    elif kind == "not_utf8":
        k = draw(st.integers(0, n - 1))
        raw = lines(texts)
        cut = draw(st.integers(0, len(raw)))
        data = raw[:cut] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\x80\x80"])) + raw[cut:]
    elif kind == "empty":
        data = b""
    elif kind == "whitespace_only":
        data = draw(st.sampled_from([b"\n", b"\n\n  \n", b"\r\n\t\r\n", b"  "]))
    elif kind == "jsonl_torn":
        raw = json.dumps({"text": texts[0]})
        data, suffix = (raw[: draw(st.integers(1, len(raw) - 1))] + "\n").encode(), ".jsonl"
    elif kind == "jsonl_no_text":
        data, suffix = (json.dumps({"txt": texts[0]}) + "\n").encode(), ".jsonl"
    elif kind == "jsonl_text_type":
        value = draw(st.sampled_from([5, None, [texts[0]], {"t": 1}, True, 1.5]))
        data, suffix = (json.dumps({"text": value}) + "\n").encode(), ".jsonl"
    elif kind == "jsonl_deep":
        depth = draw(st.sampled_from([2_000, 50_000, 200_000]))
        data, suffix = ('{"text": ' + "[" * depth + "]" * depth + "}\n").encode(), ".jsonl"
    elif kind == "binary":
        data = draw(st.binary(min_size=1, max_size=300))
        refuse = unl = None  # random bytes may by chance be a valid file
    elif kind == "starts_with_read":
        data = lines(["r0" + t[2:] for t in texts])
    elif kind == "ends_with_write":
        data = lines([t[:-2] + "w0" for t in texts])
    elif kind == "bit_as_instruction":
        k = draw(st.integers(0, n - 1))
        texts[k] = texts[k][:2] + "00" + texts[k][4:] if len(texts[k]) > 4 else "0" + texts[k][1:]
        data = lines(texts)
    else:  # parquet
        suffix = ".parquet"
        data = _parquet(kind, texts, draw)
        refuse = unl = True
    return kind, data, suffix, refuse, unl


def _parquet(kind: str, texts: list[str], draw) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "parquet_fake":
        return "\n".join(texts).encode()
    if kind == "parquet_no_text":
        table = pa.table({"sequence": texts})
    elif kind == "parquet_nulls":
        table = pa.table({"text": texts + [None]})
    elif kind == "parquet_ints":
        table = pa.table({"text": list(range(len(texts)))})
    else:
        table = pa.table({"text": texts})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    raw = buf.getvalue()
    if kind == "parquet_torn":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    return raw


# ---------------------------------------------------------------- checkpoints

BAD_VALUES = [0, -1, 10**12, 10**40, "x", "", None, 1.5, [], {}, True, float("nan"), float("inf")]
ARG_KEYS = ["n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "dropout"]


def zip_boundaries(data: bytes) -> list[int]:
    """Offsets where a torch zip checkpoint changes structure: member headers, data and the directory."""
    cuts = {0, len(data) - 1, len(data) // 2}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for info in z.infolist():
                cuts.update({info.header_offset, info.header_offset + 30, info.header_offset + 1})
            end = data.rfind(b"PK\x05\x06")
            cd = data.find(b"PK\x01\x02")
            cuts.update(x for x in (end, end + 1, cd, cd + 4) if x >= 0)
    except zipfile.BadZipFile:
        pass
    return sorted(c for c in cuts if 0 <= c < len(data))


def _drop_member(data: bytes, k: int) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    infos = src.infolist()
    drop = infos[k % len(infos)].filename
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in infos:
            if info.filename != drop:
                dst.writestr(info, src.read(info.filename))
    return buf.getvalue()


@st.composite
def checkpoint_files(draw, base: dict[str, Path]) -> tuple[str, bytes, bool]:
    """(kind, ckpt.pt bytes, must_refuse) mutated from the ffinterp, nanoGPT or LSTM checkpoint."""
    src = draw(st.sampled_from(["ffinterp", "nanogpt", "lstm"]))
    data = base[src].read_bytes()
    kind = draw(
        st.sampled_from(
            [
                "truncate", "truncate_boundary", "drop_member", "garbage_bytes", "model_args",
                "drop_arg", "ffl", "state_shape", "state_nan", "state_drop", "state_extra",
                "state_value", "state_key", "vocab", "top_level", "not_torch",
            ]
        )
    )  # fmt: skip
    if kind == "truncate":
        return kind, data[: draw(st.integers(0, len(data) - 1))], True
    if kind == "truncate_boundary":
        return kind, data[: draw(st.sampled_from(zip_boundaries(data)))], True
    if kind == "drop_member":
        k = draw(st.integers(0, 50))
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        optional = names[k % len(names)].rsplit("/", 1)[-1] in (
            "byteorder",
            "serialization_id",
            ".format_version",
            ".storage_alignment",
            "version",
        )
        return kind, _drop_member(data, k), None if optional else True
    if kind == "garbage_bytes":
        p = draw(st.integers(0, len(data) - 1))
        junk = draw(st.binary(min_size=1, max_size=64))
        return kind, data[:p] + junk + data[p + len(junk) :], None  # may land in tensor data: fine
    if kind == "not_torch":
        return kind, draw(st.sampled_from([b"hello", b"PK\x03\x04", b"\x80\x02}q\x00.", b"{}"])), True
    ckpt = torch.load(base[src], weights_only=True)
    refuse: bool | None = True
    state = ckpt["model"]
    name = draw(st.sampled_from(sorted(state)))
    if kind == "model_args":
        key = draw(st.sampled_from(ARG_KEYS))
        value = draw(st.sampled_from(BAD_VALUES))
        old = ckpt["model_args"].get(key)
        ckpt["model_args"][key] = value
        if "ffl" in ckpt and key in ckpt["ffl"].get("arch_config", {}):
            ckpt["ffl"]["arch_config"][key] = value
        # Dropout never changes the weights' shapes; n_head only when it still divides n_embd.
        same = type(value) is type(old) and value == old
        refuse = None if key in ("dropout", "n_head", "bias") or src == "lstm" or same else True
    elif kind == "drop_arg":
        key = draw(st.sampled_from(ARG_KEYS))
        ckpt["model_args"].pop(key, None)
        if "ffl" in ckpt:
            ckpt["ffl"].get("arch_config", {}).pop(key, None)
        refuse = None
    elif kind == "ffl":
        how = draw(st.sampled_from(["not_dict", "vocab", "arch", "arch_config", "format"]))
        if how == "not_dict":
            ckpt["ffl"] = draw(st.sampled_from(["x", [1], 3, ["w"]]))
        else:
            ffl = ckpt.setdefault("ffl", {})
            ffl[{"vocab": "vocab", "arch": "arch", "arch_config": "arch_config", "format": "format"}[how]] = {
                "vocab": draw(
                    st.sampled_from([["a", "b"], "wri01", 5, None, ["w", "r", "i", "0", "1", "2"]])
                ),
                "arch": draw(st.sampled_from(["rnn", 5, None, ""])),
                "arch_config": draw(st.sampled_from(["x", [1], 5, {"n_embd": 10**9}, {"n_layer": -1}])),
                "format": draw(st.sampled_from([99, "1", None, -1])),
            }[how]
        refuse = None
    elif kind == "state_shape":
        t = state[name]
        shape = list(t.shape) or [1]
        shape[draw(st.integers(0, len(shape) - 1))] += draw(st.sampled_from([1, -1, 7]))
        state[name] = torch.zeros([max(s, 0) for s in shape], dtype=t.dtype)
    elif kind == "state_nan":
        t = state[name].clone()
        if not t.is_floating_point() or t.numel() == 0:
            refuse = None
        else:
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(
                st.sampled_from([float("nan"), float("inf"), float("-inf")])
            )
        state[name] = t
    elif kind == "state_drop":
        del state[name]
    elif kind == "state_extra":
        state[draw(st.sampled_from(["transformer.h.9.mlp.c_fc.weight", "extra", "lstm.weight_hh_l5"]))] = (
            torch.zeros(3)
        )
    elif kind == "state_value":
        state[name] = draw(st.sampled_from(["x", 3, None, [1.0], {"a": torch.zeros(1)}]))
    elif kind == "state_key":
        state[draw(st.sampled_from([3, None, (1, 2), b"x"]))] = state.pop(name)
    elif kind == "vocab":
        value = draw(st.sampled_from([4, 6, 50257, "5", 0, None, -5]))
        ckpt["model_args"]["vocab_size"] = value
    elif kind == "top_level":
        ckpt = draw(
            st.sampled_from(
                [
                    [1],
                    "x",
                    {"model": state},
                    {"model_args": ckpt["model_args"]},
                    {"model_args": [], "model": state},
                ]
            )
        )
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return kind, buf.getvalue(), refuse


def safetensors_header(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def safetensors_bytes(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@st.composite
def hf_folders(draw, base: dict[str, Path]) -> tuple[str, dict[str, bytes | None], bool | None]:
    """(kind, {file name: bytes, or None for a directory}, must_refuse) mutated from the HF folders."""
    fmt = draw(st.sampled_from(["safetensors", "bin"]))
    folder = base[f"hf-{fmt}"]
    weights = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    files: dict[str, bytes | None] = {p.name: p.read_bytes() for p in folder.iterdir()}
    config = json.loads(files["config.json"])
    kind = draw(
        st.sampled_from(
            [
                "config_not_json", "config_not_object", "config_dir", "config_not_utf8", "config_field",
                "no_weights", "weights_dir", "weights_truncated", "header_length", "header_offsets",
                "header_dtype", "header_shape", "header_not_json", "shard_index", "weights_nan", "vocab",
            ]
        )
    )  # fmt: skip
    refuse: bool | None = True
    if kind == "config_not_json":
        files["config.json"] = draw(st.sampled_from([b"{not json", b"", b"{'a': 1}", b"\x00\x01", b"[1,"]))
    elif kind == "config_not_object":
        files["config.json"] = draw(st.sampled_from([b"[]", b"5", b'"gpt2"', b"null"]))
    elif kind == "config_dir":
        files["config.json"] = None
    elif kind == "config_not_utf8":
        files["config.json"] = b'{"model_type": "\xff"}'
    elif kind == "config_field":
        key = draw(
            st.sampled_from(
                ["n_layer", "n_head", "n_embd", "n_positions", "layer_norm_epsilon", "vocab_size",
                 "model_type",
                 "activation_function", "n_inner", "tie_word_embeddings", "scale_attn_weights"]
            )
        )  # fmt: skip
        value = draw(st.sampled_from(BAD_VALUES + ["gpt2", "relu", 64]))
        same = type(value) is type(config.get(key)) and value == config.get(key)
        config[key] = value
        files["config.json"] = json.dumps(config).encode()
        refuse = (
            None
            if key in ("n_head", "layer_norm_epsilon", "tie_word_embeddings", "n_inner") or same
            else True
        )
        if key == "model_type" and value == "gpt2":
            refuse = None
    elif kind == "vocab":
        config["vocab_size"] = draw(st.sampled_from([4, 6, 50257, "5", 0]))
        files["config.json"] = json.dumps(config).encode()
    elif kind == "no_weights":
        del files[weights]
    elif kind == "weights_dir":
        files[weights] = None
    elif kind == "weights_truncated":
        data = files[weights]
        files[weights] = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "shard_index":
        del files[weights]
        files[f"{weights}.index.json"] = draw(
            st.sampled_from(
                [
                    b"{",
                    b"[]",
                    b'{"weight_map": []}',
                    b'{"weight_map": 5}',
                    b'{"weight_map": {"a": "missing.safetensors"}}',
                    b'{"weight_map": {"a": "../config.json"}}',
                    b'{"weight_map": {"a": 5}}',
                    b'{"weight_map": {}}',
                ]
            )
        )
    elif kind == "weights_nan" or fmt == "bin":
        state = torch.load(folder / weights, weights_only=True) if fmt == "bin" else None
        if state is None:
            from safetensors.torch import load_file

            state = load_file(folder / weights)
        name = draw(st.sampled_from(sorted(state)))
        t = state[name].clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf")]))
        state[name] = t
        buf = io.BytesIO()
        if fmt == "bin":
            torch.save(state, buf)
            files[weights] = buf.getvalue()
        else:
            from safetensors.torch import save

            files[weights] = save(state)
    else:  # safetensors header lies
        header, body = safetensors_header(files[weights])
        names = sorted(k for k in header if k != "__metadata__")
        name = draw(st.sampled_from(names))
        if kind == "header_length":
            raw = files[weights]
            (n,) = struct.unpack("<Q", raw[:8])
            lie = draw(st.sampled_from([n + 1, n - 1, n * 2, 0, 2**63, len(raw), len(raw) + 100, 7]))
            files[weights] = struct.pack("<Q", lie % 2**64) + raw[8:]
        elif kind == "header_offsets":
            a, b = header[name]["data_offsets"]
            how = draw(st.sampled_from(["past_end", "reversed", "overlap", "huge", "negative", "short"]))
            header[name]["data_offsets"] = {
                "past_end": [a, len(body) + 4096],
                "reversed": [b, a],
                "overlap": [0, b - a],
                "huge": [a, 2**62],
                "negative": [-4, b],
                "short": [a, b - 4],
            }[how]
            files[weights] = safetensors_bytes(header, body)
            refuse = None if how == "overlap" else True  # aliasing offsets of the right size read "fine"
        elif kind == "header_dtype":
            header[name]["dtype"] = draw(st.sampled_from(["F99", "", "I8", "BOOL", 5]))
            files[weights] = safetensors_bytes(header, body)
        elif kind == "header_shape":
            header[name]["shape"] = draw(
                st.sampled_from([[10**12, 10**12], [-1], ["x"], [1, 2, 3, 4, 5], []])
            )
            files[weights] = safetensors_bytes(header, body)
        else:
            raw = json.dumps(header).encode()
            cut = draw(st.integers(1, len(raw) - 1))
            files[weights] = struct.pack("<Q", len(raw)) + raw[:cut] + b" " * (len(raw) - cut) + body
    return kind, files, refuse


def write_folder(folder: Path, files: dict[str, bytes | None]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if data is None:
            (folder / name).mkdir()
        else:
            (folder / name).write_bytes(data)
    return folder


# ---------------------------------------------------------------- flags

INT_BAD = ["abc", "1.5", "", "1e3", "0x10", "-1", "0", "99999999999999999999999", "--", "nan"]
FLOAT_BAD = ["abc", "nan", "inf", "-inf", "1e309", "-0.5", "2", "", "1,5", "0x1p-2"]
STR_BAD = ["", "nope", "ALL", " ", "-", "\x00", "é", "a" * 300]


def path_bad(tmp: Path, what: str) -> str:
    """A path that is wrong for a file input or output: missing, a folder, below a file, empty."""
    (tmp / "a_file").write_text("x")
    (tmp / "a_dir").mkdir(exist_ok=True)
    return {
        "missing": str(tmp / "missing" / "f.txt"),
        "dir": str(tmp / "a_dir"),
        "under_file": str(tmp / "a_file" / "f.txt"),
        "empty": "",
    }[what]


# Flags of each command: flag -> kind of value. Commands run from a cheap baseline (see argv_for).
FLAGS: dict[str, dict[str, str]] = {
    "sample": {"--n": "int+", "--seq-len": "int+", "--p-i": "prob", "--seed": "int", "--format": "str",
               "--out": "out_file"},
    "validate": {"FILE": "in_file"},
    "eval": {"CKPT": "in_ckpt", "--sets": "str", "--n": "int+", "--seq-len": "int+", "--batch-size": "int+",
             "--device": "str", "--seq-file": "in_file"},
    "attention": {"CKPT": "in_ckpt", "--seq": "seq", "--seq-file": "in_file", "--row": "int",
                  "--layer": "int",
                  "--head": "int", "--read": "str", "--out": "out_fig", "--ref-n": "int+", "--device": "str"},
    "patch": {"CKPT": "in_ckpt", "--seq": "seq", "--corrupt": "str", "--what": "str", "--read": "int",
              "--metric": "str", "--top": "int+", "--out": "out_fig", "--seq-len": "int+", "--p-i": "prob",
              "--device": "str", "--receiver": "str", "--via": "str"},
    "find-glitches": {"CKPT": "in_ckpt", "--strategy": "str", "--budget": "int+", "--seed": "int",
                      "--device": "str", "--out": "out_dir", "--seq-len": "int+", "--max-glitches": "int+",
                      "--batch-size": "int+"},
    "estimate": {"CKPT": "in_ckpt", "--p-i": "prob", "--seq-len": "int+", "--budget": "int+", "--seed": "int",
                 "--method": "str", "--batch-size": "int+", "--device": "str"},
    "train": {"--out": "out_dir", "--preset": "str", "--steps": "int+", "--batch-size": "int+",
              "--seq-len": "int+", "--lr": "float+", "--loss": "str", "--p-i": "prob", "--mixture": "str",
              "--embd-dropout": "prob", "--pos-embedding": "str", "--sharpen-anneal": "str",
              "--eval-every": "int", "--ckpt-every": "int",
              "--device": "str", "--init-from": "in_ckpt"},
    "pretrained list": {"EXTRA": "str"},
}  # fmt: skip

# Values no baseline may run: they would be valid but cost minutes or gigabytes.
EXPENSIVE = {"--n", "--budget", "--steps", "--batch-size", "--ref-n", "--seq-len", "--max-glitches", "--top"}


def baseline(command: str, ckpt: str, tmp: Path, seq: str) -> dict[str, str | None]:
    """The cheap, valid arguments each command starts from; the fuzzer replaces one (or adds a flag)."""
    out_dir = str(tmp / "out")
    return {
        "sample": {"--n": "2", "--seq-len": "8", "--out": str(tmp / "s.txt")},
        "validate": {"FILE": str(tmp / "good.txt")},
        "eval": {"CKPT": ckpt, "--sets": "in", "--n": "2", "--seq-len": "8", "--batch-size": "2",
                 "--device": "cpu", "--no-progress": None},
        "attention": {"CKPT": ckpt, "--seq": seq, "--ref-n": "2", "--device": "cpu"},
        "patch": {"CKPT": ckpt, "--seq": seq, "--device": "cpu", "--top": "2"},
        "find-glitches": {"CKPT": ckpt, "--strategy": "random", "--budget": "16", "--batch-size": "16",
                          "--max-glitches": "1", "--seq-len": "8", "--no-minimize": None,
                          "--no-diagnose": None,
                          "--quiet": None, "--device": "cpu", "--out": out_dir},
        "estimate": {"CKPT": ckpt, "--budget": "16", "--batch-size": "16", "--seq-len": "8", "--method": "mc",
                     "--no-progress": None, "--device": "cpu"},
        "train": {"--out": out_dir, "--preset": "micro", "--steps": "1", "--batch-size": "2",
                  "--seq-len": "8",
                  "--eval-every": "0", "--eval-n": "1", "--ckpt-every": "0", "--device": "cpu"},
        "pretrained list": {},
    }[command]  # fmt: skip


def to_argv(command: str, args: dict[str, str | None]) -> list[str]:
    argv = command.split()
    for k, v in args.items():
        if k.isupper():  # positional
            argv.append(v)
        elif v is None:  # a bare switch
            argv.append(k)
        else:
            argv += [k, v]
    return argv


# Flags whose bad values still break the contract in code this suite does not own (reported,
# not fixed here): the tests skip them, benchmarks/fuzz.py --all still counts them.
KNOWN_OPEN: dict[str, set[str]] = {}


@st.composite
def flag_cases(draw, command: str, ckpt: str, tmp: Path, seq: str, skip_known: bool = True) -> Case:
    """One bad value for one flag of ``command``, the rest from its cheap baseline."""
    args = dict(baseline(command, ckpt, tmp, seq))
    flags = sorted(set(FLAGS[command]) - (KNOWN_OPEN.get(command, set()) if skip_known else set()))
    flag = draw(st.sampled_from(flags))
    kind = FLAGS[command][flag]
    must = False
    if kind in ("int+", "int"):
        value = draw(st.sampled_from(INT_BAD))
        must = value not in ("-1", "0", "99999999999999999999999") or kind == "int+"
        if value == "-1" and kind == "int":
            must = False
        if flag in EXPENSIVE and value == "99999999999999999999999":
            must = True  # such a run must be refused up front, not attempted
        if kind == "int" and flag in ("--row", "--layer", "--head", "--read"):
            must = value not in ("0", "-1")
        if flag == "--seed" and value in ("-1", "0", "99999999999999999999999"):
            must = None
    elif kind in ("prob", "float+"):
        value = draw(st.sampled_from(FLOAT_BAD))
        must = value not in ("2",) or kind == "prob"
        if kind == "float+" and value in ("inf",):
            must = None
    elif kind == "str":
        value = draw(st.sampled_from(STR_BAD))
        must = None  # some free-text flags accept anything
    elif kind == "seq":
        value = draw(st.sampled_from(["", "w", "w0r", "x0r0", "r0w0", "w0r1", "w0i", "w0" * 40 + "r0", "😀"]))
        must = True
    elif kind in ("in_file", "in_ckpt"):
        what = draw(st.sampled_from(["missing", "dir", "under_file", "empty"]))
        value = path_bad(tmp, what)
        must = not (flag == "--init-from" and what == "empty")  # '' is its default: start from scratch
    elif kind == "out_fig":
        what = draw(st.sampled_from(["missing", "dir", "under_file", "suffix"]))
        value = str(tmp / "fig.txt") if what == "suffix" else path_bad(tmp, what)
        if what in ("missing", "under_file"):
            value = str(Path(value).with_suffix(".html"))
        must = None if what == "missing" else True  # a missing folder is made
    else:  # out_file, out_dir
        what = draw(st.sampled_from(["missing", "dir", "under_file", "empty"]))
        value = path_bad(tmp, what)
        must = True if what in ("under_file", "empty") else None
        if kind == "out_file" and what == "dir":
            must = True
    if flag == "EXTRA":
        argv = to_argv(command, args) + [value or "x"]
        must = True
    else:
        args[flag] = value
        argv = to_argv(command, args)
    out = None
    if kind in ("out_file", "out_dir", "out_fig") and value:
        out = Path(value)
    escaped = value.encode("unicode_escape").decode()
    named = (
        (flag, flag.lstrip("-").replace("-", " "), flag.lstrip("-").replace("-", "_"))
        if flag[0] == "-"
        else ()
    )
    needles = tuple(x for x in (*named, value, escaped) if x)
    return Case(f"{command} {flag}={value[:20]!r}", argv, must, needles, out)


# ---------------------------------------------------------------- suites: one strategy of Case each

SUITES = ["sequence-file", "ckpt.pt", "hf-folder", *FLAGS]
_counter = iter(range(10**9))


@st.composite
def cases(draw, suite: str, base: dict[str, Path], tmp: Path, skip_known: bool = True) -> Case:
    """A Case of ``suite``: a sequence file for ``validate``, a checkpoint for ``eval``, or a bad flag."""
    here = tmp / f"ex{next(_counter)}"
    here.mkdir(parents=True)
    if suite == "sequence-file":
        kind, data, suffix, refuse, unl = draw(sequence_files())
        unlabelled = draw(st.booleans())
        path = here / f"seqs{suffix}"
        path.write_bytes(data)
        must = unl if unlabelled else refuse
        argv = ["validate", str(path)] + (["--unlabelled"] if unlabelled else [])
        return Case(f"validate {kind}", argv, must, (str(path),), cwd=here)
    if suite == "ckpt.pt":
        kind, data, refuse = draw(checkpoint_files(base))
        path = here / "ckpt.pt"
        path.write_bytes(data)
        return Case(f"ckpt.pt {kind}", eval_argv(str(path)), refuse, (str(path),), cwd=here)
    if suite == "hf-folder":
        kind, files, refuse = draw(hf_folders(base))
        folder = write_folder(here / "hf", files)
        return Case(f"hf-folder {kind}", eval_argv(str(folder)), refuse, (str(folder),), cwd=here)
    seq = valid_texts(1, 8, 0)[0]
    good = here / "good.txt"
    good.write_text("\n".join(valid_texts(2, 8, 1)) + "\n")
    case = draw(flag_cases(suite, str(base["ffinterp"]), here, seq, skip_known))
    case.cwd = here
    return case


def eval_argv(ckpt: str) -> list[str]:
    """The cheapest command that loads a checkpoint: eval on two short in-distribution sequences."""
    return ["eval", ckpt, "--sets", "in", "--n", "2", "--seq-len", "8", "--device", "cpu", "--no-progress"]
