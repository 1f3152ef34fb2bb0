"""ci/gpu-check, the one prepared run a CUDA host gets, and ci/gpu_wheels.py, which equips an offline one.

Device time is scarce: the script must work the first time it reaches a GPU. Without CUDA it
runs every step on the CPU (ci/gpu-dryrun.toml), which is what the dry-run test drives.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_wheels():
    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "ci" / "gpu_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_wheel(path: Path, files: dict[str, bytes]) -> Path:
    """A wheel as pip writes one: the files, then a RECORD of them (sha256, urlsafe base64, no padding)."""
    dist = next(n.split("/")[0] for n in files if n.endswith(".dist-info/METADATA"))
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return path


def _dist_info(name: str, version: str) -> dict[str, bytes]:
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    wheel = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    return {f"{name}-{version}.dist-info/METADATA": meta, f"{name}-{version}.dist-info/WHEEL": wheel}


def test_slim_bitsandbytes_keeps_the_cpu_and_one_cuda_library_and_a_true_record(tmp_path):
    lib = "bitsandbytes/libbitsandbytes_"
    files = {"bitsandbytes/__init__.py": b"x = 1\n", f"{lib}cpu.so": b"cpu" * 10,
             f"{lib}cuda128.so": b"128" * 1000, f"{lib}cuda130.so": b"130" * 20,
             f"{lib}cuda132.so": b"132" * 1000, f"{lib}rocm64.so": b"rocm" * 1000,
             **_dist_info("bitsandbytes", "0.50.2")}
    wheel = _write_wheel(tmp_path / "bitsandbytes-0.50.2-py3-none-any.whl", files)

    before, after = _gpu_wheels().slim_bitsandbytes(wheel, "130")

    assert before > after == wheel.stat().st_size
    kept = {n: d for n, d in files.items() if n not in {f"{lib}cuda128.so", f"{lib}cuda132.so", f"{lib}rocm64.so"}}
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert names == {*kept, "bitsandbytes-0.50.2.dist-info/RECORD"}
        assert all(zf.read(n) == d for n, d in kept.items())
        record = zf.read("bitsandbytes-0.50.2.dist-info/RECORD").decode().splitlines()
    by_name = {line.split(",")[0]: line for line in record}
    assert set(by_name) == names
    for name, data in kept.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert by_name[name] == f"{name},sha256={digest},{len(data)}"
    assert by_name["bitsandbytes-0.50.2.dist-info/RECORD"] == "bitsandbytes-0.50.2.dist-info/RECORD,,"
    # pip installs the rewritten wheel (it reads RECORD to lay the files out).
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(target), str(wheel)], check=True, capture_output=True)
    assert sorted(p.name for p in (target / "bitsandbytes").iterdir()) == [
        "__init__.py", "libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"]


def test_slim_bitsandbytes_refuses_a_wheel_without_the_hosts_cuda_library(tmp_path):
    files = {"bitsandbytes/libbitsandbytes_cpu.so": b"c", "bitsandbytes/libbitsandbytes_cuda128.so": b"8",
             **_dist_info("bitsandbytes", "0.50.2")}
    wheel = _write_wheel(tmp_path / "bitsandbytes-0.50.2-py3-none-any.whl", files)
    content = wheel.read_bytes()
    with pytest.raises(SystemExit, match=r"no library for CUDA 130 \(it has: cpu\.so, cuda128\.so\)"):
        _gpu_wheels().slim_bitsandbytes(wheel, "130")
    assert wheel.read_bytes() == content


def test_gpu_wheels_pins_the_versions_this_environment_runs():
    from importlib.metadata import version

    pins = _gpu_wheels().pins()
    assert f"transformers=={version('transformers')}" in pins
    assert f"bitsandbytes=={version('bitsandbytes')}" in pins
    assert all("==" in p for p in pins) and len(pins) == len(set(pins))


@pytest.mark.slow
def test_gpu_check_dry_run_returns_every_output_a_remote_runner_can_fetch(tmp_path):
    """The whole script on the CPU, wheels step included: outputs within 8 files, 2 folders deep."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _write_wheel(wheels / "gpu_check_probe-1.0-py3-none-any.whl",
                 {"gpu_check_probe/__init__.py": b"", **_dist_info("gpu_check_probe", "1.0")})
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "INFERMATRIX_CACHE": str(tmp_path / "cache"),
           "GPU_CHECK_WHEELS": str(wheels), "GPU_CHECK_BUDGET_S": "1500", "PYTHON": sys.executable,
           "GPU_CHECK_PROFILE": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    # The script runs as on a GPU host, not as part of this suite's xdist worker
    for name in [n for n in env if n.startswith("PYTEST_")]:
        env.pop(name)
    proc = subprocess.run(["bash", str(ROOT / "ci" / "gpu-check")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and all(len(p.parts) <= 3 for p in files), files
    assert {"log.txt", "env.json", "cuda-tests.txt", "summary.md", "failed-jobs.log",
            "run/run.json", "run/results.jsonl"} <= {str(p) for p in files}
    log = (out / "log.txt").read_text()
    assert f"gpu-check: 1 wheels from {wheels} installed" in log
    assert "dry run of every step on the CPU" in log and "(exit code 0)" in log

    records = [json.loads(line) for line in (out / "run" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 9
    assert all(r["status"] in ("ok", "skipped") for r in records), [(r["variant"], r.get("error")) for r in records]
    assert all(r.get("error") for r in records if r["status"] == "skipped")
    graphs = next(r for r in records if r["variant"] == "static-kv-bf16-cudagraphs")
    assert graphs["status"] == "ok" and graphs["timing_s"]["compile_and_capture"] > 0
    summary = (out / "summary.md").read_text()
    assert "| synthetic:llama-tiny | 1/32/8 |" in summary and "Static KV cache + CUDA-graph decode step" in summary
    tests = (out / "cuda-tests.txt").read_text().strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ skipped, \d+ deselected.*", tests), tests  # the CUDA tests ran, none failed
    assert f"gpu-check: cuda tests: {tests}\n" in log
    # GPU_CHECK_PROFILE=1: both decode paths profiled, into log.txt (no file more)
    profile = log[log.index("gpu-check: decode profile of synthetic:llama-tiny on cpu"):]
    for variant in ("bf16", "static-kv-bf16-cudagraphs"):
        section = profile[profile.index(f"===== synthetic:llama-tiny {variant} on cpu"):]
        assert re.search(r"^decode: [\d.]+ ms/token \([\d.]+ tok/s at batch 1\)", section, re.M), section[:500]
        assert "by self CPU time (one call, 66 tokens):" in section
    assert "decode profile failed" not in profile


def test_the_cuda_test_files_gpu_check_collects_hold_every_cuda_marked_test(request):
    """gpu-check collects only the files its grep finds: every test the ``cuda`` marker selects must be in one."""
    script = (ROOT / "ci" / "gpu-check").read_text()
    [command] = re.findall(r"^CUDA_TEST_FILES=\$\((.*)\)$", script, flags=re.M)
    listed = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    # the end-to-end file last: a time limit that stops its cold start must not cost the quick tests
    assert listed[-1] == "tests/bench/test_cuda_e2e.py" and len(listed) == len(set(listed)), listed
    found = set(listed)
    test_files = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")}
    from tests.conftest import COLLECTED

    items = request.config.stash[COLLECTED]  # before -m and -k deselected any
    if {str(Path(i.path).relative_to(ROOT)) for i in items} == test_files:  # this session collected the whole suite
        marked = {str(Path(i.path).relative_to(ROOT)) for i in items if i.get_closest_marker("cuda")}
    else:
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda",
                              "-p", "no:cacheprovider", "tests"], cwd=ROOT, capture_output=True, text=True).stdout
        marked = {line.split("::")[0] for line in out.splitlines() if "::" in line}
    assert len(marked) >= 5 and marked <= found, sorted(marked - found)


def _gpu_deps():
    spec = importlib.util.spec_from_file_location("gpu_dependencies", ROOT / "ci" / "gpu_dependencies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_deps_names_what_is_missing_or_at_another_version(tmp_path):
    from packaging.requirements import Requirement

    deps = _gpu_deps()
    import numpy

    reqs = [Requirement(r) for r in ("numpy>=1", "numpy<1", "no-such-package-infermatrix>=1", "pytest<1",
                                     "psutil")]
    assert deps.unmet(reqs) == ["no-such-package-infermatrix (not installed)",
                                f"pytest {pytest.__version__} (needs <1)"]  # numpy once: its first line is met
    assert deps.unmet([Requirement("numpy<1")]) == [f"numpy {numpy.__version__} (needs <1)"]
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["numpy>=1", "tomli>=2; python_version < \'3.0\'"]\n'
                         '[project.optional-dependencies]\ntest = ["pytest>=8", "ruff>=0.6"]\n')
    assert [str(r) for r in deps.requirements(pyproject)] == ["numpy>=1", "pytest>=8"]  # marker false, linter not
    names = {r.name for r in deps.requirements()}
    assert {"torch", "transformers", "psutil", "scipy", "nvidia-ml-py", "pytest"} <= names and "ruff" not in names


def test_gpu_check_refuses_a_cpu_dry_run_where_nvidia_smi_lists_a_gpu(tmp_path):
    """A torch that sees no CUDA on a GPU host (a CPU build, an old driver): exit 2 before any run, saying why."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)'\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "INFERMATRIX_CACHE": str(tmp_path / "cache"), "PYTHON": sys.executable,
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("GPU_CHECK_WHEELS", None)
    proc = subprocess.run(["bash", str(ROOT / "ci" / "gpu-check")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = (out / "log.txt").read_text()
    assert "nvidia-smi lists a GPU but" in log and "torch sees no CUDA device" in log and "built for CUDA" in log
    assert "gpu-check: all " in log and " dependencies met" in log
    assert not (out / "run").exists() and "dry run" not in log
