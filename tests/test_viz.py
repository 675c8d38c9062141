"""Figures and their export: real PNG/SVG through kaleido, HTML that renders offline."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET

import plotly.graph_objects as go
import pytest
import torch

from ffinterp.errors import FFInterpError
from ffinterp.language import from_text
from ffinterp.viz import (
    HIGHLIGHT,
    figures_html,
    head_bars,
    heatmap,
    image_server,
    pattern_figure,
    pattern_grid,
    read_bars,
    save_figure,
    token_labels,
)

SEQ = "w1i0w0i1r0i1w1r1"
TOKENS = from_text(SEQ)
T = len(SEQ)


def causal(n_layer: int = 2, n_head: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_layer, n_head, T, T, generator=g)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("FFINTERP_NO_CHROMIUM"):
        pytest.skip("FFINTERP_NO_CHROMIUM is set")
    pytest.fail("chromium not found: scripts/setup.sh installs Debian's chromium (needed by kaleido)")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_pattern_figure_labels_tokens_and_circles_last_writes():
    fig = pattern_figure(causal()[0, 0], TOKENS, layer=0, head=0, reads=[(8, 4)])
    hm = fig.data[0]
    assert list(hm.x) == token_labels(TOKENS) == [f"{k} {c}" for k, c in enumerate(SEQ)]
    assert hm.z[0][1] is None or hm.z[0][1] != hm.z[0][1]  # above the diagonal: blank (NaN)
    assert hm.z[3][0] == pytest.approx(float(causal()[0, 0, 3, 0]), abs=1e-4)
    marks = fig.data[1]
    assert list(marks.x) == ["4 w", "5 0"] and list(marks.y) == ["8 r", "8 r"]
    assert "L0H0" in fig.layout.title.text


def test_grid_has_every_head_and_stars_read_heads():
    fig = pattern_grid(causal(), TOKENS, read_heads=[(1, 2)])
    assert sum(isinstance(t, go.Heatmap) for t in fig.data) == 6
    titles = [a.text for a in fig.layout.annotations]
    assert "L1H2 ★ read head" in titles and "L0H0" in titles


def test_read_bars_highlight_the_last_write():
    mass = torch.tensor([[0.1, 0.9, 0.2], [0.3, 0.4, 0.5]])
    row = causal()[1, 1, 14]
    fig = read_bars(mass, row, TOKENS, read_pos=14, write_pos=12, head=(0, 1), read_heads=[(0, 1)])
    heads, keys = fig.data
    assert list(heads.x) == ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2"]
    assert heads.marker.color[1] == HIGHLIGHT and heads.marker.color[0] != HIGHLIGHT
    assert len(keys.x) == 15
    red = [k for k, c in enumerate(keys.marker.color) if c == HIGHLIGHT]
    assert red == [12, 13]
    assert "0.900" in fig.layout.title.text
    assert isinstance(head_bars(mass, read_heads=[(1, 2)]), go.Figure)


def test_heatmap_is_generic():
    fig = heatmap(torch.arange(6.0).reshape(2, 3), ["a", "b", "c"], ["x", "y"], text_fmt=".1f", title="t")
    assert list(fig.data[0].x) == ["a", "b", "c"] and fig.data[0].text[1][2] == "5.0"
    assert fig.layout.yaxis.autorange == "reversed"


def test_html_is_self_contained(tmp_path):
    path = save_figure(pattern_figure(causal()[0, 1], TOKENS), tmp_path / "p.html")
    text = path.read_text()
    assert "<script src=" not in text.replace('<script src="data:', "")  # no CDN
    assert "Plotly.newPlot" in text and len(text) > 1_000_000  # plotly.js is inline
    assert [p.name for p in tmp_path.iterdir()] == ["p.html"]  # no temp file left
    page = figures_html([heatmap(torch.eye(2)), "<p>note</p>", heatmap(torch.eye(3))], title="two")
    assert page.count("Plotly.newPlot") == 2 and "<p>note</p>" in page


def test_unknown_suffix_is_one_clear_error(tmp_path):
    with pytest.raises(FFInterpError, match=r"unknown figure format '\.gif'"):
        save_figure(heatmap(torch.eye(2)), tmp_path / "x.gif")
    assert not list(tmp_path.iterdir())


def test_png_and_svg_are_real_images(tmp_path):
    chromium()
    grid = pattern_grid(causal(), TOKENS)
    with image_server():
        png = save_figure(grid, tmp_path / "grid.png", width=500, height=400, scale=2)
        svg = save_figure(read_bars(torch.rand(2, 3), causal()[0, 0, 10], TOKENS, 10, 6), tmp_path / "b.svg")
    assert png_size(png.read_bytes()) == (1000, 800)
    assert png.stat().st_size > 5_000
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg") and "main-svg" in root.get("class", "")
    assert len(list(root.iter())) > 50  # bars, axes, text: not an empty canvas


def test_exported_html_renders_offline_in_headless_chromium(tmp_path):
    exe = chromium()
    path = save_figure(pattern_grid(causal(), TOKENS, read_heads=[(0, 0)]), tmp_path / "grid.html")
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        # Every host resolves to nothing and any proxy is a dead port: no network at all.
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=http://127.0.0.1:9",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        path.as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert '<svg class="main-svg"' in dom, dom[:500]
    assert "L0H0 ★ read head" in dom


def test_export_retries_only_kaleidos_start_up_race(monkeypatch):
    """Under load chromium can run the render before kaleido's page has loaded its scripts;
    that one error is retried, any other is reported at once."""
    import kaleido

    from ffinterp.viz import ExportError, to_image_bytes

    calls = []

    def racy(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("ReferenceError: kaleido_scopes is not defined")
        return b"\x89PNG"

    monkeypatch.setattr(kaleido, "calc_fig_sync", racy)
    assert to_image_bytes(go.Figure(), "png") == b"\x89PNG" and len(calls) == 2

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("chromium not found")

    calls.clear()
    monkeypatch.setattr(kaleido, "calc_fig_sync", broken)
    with pytest.raises(ExportError, match="chromium not found"):
        to_image_bytes(go.Figure(), "png")
    assert len(calls) == 1
