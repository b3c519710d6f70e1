"""Float32 matmul precision on CUDA: TF32 tensor cores (``train.tf32``, on by default) or full FP32.

Applied once per rank on its chosen device, before the engine is built. CPU runs are left untouched. The MFU
peak of an fp32 run follows the same switch (the TF32 tensor-core peak, or the plain FP32 one).
"""

from __future__ import annotations

import torch


def configure_tf32(device: torch.device, enabled: bool) -> None:
    """Let float32 matmuls on ``device`` use TF32 tensor cores (``enabled``) or keep them IEEE FP32."""
    if device.type != "cuda":
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; mixing it with allow_tf32 is an error there
        matmul.fp32_precision = "tf32" if enabled else "ieee"
    else:
        matmul.allow_tf32 = enabled
