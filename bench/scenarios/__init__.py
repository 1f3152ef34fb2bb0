"""Scenarios: what workload a cell times. ``SCENARIOS`` maps each name to its config class."""

from bench.scenarios.generate import GenerateScenario
from bench.scenarios.sweeps import DecodeScenario, PrefillScenario

SCENARIOS = {"generate": GenerateScenario, "prefill": PrefillScenario, "decode": DecodeScenario}
