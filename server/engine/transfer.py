"""Host lists to device tensors without waiting on the device.

`torch.tensor(values, device="cuda")` copies with `non_blocking=False`, which synchronises the
stream: every such call in a step would wait for the GPU to finish the work queued before it. A
non-blocking copy from pageable host memory is staged by the driver at once and ordered on the
stream, so the host goes on queueing work; the engine's one sync per step is its read of the
sampled tokens. On a CPU this is the plain `torch.tensor`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def device_tensor(
    values: Sequence[int] | Sequence[float] | Sequence[bool], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """values -> a 1-D tensor of `dtype` on `device`, copied without a stream sync."""
    host = torch.tensor(values, dtype=dtype)
    return host if device.type == "cpu" else host.to(device, non_blocking=True)
