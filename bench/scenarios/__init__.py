"""Scenarios: what workload a cell times. ``SCENARIOS`` maps each name to its class."""

from __future__ import annotations

from typing import Any

from bench.scenarios.base import Footprint, Scenario
from bench.scenarios.generate import GenerateScenario
from bench.scenarios.sweeps import DecodeScenario, PrefillScenario

SCENARIOS: dict[str, type[Scenario]] = {k.name: k for k in (GenerateScenario, PrefillScenario, DecodeScenario)}

__all__ = ["SCENARIOS", "DecodeScenario", "Footprint", "GenerateScenario", "PrefillScenario", "Scenario",
           "scenario_from_dict"]


def scenario_from_dict(data: dict[str, Any]) -> Scenario:
    """The scenario a ``to_dict`` wrote (a cell's job file); its fixed settings are the class's own."""
    kind = SCENARIOS[data["name"]]
    return kind(**{k: data[k] for k in kind.settings() if k in data})
