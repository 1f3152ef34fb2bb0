"""Modules every cell process needs, imported once by the fork server.

Each job runs in a process forked from a server that has only imported these modules
(never run a model, never started a thread pool), so a cell starts in milliseconds instead
of paying torch's and transformers' multi-second imports, and still shares no state with
any other cell. Optional back ends (bitsandbytes, ONNX Runtime, optimum) are left to the
cells that use them, so they add nothing to the other cells' memory.

The server must never initialise CUDA: a child forked from a process that did cannot use
CUDA at all. torchao, which ``transformers.modeling_utils`` imports when it is installed,
asks for the device capability at import time when torch sees a GPU, so on a host where a
CUDA device is visible ``transformers.modeling_utils`` (and the model classes that need it)
is left to the children. Where is_available() is called anyway while importing, torch
answers from NVML (``PYTORCH_NVML_BASED_CUDA_CHECK``), which creates no CUDA context.
What the imports print (torchao's "Failed to load ..." lines, torch's warnings) goes to the
server's log file (``preload.log`` in the cache directory), never to the console.
"""

import os

PRELOAD_LOG = "preload.log"


def _quiet_imports() -> None:
    """Send this process's stdout and stderr to the preload log (children redirect to their own)."""
    from optimize.models import default_cache_dir

    path = str(default_cache_dir() / PRELOAD_LOG)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


_quiet_imports()
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"
os.environ[NVML_CHECK] = "1"  # for the server's imports only: each job takes its starter's environment (bench.runner)

import torch  # noqa: E402


def cuda_device_visible() -> bool:
    """Whether libraries imported here would see a CUDA device; answered without initialising CUDA."""
    if torch.version.cuda is None and torch.version.hip is None:
        return False  # a CPU build: no library can reach a device
    count = getattr(torch.cuda, "_device_count_nvml", lambda: -1)() if torch.version.hip is None else -1
    if count >= 0:
        return count > 0
    import ctypes.util

    # NVML could not answer (MIG UUIDs, ROCm, a missing library): a device is possible where a driver is installed.
    return bool(ctypes.util.find_library("nvidia-ml") or ctypes.util.find_library("amdhip64")
                or os.path.exists("/proc/driver/nvidia"))


CUDA_DEVICE_VISIBLE = cuda_device_visible()

import transformers  # noqa: E402, F401
import transformers.generation.utils  # noqa: E402, F401
from transformers import AutoTokenizer, LogitsProcessorList  # noqa: E402, F401

if not CUDA_DEVICE_VISIBLE:
    import transformers.modeling_utils  # noqa: F401  (imports torchao: ~1.4 s more per child where it is skipped)
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

import scipy.stats  # noqa: E402, F401  (every cell's summaries use it: 1.5 s to import in each cell otherwise)

import bench.cell  # noqa: E402, F401
import bench.scenarios  # noqa: E402, F401
import optimize.registry  # noqa: E402, F401
from bench.metrics.resident import resident_file_pages  # noqa: E402

# What a fresh process that imported all this has resident of its libraries; each job makes these
# pages resident again before its first memory reading (a fork leaves them out of its RSS).
RESIDENT_FILE_PAGES = resident_file_pages()
