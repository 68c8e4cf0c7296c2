"""The extrapolation report reads as a page in a browser: emphasis, code, lists, tables and
figures are rendered, and no Markdown syntax is left in the HTML."""

import html as html_lib
import re
import shutil
import subprocess

import pytest

from ditkit import spec as S
from ditkit.evaluate.report import _html, run
from tests.conftest import ROOT

TINY = ROOT / "examples/tiny/tiny-hdit-neighborhood.yaml"


def _visible_text(page: str) -> str:
    """The text a reader sees: tags and code spans removed, entities decoded."""
    page = re.sub(r"<code>.*?</code>", "", page, flags=re.S)
    page = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    return html_lib.unescape(re.sub(r"<[^>]+>", " ", page))


def _markdown_left(page: str) -> list[str]:
    text = _visible_text(page)
    found = re.findall(r"\*\*[^*]+\*\*|(?<![\w*])\*[^\s*][^*]*\*(?![\w*])|`[^`]+`|!\[|\]\(", text)
    return found


def test_markdown_constructs_become_html():
    md = "\n".join(
        [
            "# Title with `code`",
            "*Intro in emphasis* and a **strong claim** about `as_is` (2*3 = 6, x * y).",
            "- **32x32, accuracy:** best `core_patch` (*p* = 0.01)",
            "- second item",
            "",
            "| policy | status |",
            "| --- | --- |",
            "| `core_patch:factor=4` | **NOT a no-op: changes the model** |",
            "![cost](cost.png)",
        ]
    )
    page = _html(md)
    assert "<strong>strong claim</strong>" in page
    assert "<em>Intro in emphasis</em>" in page and "<em>p</em>" in page
    assert "<code>as_is</code>" in page and "<code>core_patch:factor=4</code>" in page
    assert page.count("<ul>") == 1 and page.count("</ul>") == 1 and page.count("<li>") == 2
    assert "<th>policy</th>" in page and "<strong>NOT a no-op: changes the model</strong>" in page
    assert "2*3 = 6, x * y" in page  # arithmetic is not emphasis
    img = re.search(r"<img [^>]*>", page).group(0)
    assert 'src="cost.png"' in img and "max-width:100%" in img and "320px" not in img
    assert _markdown_left(page) == []


def check_report_html(folder) -> None:
    """The runner's ``report.html`` beside its ``report.md``: no Markdown syntax is left, and
    every strong phrase of the Markdown is rendered strong (used by the runner's own tests)."""
    md = (folder / "report.md").read_text()
    page = (folder / "report.html").read_text()
    assert _markdown_left(page) == [], _markdown_left(page)
    for strong in re.findall(r"\*\*(.+?)\*\*", md):
        if "`" not in strong:
            assert f"<strong>{html_lib.escape(strong, quote=False)}</strong>" in page, strong


@pytest.mark.skipif(
    not (shutil.which("chromium") or shutil.which("chromium-browser")),
    reason="no headless Chromium here (apt-get install chromium); the HTML "
    "check above runs everywhere",
)
def test_the_report_renders_in_headless_chromium(tmp_path):
    run(S.load(TINY), None, None, [S.AsIs()], [(16, 16), (32, 32)], tmp_path, measure=False)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
            (tmp_path / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "<table>" in dom and _markdown_left(dom) == []
