"""CJK text in figures (src/lbdpo/eval/plots.py, fix_fonts): drawn with an installed fallback font that has the glyphs,
else escaped, never as boxes (matplotlib's "Glyph … missing" warning); no global matplotlib setting changes."""

from __future__ import annotations

import warnings

import matplotlib
import pytest
from matplotlib import font_manager
from matplotlib.text import Text

from lbdpo.eval import plots
from lbdpo.eval.plots import _charmap, fallback_font, fix_fonts, plot_beta_hist_by_domain, subplots

DOMAINS = ["数据", "数据", "en", "en"]


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def save_without_missing_glyphs(fig, path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(path)
    missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert not missing, missing


def test_without_a_cjk_font_the_characters_are_escaped(tmp_path, monkeypatch):
    params = dict(matplotlib.rcParams)
    fig, ax = subplots()
    ax.plot([0, 1], [0, 1], label="数据 (n=2)")
    ax.set_title("β by domain: 偏好 and en")
    ax.legend()
    fix_fonts(fig, candidates=("No Such Font Family",))
    assert "\\u6570\\u636e (n=2)" in texts(fig)
    assert "β by domain: \\u504f\\u597d and en" in texts(fig)  # β is in DejaVu Sans: kept
    save_without_missing_glyphs(fig, tmp_path / "a.png")
    math = subplots()[0]
    math.suptitle(r"$\beta$ of 数据")
    fix_fonts(math, candidates=("No Such Font Family",))
    assert r"$\beta$ of U+6570U+636E" in texts(math)  # no backslash escape inside mathtext
    save_without_missing_glyphs(math, tmp_path / "m.png")
    assert dict(matplotlib.rcParams) == params


def test_an_installed_fallback_font_is_used_per_text(tmp_path):
    """STIXGeneral (shipped with matplotlib) stands in for a CJK font: it has glyphs DejaVu Sans lacks."""
    default = _charmap(font_manager.findfont(font_manager.FontProperties()))
    stix = fallback_font(("STIXGeneral",))
    assert stix is not None
    char = next(chr(c) for c in sorted(_charmap(stix[1]) - default) if chr(c).isprintable())
    fig, ax = subplots()
    ax.set_title(f"domain {char}")
    ax.set_xlabel("plain")
    fix_fonts(fig, candidates=("STIXGeneral",))
    title = next(t for t in fig.findobj(Text) if t.get_text() == f"domain {char}")
    assert title.get_fontfamily()[-1] == "STIXGeneral"
    assert ax.xaxis.label.get_fontfamily() == list(matplotlib.rcParams["font.family"])  # untouched
    save_without_missing_glyphs(fig, tmp_path / "b.png")


@pytest.mark.skipif(fallback_font() is None, reason="no CJK font installed (the escaped form is tested above)")
def test_a_cjk_font_draws_domain_names(tmp_path):
    fig, ax = subplots()
    ax.plot([0, 1], [0, 1], label="数据")
    ax.legend()
    fix_fonts(fig)
    assert "数据" in texts(fig)
    save_without_missing_glyphs(fig, tmp_path / "c.png")


def test_figures_written_by_plots_have_no_boxes(tmp_path, monkeypatch):
    saved = []
    real = plots.Figure.savefig

    def spy(fig, path, **kwargs):
        saved.append(texts(fig))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            real(fig, path, **kwargs)
        assert not [w for w in caught if "missing from font" in str(w.message)]

    monkeypatch.setattr(plots.Figure, "savefig", spy)
    assert plot_beta_hist_by_domain([0.1, 0.2, 0.3, 0.2], DOMAINS, tmp_path / "h.png").is_file()
    legend = [t for t in saved[0] if "(n=2" in t]
    cjk = fallback_font() is not None
    assert any(t.startswith("数据" if cjk else "\\u6570\\u636e") for t in legend), legend
