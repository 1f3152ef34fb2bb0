"""Modules every cell process needs, imported once by the fork server.

Each job runs in a process forked from a server that has only imported these modules
(never run a model, never started a thread pool), so a cell starts in milliseconds instead
of paying torch's and transformers' multi-second imports, and still shares no state with
any other cell. Optional back ends (bitsandbytes, ONNX Runtime, optimum) are left to the
cells that use them, so they add nothing to the other cells' memory.
"""

import torch  # noqa: F401
import transformers  # noqa: F401
import transformers.generation.utils  # noqa: F401
import transformers.modeling_utils  # noqa: F401  (imported lazily by from_pretrained: ~1.4 s)
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, LogitsProcessorList  # noqa: F401

import bench.cell  # noqa: F401
import bench.scenarios  # noqa: F401
import optimize.registry  # noqa: F401
