"""The one table of third-party libraries whose versions the project records, and why each.

Roles (a library may have several):
  artifact   its version is part of a stored variant's cache key (a new version rebuilds)
  reference  its version is part of the drift reference's cache key
  drift      its version is part of a drift cache key (the variant's scoring path)
  compatible runs whose records differ in it are not merged (``bench/merge.py``)
  compare    a difference makes speed figures incomparable (``bench/compare.py``)
  report     shown in the report's environment line
Every library here is recorded in each run's environment (``bench/env.py``).
"""

from __future__ import annotations

LIBRARIES: dict[str, frozenset[str]] = {
    "torch": frozenset({"artifact", "reference", "drift", "compatible", "compare", "report"}),
    "transformers": frozenset({"artifact", "reference", "drift", "compatible", "compare", "report"}),
    "optimum": frozenset({"artifact", "compare", "report"}),
    "optimum-onnx": frozenset({"artifact"}),
    "onnx": frozenset({"artifact"}),
    "onnxruntime": frozenset({"artifact", "drift", "compatible", "compare", "report"}),
    "onnxruntime-gpu": frozenset({"artifact", "drift", "compatible", "compare", "report"}),
    "bitsandbytes": frozenset({"drift", "compatible", "compare", "report"}),
    "torchao": frozenset({"drift", "compatible", "compare", "report"}),
    "optimum-quanto": frozenset({"drift", "compare"}),
    "tokenizers": frozenset(),
    "safetensors": frozenset(),
    "numpy": frozenset({"compare"}),
    "scipy": frozenset(),
    "ray": frozenset(),
    "nvidia-ml-py": frozenset(),
    "infermatrix": frozenset(),
}
ROLES = ("artifact", "reference", "drift", "compatible", "compare", "report")


def libraries(role: str | None = None) -> tuple[str, ...]:
    """Library names in the table's order: all of them, or those playing ``role``.

    Args:
        role: one of ``ROLES``; None for every library.

    """
    assert role is None or role in ROLES, role
    return tuple(name for name, roles in LIBRARIES.items() if role is None or role in roles)
