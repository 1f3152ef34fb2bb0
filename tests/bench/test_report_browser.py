"""The HTML report opened in headless Chromium: tables and figures render, nothing fails to load,
input-derived strings stay text."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from bench.cli import main
from tests.bench.records import record, write_run

pytestmark = pytest.mark.browser

EVIL_MODEL = "<script>alert(1)</script>"
EVIL_VARIANT = '<img src=x onerror="document.title=1">'
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.environ.get("INFERMATRIX_REQUIRE_BROWSER"):
        pytest.fail("INFERMATRIX_REQUIRE_BROWSER is set but Debian's chromium is not installed")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; make test does it when it can "
                "run apt-get)")


def _browse(tmp_path, page, *args: str) -> str:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"  # a fresh user-data-dir each time
    out = subprocess.run([_chromium(), *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args,
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    sweep = {"name": "decode", "prompt_tokens": 64, "new_tokens": 16}
    run = write_run(tmp / "run", [
        record("fp32", model=EVIL_MODEL, decode=100, kld=0.0, steps=0),
        record("int8", model=EVIL_MODEL, decode=170, noise=0.15, kld=0.003),
        record(EVIL_VARIANT, model=EVIL_MODEL, decode=140, kld=0.02),
        record("broken", model=EVIL_MODEL, status="failed", error="RuntimeError: <b>kaput</b>"),
        record("cuda-only", model=EVIL_MODEL, status="skipped", error="needs CUDA"),
        *[record(v, decode=d * b, scenario={**sweep, "batch_size": b}, steps=0 if v == "fp32" else 1)
          for b in (1, 4, 16) for v, d in (("fp32", 90), ("int8", 120))],
    ])
    assert main(["report", str(run), "--format", "html", "--out", str(tmp / "report.html")]) == 0
    return tmp, tmp / "report.html"


def test_report_renders_tables_and_figures_with_nothing_failing(report):
    tmp, page = report
    dom = _browse(tmp, page, "--dump-dom")
    root = re.search(r"<html[^>]*>", dom).group(0)
    assert 'data-ready="yes"' in root, "the page's script did not run to the load event"
    assert 'data-load-errors="0"' in root, root
    figures = int(re.search(r'data-figures="(\d+)"', root).group(1))
    assert figures == 4 * 4 + 1  # four per scenario group, plus the batch-size sweep
    assert dom.count('<table class="sortable">') == 4
    assert re.search(r'<tr class="chosen"><td[^>]*>int8</td>', dom)
    assert dom.count("<figcaption>") == figures
    assert "Throughput against batch size" in dom and "TTFT against prompt length" not in dom  # only batch swept


def test_input_strings_are_text_not_markup(report):
    tmp, page = report
    dom = _browse(tmp, page, "--dump-dom")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "<script>alert(1)</script>" not in dom
    assert "<b>kaput</b>" not in dom and "&lt;b&gt;kaput&lt;/b&gt;" in dom
    assert "<title>infermatrix: handmade</title>" in dom  # the variant's onerror never ran
    assert not re.search(r"<img[^>]*onerror", dom)


def test_screenshot_is_taken(report):
    tmp, page = report
    shot = tmp / "report.png"
    _browse(tmp, page, f"--screenshot={shot}", "--window-size=1400,2400")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a rendered page, not a blank one
