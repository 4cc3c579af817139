"""report.md, the project's answer (issue 38, item 7): its shape, its figures, and its headline tables against the
committed comparison files. Reads files only (no model, no torch).

What the checks mean by:

- **main text**: every line of report.md before the first heading whose title starts with "Appendix" or "附录" (a
  line matching ``^#+ *(Appendix|附录)``, the same cut the project's before-stop check makes); without such a heading
  the whole file. At most 350 lines. Outside tables (``|`` rows), code fences and image lines, no main-text line is
  wider than 150 display columns (East Asian wide characters count 2), so that the line count means something.
- **first screen**: the sections ``## 摘要`` (Chinese) and ``## Summary`` (English), the report's first two
  second-level headings, in that order; each has at most 10 non-blank lines.
- **headline tables**: the tables right after a line ``<!-- headline: <path of a compare.md> -->``. Each row names
  its arm in backticks in the first column, and every other column's header is a column of that compare.md. A cell is
  checked against compare.md's cell for the same arm and column, taken from the first table in compare.md (in file
  order) whose first column is ``arm`` and which has both: the report's numbers must be, in order, a subsequence of
  compare.md's numbers, starting at the first, each equal to compare.md's or, where the report shows fewer decimals
  (at least one), equal to it rounded; a verdict word must be the same; a cell without numbers ("–", "(best fixed)")
  needs compare.md to have no such cell or one without numbers.
- **figures**: every ``![…](path)`` in report.md names an existing .png file (relative to the report); at least 6
  distinct ones.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "report.md"

MAIN_TEXT_MAX_LINES = 350
FIRST_SCREEN_MAX_LINES = 10
MAX_WIDTH = 150
MIN_FIGURES = 6

APPENDIX = re.compile(r"^#+ *(Appendix|附录)")
HEADLINE = re.compile(r"^<!--\s*headline:\s*(\S+)\s*-->\s*$")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")
VERDICTS = ("matches", "beats", "worse", "inconclusive", "undecided", "holds", "fails")


def report_lines() -> list[str]:
    return REPORT.read_text(encoding="utf-8").splitlines()


def main_text(lines: list[str]) -> list[str]:
    for i, line in enumerate(lines):
        if APPENDIX.match(line):
            return lines[:i]
    return lines


def width(line: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in line)


def norm(text: str) -> str:
    """Unicode minus → ASCII, markdown emphasis and backticks dropped, whitespace collapsed."""
    text = text.replace("\u2212", "-").replace("**", "").replace("`", "")
    return re.sub(r"\s+", " ", text).strip()


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def tables(lines: list[str]) -> list[tuple[int, list[str], list[list[str]]]]:
    """(line index of the header, header cells, body rows) of every markdown table."""
    out, i = [], 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip()):
            header, body, j = cells(lines[i]), [], i + 2
            while j < len(lines) and lines[j].startswith("|"):
                body.append(cells(lines[j]))
                j += 1
            out.append((i, header, body))
            i = j
        else:
            i += 1
    return out


def numbers(cell: str) -> list[str]:
    return NUMBER.findall(norm(cell))


def verdict(cell: str) -> str | None:
    words = re.findall(r"[a-z]+", norm(cell).lower())
    found = [w for w in words if w in VERDICTS]
    return found[-1] if found else None


def decimals(num: str) -> int:
    return len(num.split(".")[1]) if "." in num else 0


def same_number(shown: str, source: str) -> bool:
    r, c = Decimal(shown), Decimal(source)
    if decimals(shown) == decimals(source):
        return r == c
    if 1 <= decimals(shown) < decimals(source):
        return abs(c - r) <= Decimal(5) * Decimal(10) ** (-decimals(shown) - 1) + Decimal("1e-12")
    return False


def is_shown_in(shown: list[str], source: list[str]) -> bool:
    """shown is a subsequence of source, starting with source's first number."""
    if not shown:
        return True
    if not source or not same_number(shown[0], source[0]):
        return False
    k = 1
    for num in shown[1:]:
        while k < len(source) and not same_number(num, source[k]):
            k += 1
        if k == len(source):
            return False
        k += 1
    return True


def headline_tables(lines: list[str]) -> list[tuple[Path, list[str], list[list[str]]]]:
    found, by_start = [], {start: (header, body) for start, header, body in tables(lines)}
    for i, line in enumerate(lines):
        if m := HEADLINE.match(line.strip()):
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            assert j in by_start, f"report.md line {i + 1}: a headline marker not followed by a table"
            found.append((ROOT / m.group(1), *by_start[j]))
    return found


def compare_cell(compare_tables, arm: str, column: str) -> str | None:
    for _, header, body in compare_tables:
        head = [norm(h) for h in header]
        if head[0] != "arm" or column not in head:
            continue
        for row in body:
            if norm(row[0]) == arm:
                return row[head.index(column)]
    return None


# ------------------------------------------------------------------------------------------------------------ shape


def test_main_text_is_at_most_350_lines_and_has_an_appendix_cut():
    lines = report_lines()
    main = main_text(lines)
    assert len(main) < len(lines), "report.md has no '## Appendix' heading: the whole file counts as main text"
    assert len(main) <= MAIN_TEXT_MAX_LINES, f"report.md's main text has {len(main)} lines (at most {MAIN_TEXT_MAX_LINES})"


def test_main_text_lines_are_screen_lines():
    in_code, wide = False, []
    for n, line in enumerate(main_text(report_lines()), 1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code or line.startswith(("|", "<!--")) or IMAGE.fullmatch(line.strip()):
            continue
        if width(line) > MAX_WIDTH:
            wide.append(f"line {n}: {width(line)} columns")
    assert not wide, f"main-text lines wider than {MAX_WIDTH} columns: {'; '.join(wide)}"


def test_first_screen_is_chinese_then_english_at_most_10_lines_each():
    lines = report_lines()
    h2 = [i for i, line in enumerate(lines) if line.startswith("## ")]
    assert len(h2) >= 3
    assert lines[h2[0]].strip() == "## 摘要" and lines[h2[1]].strip() == "## Summary", (lines[h2[0]], lines[h2[1]])
    assert not any(line.strip() for line in lines[1:h2[0]]), "text between the title and ## 摘要"
    for start, end in ((h2[0], h2[1]), (h2[1], h2[2])):
        body = [line for line in lines[start + 1:end] if line.strip()]
        assert 1 <= len(body) <= FIRST_SCREEN_MAX_LINES, f"{lines[start]}: {len(body)} non-blank lines"
    chinese = "\n".join(lines[h2[0] + 1:h2[1]])
    assert sum(1 for ch in chinese if "\u4e00" <= ch <= "\u9fff") > 100, "## 摘要 is not in Chinese"


# ---------------------------------------------------------------------------------------------------------- figures


def test_every_embedded_image_exists_and_there_are_at_least_six():
    text = REPORT.read_text(encoding="utf-8")
    paths = IMAGE.findall(text)
    missing = [p for p in paths if not (REPORT.parent / p).is_file()]
    assert not missing, f"report.md embeds missing images: {missing}"
    assert all(p.endswith(".png") for p in paths), paths
    assert len(set(paths)) >= MIN_FIGURES, f"{len(set(paths))} distinct figures (at least {MIN_FIGURES})"


# ---------------------------------------------------------------------------------------------- headline vs compare


def test_headline_tables_equal_compare_md():
    found = headline_tables(report_lines())
    assert len(found) >= 2, "report.md needs a headline table per experiment (<!-- headline: … --> before each)"
    checked = 0
    for source, header, body in found:
        assert source.is_file(), f"headline source {source} does not exist"
        compare_tables = tables(source.read_text(encoding="utf-8").splitlines())
        head = [norm(h) for h in header]
        assert head[0] == "arm", header
        for row in body:
            assert len(row) == len(head), f"{source.name}: row {row[0]!r} has {len(row)} cells for {len(head)} columns"
            arms = re.findall(r"`([^`]+)`", row[0])
            assert len(arms) == 1, f"headline row {row[0]!r}: name its arm once, in backticks"
            arm = arms[0]
            assert compare_cell(compare_tables, arm, "seeds") is not None, f"{arm} is not an arm of {source}"
            for column, shown in zip(head[1:], row[1:]):
                source_cell = compare_cell(compare_tables, arm, column)
                where = f"{source.relative_to(ROOT)}: {arm} / {column}: report {shown!r}, compare.md {source_cell!r}"
                if not numbers(shown):
                    assert source_cell is None or not numbers(source_cell), where
                    continue
                assert source_cell is not None, where
                assert is_shown_in(numbers(shown), numbers(source_cell)), where
                if verdict(shown) is not None:
                    assert verdict(shown) == verdict(source_cell), where
                checked += 1
    assert checked >= 40, f"only {checked} headline cells checked"


# ------------------------------------------------------------------------------------------- the checks themselves


@pytest.mark.parametrize(
    ("shown", "source", "ok"),
    [
        (["+0.0046", "-0.0199", "+0.0291", "0.89"], ["+0.0046", "-0.0199", "+0.0291", "0.67", "0.89"], True),
        (["53.5", "11.6"], ["53.4706", "11.5888"], True),
        (["53.4", "11.6"], ["53.4706", "11.5888"], False),
        (["1"], ["0.87", "1"], False),  # "Holm 1" must not match a raw p of 0.87 ...
        (["0.5", "1"], ["0.5", "0.87", "1"], True),  # ... but finds the Holm p after it
        (["0.0291"], ["+0.0046", "+0.0291"], False),  # the estimate (first number) must be shown first
    ],
)
def test_is_shown_in(shown, source, ok):
    assert is_shown_in(shown, source) is ok


def test_main_text_cut_and_width():
    assert main_text(["a", "## Appendix: x", "b"]) == ["a"]
    assert main_text(["a", "# 附录", "b"]) == ["a"]
    assert main_text(["a", "## Appendixes", "b"]) == ["a"] and main_text(["a", "## Appendices", "b"]) == ["a", "## Appendices", "b"]
    assert width("摘要ab") == 6
