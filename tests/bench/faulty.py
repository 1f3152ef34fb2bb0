"""Build tiny model directories whose own modelling code misbehaves on purpose.

They are loaded with ``trust_remote_code`` like any model that ships its own code, so the
runner's handling of a raising, aborting or hanging cell is tested end to end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MODELING = '''
import os
import time

from transformers import LlamaConfig, LlamaForCausalLM


class FaultyForCausalLM(LlamaForCausalLM):
    config_class = LlamaConfig

    prefills = 0

    def forward(self, *args, **kwargs):
        fault = self.config.fault
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] > 1:  # a prompt's forward: one per generate call
            type(self).prefills += 1
        if type(self).prefills < self.config.fault_on_prefill:
            fault = None  # behave until the generate call the fault is due in
        batch = getattr(self.config, "fault_min_batch", 1)
        if ids is not None and ids.shape[0] < batch or str(self.dtype) not in self.config.fault_dtypes:
            fault = None  # a batched pass (drift's windows) of a variant of another dtype than the reference's
        if fault == "raise":
            raise RuntimeError("faulty model: forward raised on purpose")
        if fault == "abort":
            os.abort()
        if fault == "hang":
            _tell_pid(os.environ.get("FAULTY_HANG_MARKER"))  # where a test learns which process hangs
            time.sleep(3600)
        gate = os.environ.get("FAULTY_GATE")
        if fault == "gate" and gate and os.path.exists(gate):  # held while the test keeps the gate file
            _tell_pid(gate + ".pid")
            while os.path.exists(gate):
                time.sleep(0.05)
        return super().forward(*args, **kwargs)


def _tell_pid(marker):
    if marker:
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)
'''


def make_faulty(base: Path, out: Path, fault: str, on_call: int = 1, min_batch: int = 1,
                dtypes: tuple[str, ...] = ("torch.float32", "torch.bfloat16", "torch.float16")) -> Path:
    """Copy the model at ``base`` to ``out`` with a forward that does ``fault`` from the ``on_call``-th
    generate call of its process on (each generate call runs one forward over the prompt), only in
    forward passes of at least ``min_batch`` sequences and while its weights are of one of ``dtypes``
    (``min_batch=2, dtypes=("torch.bfloat16",)``: a bf16 variant's drift passes, not its timed batch-1
    calls nor the fp32 reference pass)."""
    shutil.copytree(base, out)
    config = json.loads((out / "config.json").read_text())
    config["fault"] = fault
    config["fault_on_prefill"] = on_call
    config["fault_min_batch"] = min_batch
    config["fault_dtypes"] = list(dtypes)
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_faulty.FaultyForCausalLM"}
    (out / "config.json").write_text(json.dumps(config))
    (out / "modeling_faulty.py").write_text(MODELING)
    return out
