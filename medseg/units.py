"""Units shared by every layer: memory sizes.

Every "GB" in medseg (``train.memory_gb``, ``medseg predict --max-memory``, estimates in logs and
manifests) is a GiB, ``2**30`` bytes, as the kernel and the CUDA allocator count.
"""

from __future__ import annotations

GB = 1 << 30
"""Bytes per GB (GiB)."""

MB = 1 << 20
"""Bytes per MB (MiB)."""


def format_bytes(n: float) -> str:
    """``"1.50 GB"`` from a tenth of a GB up, ``"12.3 MB"`` below, ``"3.2 TB"``/``"1.78 PB"`` for what
    a forged header may declare.

    >>> format_bytes(3 * GB // 2), format_bytes(5 * MB), format_bytes(2 * 10**15)
    ('1.50 GB', '5.0 MB', '1.78 PB')
    """
    if n >= 1024**2 * GB:
        return f"{n / 1024**2 / GB:.3g} PB"
    if n >= 1024 * GB:
        return f"{n / 1024 / GB:.3g} TB"
    return f"{n / GB:.2f} GB" if n >= GB // 10 else f"{n / MB:.1f} MB"
