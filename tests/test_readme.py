"""The README's Python examples run as written (with a smaller budget), so they cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    """The Python code blocks under the README's ``## section`` heading, in order."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end >= 0 else None], re.S)


LIBRARY, STRATEGY = "Ten lines of library", "Adding a glitch-search strategy"


def test_readme_has_the_library_example_and_the_strategy_example() -> None:
    library, strategy = python_blocks(LIBRARY), python_blocks(STRATEGY)
    assert len(library) == 1 and len(strategy) == 1
    assert len([line for line in library[0].splitlines() if line.strip()]) <= 10  # "ten lines"


@pytest.mark.slow
def test_library_example_runs_after_the_main_command(tmp_path, monkeypatch, capsys) -> None:
    """As a reader meets it: the main command has filled glitches/ already."""
    import ffinterp
    from ffinterp.models.constructed import circuit_model

    monkeypatch.chdir(tmp_path)
    main = ffinterp.find_glitches(
        circuit_model(2.0, block_size=32, device="cpu"), "random", 64, out="glitches"
    )
    assert len(main) and (tmp_path / "glitches" / "state.json").exists()
    code = python_blocks(LIBRARY)[0].replace("budget=5000", "budget=1000").replace("n=32)", "n=8)")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    report = scope["report"]
    assert len(report) > 0  # the shipped glitchy model errs on dense reads
    assert "<table" in report._repr_html_()
    assert scope["heads"].heads  # at least one read head named
    printed = capsys.readouterr().out
    assert repr(report) in printed and "strategy" in printed  # print(report) shows the table
    # Run again, it refuses in one line that names the Python arguments, as the README says.
    said = re.search(r"stops with one line, `(.*?)`: library", " ".join(README.read_text().split())).group(1)
    again = "\n".join(line for line in code.splitlines() if line.startswith("report = "))
    with pytest.raises(ffinterp.FFInterpError) as e:
        exec(compile(again, "README.md", "exec"), scope)  # the same model, loaded once
    assert str(e.value) == said


def test_strategy_example_registers_and_searches() -> None:
    from ffinterp.analysis.search import STRATEGIES
    from ffinterp.language import I, W, reads
    from ffinterp.models.constructed import circuit_model

    exec(compile(python_blocks(STRATEGY)[0], "README.md", "exec"), {})
    try:
        assert "all-ignores" in STRATEGIES
        import ffinterp

        report = ffinterp.find_glitches(
            circuit_model(40.0, block_size=32, device="cpu"), "all-ignores", budget=64, diagnose=False
        )
        assert report.summary["scored"] == 64
        for g in report:  # whatever it finds has the strategy's shape: one write, then ignores
            tokens = ffinterp.from_text(g["text"])[0]
            instr = tokens[0::2]
            assert int((instr == W).sum()) == 1 and int(((instr == I) | (instr == W)).sum()) == len(instr) - 1
            assert len(reads(tokens[None])) == 1
    finally:
        STRATEGIES.pop("all-ignores", None)  # leave the registry ("all") as the other tests expect
