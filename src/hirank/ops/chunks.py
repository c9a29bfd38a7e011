"""Token chunks sized to the CPU cache, for the products that stream the rows of many tokens through many small
steps (QuanTA's gates, SURM's transforms): each chunk stays in cache from its first step to its last.

On one CPU thread, chunks of about 256 Ki elements (1 MiB in float32) were best or as good as any for both. A
training step with whole passes took 1.19× as long for QuanTA at d = 4096 with 4,096 tokens
(``benchmarks/quanta.py``) and 1.30× for SURM LDR r = 1 there (``benchmarks/surm.py --mlp``); the LDR r = 8
product alone ran 1.2–1.3× faster in chunks at d = 2048 and 4096 with 512 tokens. Smaller chunks (256 KiB) lost
to the per-chunk overhead, larger ones (2–4 MiB) gained less. With two threads the chunks still paid for QuanTA
(1.09× at d = 2048 with 2,048 tokens, 1.22× at d = 4096 with 4,096) and were neutral for SURM with 512 tokens
(0.95–1.03×). On accelerators, and while torch.compile traces (a loop would unroll into the graph), a pass takes
all tokens at once.
"""

from __future__ import annotations

import torch

#: elements (tokens × width) of one chunk's widest state on CPU
CPU_CHUNK_ELEMENTS = 1 << 18
#: elements up to which a pass of few steps per row (SURM's circulant and Kronecker, LoRATRF's filter) takes all
#: tokens at once on CPU (8 MiB in float32): below it the chunks' copies into the output cost more than the cache
#: saves (whole passes 1.1–1.3× faster for the circulant at 512–1,024 × 1,024), beyond it every whole step writes
#: to fresh memory (whole passes 1.2–1.5× slower from 2,048 × 1,024 on; measured on one thread, side by side)
WHOLE_PASS_ELEMENTS = 1 << 21


def token_chunks(tokens: int, width: int, device: torch.device, at_most: int | None = None,
                 few_steps: bool = False) -> list[slice]:
    """Slices of ``tokens`` rows of ``width`` values, in order: one slice of all of them on accelerators and under
    torch.compile, else ``CPU_CHUNK_ELEMENTS`` worth each (and at most ``at_most`` rows each). A pass of
    ``few_steps`` per row (whose output :func:`gather_rows` collects) gets one slice of all of them up to
    ``WHOLE_PASS_ELEMENTS``, and always one slice at least: an empty one when there are no tokens."""
    if few_steps and tokens == 0:
        return [slice(0, 0)]
    if device.type != "cpu" or torch.compiler.is_compiling() or (few_steps and tokens * width <= WHOLE_PASS_ELEMENTS):
        size = max(1, tokens)
    else:
        size = max(1, min(tokens, CPU_CHUNK_ELEMENTS // max(1, width)))
    if at_most is not None:
        size = max(1, min(size, at_most))
    return [slice(start, start + size) for start in range(0, tokens, size)]


def gather_rows(whole: torch.Tensor | None, part: slice, block: torch.Tensor, rows: int) -> torch.Tensor:
    """The output of a pass over row chunks, its rows ``part`` set to ``block``: ``block`` itself when it holds
    all ``rows`` rows (one chunk: no copy), else copied into ``whole`` (allocated on first use). A pass whose chunks
    free their temporaries before the next chunk lets that chunk reuse their memory while it is still in cache."""
    if block.shape[0] == rows:
        return block
    if whole is None:
        whole = block.new_empty(rows, *block.shape[1:])
    whole[part] = block
    return whole


def sum_over_chunks(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """``total + value`` for a sum over row chunks (``total`` None before the first): the first chunk's value
    itself (one chunk: as a whole pass), then a float32 sum at least (a bfloat16 sum would round at every chunk)."""
    if total is None:
        return value
    return total.to(torch.promote_types(total.dtype, torch.float32)).add_(value)
