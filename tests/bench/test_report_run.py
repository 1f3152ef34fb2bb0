"""``infermatrix run`` writes its reports when it ends, and every metric a real run writes is catalogued."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.bench.test_catalogue import assert_catalogued

MATRIX = """
name = "reports"
models = ["synthetic:llama-tiny"]
variants = ["fp32", "bf16"]
devices = ["cpu"]

[[scenarios]]
name = "generate"
batch_size = [1]
prompt_tokens = [16]
new_tokens = [4]

[measure]
warmup = 0
min_reps = 3
max_reps = 3
budget_s = 0
timeout_s = 300
roofline = true

[drift]
enabled = true
context = 32
max_tokens = 256
gen_prompts = 2
gen_prompt_tokens = 8
gen_new_tokens = 4
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", "run", *args, "--quiet"], capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_run_writes_reports_at_the_end_and_its_metrics_are_catalogued(tmp_path, cache_dir):
    matrix = tmp_path / "m.toml"
    matrix.write_text(MATRIX)
    out = _run(str(matrix), "--out", str(tmp_path / "run"), "--cache-dir", str(cache_dir))
    assert out.returncode in (0, 1), out.stdout + out.stderr
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert {r["status"] for r in records} == {"ok"}, [r.get("error") for r in records]
    assert_catalogued({k for r in records for k in r["metrics"]}, "a real run with drift and roofline")
    assert "kld_mean" in records[1]["metrics"] and "roofline_fraction" in records[1]["metrics"]
    md = (run / "report.md").read_text()
    assert "| fp32 |" in md and "| bf16 |" in md and "recommended:" in md
    assert (run / "report.html").read_text().count("<svg") >= 4
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert [r["variant"] for r in rows] == ["fp32", "bf16"] and float(rows[1]["kld_mean"]) > 0
    assert "reports: " in out.stderr

    again = _run(str(matrix), "--out", str(tmp_path / "quiet"), "--cache-dir", str(cache_dir), "--no-report",
                 "--no-drift", "--variants", "fp32")
    assert again.returncode == 0, again.stdout + again.stderr
    files = sorted(p.name for p in (tmp_path / "quiet").iterdir() if p.is_file())
    assert files == [".infermatrix.lock", "results.jsonl", "run.json"]  # the run's lock, the records; no reports
