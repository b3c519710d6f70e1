"""Datasheet peak FLOP/s of NVIDIA data-centre GPUs, looked up by the name ``torch.cuda.get_device_name`` reports.

Dense figures (NVIDIA's datasheets print tensor-core figures with 2:4 sparsity; these are half of those), one
GPU, per matmul precision:

- ``bf16``: BF16/FP16 tensor cores; ``fp8``: FP8 tensor cores (absent before Hopper);
- ``tf32``: float32 matmuls on TF32 tensor cores (torch's ``fp32_precision = "tf32"``);
- ``fp32``: plain FP32 on the CUDA cores (non-tensor), what float32 matmuls get with TF32 off.

Sources: the H100 datasheet (SXM, PCIe, NVL columns), the H200 datasheet (SXM and NVL), the GH200 datasheet,
the H800 SXM5 and PCIe datasheets, the HGX B200 datasheet (8-GPU totals / 8), the GB200 NVL72 datasheet
(72-GPU totals / 72), NVIDIA's HGX H20 specification (dense figures as published) and the A100 datasheet.
"""

from __future__ import annotations

Peaks = dict[str, float]

_HOPPER_SXM: Peaks = {"bf16": 989e12, "fp8": 1979e12, "tf32": 494.5e12, "fp32": 67e12}
_HOPPER_PCIE: Peaks = {"bf16": 756e12, "fp8": 1513e12, "tf32": 378e12, "fp32": 51e12}
_HOPPER_NVL: Peaks = {"bf16": 835.5e12, "fp8": 1670.5e12, "tf32": 417.5e12, "fp32": 60e12}
_AMPERE: Peaks = {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}  # no fp8 units

# Order matters: the first name found in the device name wins (case-insensitive), so specific names come
# before the general ones they contain ("H100 NVL" before "H100", "H200" before "H20", "GB200" before "B200").
GPU_PEAK_TABLE: tuple[tuple[str, Peaks], ...] = (
    ("H100 NVL", _HOPPER_NVL),
    ("H100 PCIe", _HOPPER_PCIE),
    ("H100", _HOPPER_SXM),  # "NVIDIA H100 80GB HBM3" (SXM5)
    ("H200 NVL", _HOPPER_NVL),
    ("GH200", _HOPPER_SXM),
    ("H200", _HOPPER_SXM),
    ("H800 PCIe", _HOPPER_PCIE),
    ("H800", _HOPPER_SXM),
    ("H20", {"bf16": 148e12, "fp8": 296e12, "tf32": 74e12, "fp32": 44e12}),
    ("GB200", {"bf16": 2.5e15, "fp8": 5e15, "tf32": 1.25e15, "fp32": 80e12}),
    ("B200", {"bf16": 2.25e15, "fp8": 4.5e15, "tf32": 1.125e15, "fp32": 75e12}),
    ("A100", _AMPERE),
    ("A800", _AMPERE),
)
MATMUL_PRECISIONS = ("bf16", "fp8", "tf32", "fp32")
FALLBACK_PRECISION = "bf16"  # what a GPU without the requested units (fp8 on an A100) runs the matmuls in


def matmul_precision(precision: str, tf32: bool) -> str:
    """The table column a run's matmuls use: ``train.precision`` (fp32 | bf16 | fp8, or fp16 / tf32) plus
    whether float32 matmuls may use TF32 tensor cores."""
    if precision == "fp32":
        return "tf32" if tf32 else "fp32"
    if precision == "fp16":
        return "bf16"
    if precision in MATMUL_PRECISIONS:
        return precision
    raise ValueError(f"precision '{precision}' is not one of fp32, tf32, bf16, fp16, fp8")


def table_peak(device_name: str, precision: str) -> tuple[float, str] | None:
    """(peak dense FLOP/s, label) of ``device_name`` at table column ``precision``; None for a GPU not in
    the table. A column the GPU lacks falls back to bf16 and says so in the label."""
    name = device_name.lower()
    for key, peaks in GPU_PEAK_TABLE:
        if key.lower() in name:
            used = precision if precision in peaks else FALLBACK_PRECISION
            note = "" if used == precision else f" (no {precision})"
            return peaks[used], f"table:{key} {used}{note}"
    return None
