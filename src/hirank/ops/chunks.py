"""Token chunks sized to the CPU cache, for the products that stream a state of many tokens through many small
steps (QuanTA's gates, SURM LDR's displacement terms): each chunk stays in cache from its first step to its last.

On one CPU thread, chunks of about 256 Ki elements (1 MiB in float32) were best or as good as any for both:
QuanTA at d = 4096 with 4,096 tokens 1.19× faster than whole passes, SURM LDR r = 8 with 512 tokens 1.2–1.3×
faster at d = 2048 and 4096 (``benchmarks/quanta.py``, ``benchmarks/surm.py --chunks``); 4 MiB chunks gained
less, 256 KiB ones lost to the per-chunk overhead. On accelerators, and while torch.compile traces (a loop
would unroll into the graph), a pass takes all tokens at once.
"""

from __future__ import annotations

import torch

#: elements (tokens × width) of one chunk's widest state on CPU
CPU_CHUNK_ELEMENTS = 1 << 18


def cache_chunk(tokens: int, width: int, device: torch.device) -> int:
    """Tokens per chunk of a pass over ``tokens`` rows of ``width`` values: all of them on accelerators and under
    torch.compile, else ``CPU_CHUNK_ELEMENTS`` worth."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return max(1, tokens)
    return max(1, min(tokens, CPU_CHUNK_ELEMENTS // max(1, width)))
