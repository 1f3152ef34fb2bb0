"""Fetch the wheels ``ci/gpu-check`` needs on an offline CUDA host that has PyTorch but not our stack.

Usage: ``python ci/gpu_wheels.py [--dest .whl] [--python-version 3.12] [--cuda 130]``, on a machine
that reaches PyPI; copy DEST to the CUDA host and run ``GPU_CHECK_WHEELS=DEST ci/gpu-check`` there
(it installs them with ``pip --no-index --no-deps --target`` into a scratch folder).

The versions are the ones installed in the environment this script runs in (the one the test
suite passed with), so the GPU host runs the stack the CPU tests judged. Packages a stock CUDA
PyTorch image has at a usable version (torch, numpy, accelerate, safetensors, onnx, rich, scipy,
...) are not fetched; transformers' pins exclude the newer tokenizers and huggingface_hub such
images carry, so those are. bitsandbytes ships one kernel library per CUDA release (about 130 MB
unpacked); its wheel is rewritten to hold only the CPU library and the one for ``--cuda``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("transformers", "huggingface_hub", "tokenizers", "optimum", "optimum-onnx", "optimum-quanto",
            "torchao", "bitsandbytes", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",
            "fastjsonschema")
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_28_x86_64", "manylinux_2_31_x86_64",
             "manylinux_2_34_x86_64", "manylinux_2_35_x86_64", "manylinux1_x86_64")
BNB_LIBRARY = "bitsandbytes/libbitsandbytes_"


def pins() -> list[str]:
    out = []
    for name in PACKAGES:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            sys.exit(f"gpu_wheels: {name} is not installed here; run `make install` first")
    return out


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim_bitsandbytes(wheel: Path, cuda: str) -> tuple[int, int]:
    """Rewrite ``wheel`` in place without the kernel libraries of other CUDA releases and ROCm/XPU.

    Keeps ``libbitsandbytes_cpu.so`` and ``libbitsandbytes_cuda{cuda}.so``; the RECORD lists
    exactly the files left. Returns the sizes (bytes) before and after. Refuses a wheel that has
    no library for ``cuda``: bitsandbytes would then fail on that host at its first call.
    """
    keep = {f"{BNB_LIBRARY}cpu.so", f"{BNB_LIBRARY}cuda{cuda}.so"}
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        if f"{BNB_LIBRARY}cuda{cuda}.so" not in names:
            found = sorted(n.removeprefix(BNB_LIBRARY) for n in names if n.startswith(BNB_LIBRARY))
            raise SystemExit(f"gpu_wheels: {wheel.name} has no library for CUDA {cuda} (it has: {', '.join(found)})")
        kept = [n for n in names if not n.startswith(BNB_LIBRARY) or n in keep]
        record = next(n for n in kept if n.endswith(".dist-info/RECORD"))
        files = {n: src.read(n) for n in kept if n != record}
    lines = [_record_line(n, data) for n, data in files.items() if not n.endswith("/")]
    files[record] = ("\n".join([*lines, f"{record},,"]) + "\n").encode()
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for name in kept:
            dst.writestr(name, files[name])
    tmp.replace(wheel)
    return before, wheel.stat().st_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=Path(".whl"))
    ap.add_argument("--python-version", default="3.12", help="the CUDA host's Python (default 3.12)")
    ap.add_argument("--cuda", default="130", help="the CUDA host's torch.version.cuda without the dot (default 130)")
    args = ap.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):
        old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", args.python_version, "--implementation", "cp", "-d", str(args.dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run([*cmd, *pins()], check=True)
    for wheel in args.dest.glob("bitsandbytes-*.whl"):
        before, after = slim_bitsandbytes(wheel, args.cuda)
        print(f"gpu_wheels: {wheel.name}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB"
              f" (CPU and CUDA {args.cuda} kernels)")
    wheels = sorted(args.dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    print(f"gpu_wheels: {len(wheels)} wheels, {total / 1e6:.1f} MB in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
