"""A safetensors writer for a tensor too large to hold in memory: its rows arrive in chunks."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

_ST_DTYPES = {"torch.int64": "I64", "torch.float32": "F32"}


def write_safetensors_streamed(path: Path, tensors: dict, streamed: tuple, metadata: dict[str, str]) -> None:
    """Write a safetensors file whose last tensor arrives in chunks along its first dimension.

    ``safetensors.torch.save_file`` needs every tensor in memory at once, and the log-probs
    can be gigabytes, so this writes the format directly: an 8-byte little-endian header
    length, the JSON header (padded to 8 bytes), then each tensor's raw little-endian bytes.
    """
    import torch

    assert sys.byteorder == "little"
    name, shape, chunks = streamed
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, t in [*tensors.items(), (name, None)]:
        nbytes = math.prod(shape) * 4 if t is None else t.numel() * t.element_size()
        dtype = "F32" if t is None else _ST_DTYPES[str(t.dtype)]
        header[key] = {"dtype": dtype, "shape": list(shape if t is None else t.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    written = 0
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            fh.write(t.detach().cpu().contiguous().numpy().tobytes())
        for chunk in chunks:
            assert chunk.dtype == torch.float32 and tuple(chunk.shape[1:]) == tuple(shape[1:]), chunk.shape
            data = chunk.detach().cpu().contiguous().numpy().tobytes()
            fh.write(data)
            written += len(data)
    assert written == math.prod(shape) * 4, (written, shape)
