# SPDX-License-Identifier: Apache-2.0
"""Memory for packed weights, on transparent huge pages where Linux offers them; read-only
views of arrays nobody may edit (``read_only_view``).

A decoding step streams every packed weight once per token. On 4 KiB pages that is one TLB
miss per 4 KiB read, and where the weights come from DRAM the page walks show. NumPy asks for
huge pages only for arrays of 4 MiB or more, which most step weights are not (Transformer-base:
1-3 MB each in float32, half that in bfloat16). With every packed weight on 2 MiB pages,
Transformer-base at batch 1 ran 175-176 tokens/s where it ran 155-167 (float32, one thread,
alternating runs; bfloat16 227-246 against 224-230); the seq2seq step, whose 4-8 MB of weights
stay in L3, moved within the noise.

So packed weights are carved out of chunks of private anonymous memory, 2 MiB-aligned and
advised ``MADV_HUGEPAGE`` (``transparent_hugepage=madvise``, the common default, then backs
them; ``never`` leaves them on 4 KiB pages: the old speed). A chunk is 16 MiB of virtual memory,
resident as it is touched; a weight of more than 4 MiB gets a mapping of its own. Each array
keeps its chunk alive: a chunk is unmapped when the last array carved from it goes, so a
model's freed weights can stay resident (at most one chunk's worth) while weights of another
model loaded after it share their chunk. Elsewhere (no ``mmap.MADV_HUGEPAGE``) arrays come from
``numpy.empty``.
"""
import errno
import mmap
import threading

import numpy as np

__all__ = ["empty_for_streaming", "read_only_view"]

HUGE_PAGE = 2 << 20
CHUNK = 16 << 20
MIN_BYTES = 64 << 10   # smaller arrays stay in the allocator's heap
ALIGN = 4096           # arrays start on a page of their own

_lock = threading.Lock()
_chunk = None          # (uint8 array over the current chunk, next free offset)


def _new_chunk(nbytes: int) -> np.ndarray:
    """A zeroed uint8 array of at least ``nbytes``, 2 MiB-aligned, advised for huge pages."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    # private: a shared anonymous mapping is shmem, which THP leaves alone by default
    try:
        area = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as exc:   # (ENOMEM came out as an OSError, which `except MemoryError` missed)
        if exc.errno != errno.ENOMEM:
            raise
        raise MemoryError(f"cannot map {size + HUGE_PAGE} bytes for packed weights") from None
    raw = np.frombuffer(area, dtype=np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE
    try:
        area.madvise(mmap.MADV_HUGEPAGE, start, size)
    except OSError:  # a kernel without THP: 4 KiB pages, nothing lost
        pass
    return raw[start:start + size]


def empty_for_streaming(shape, dtype) -> np.ndarray:
    """An uninitialised (zeroed where it is new memory) C-contiguous array of ``shape`` and
    ``dtype`` for a weight that decoding steps stream: on huge pages where available."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(shape, dtype=dtype)
    global _chunk
    with _lock:
        if nbytes > CHUNK // 4:
            memory = _new_chunk(nbytes)[:nbytes]
        else:
            if _chunk is None or _chunk[1] + nbytes > len(_chunk[0]):
                _chunk = (_new_chunk(CHUNK), 0)
            chunk, offset = _chunk
            memory = chunk[offset:offset + nbytes]
            _chunk = (chunk, offset + -(-nbytes // ALIGN) * ALIGN)
    return memory.view(dtype).reshape(shape)


def read_only_view(array: np.ndarray) -> np.ndarray:
    """``array`` made read-only, returned as a view that cannot be made writeable again (NumPy
    refuses ``flags.writeable = True`` on a view whose base is read-only): for arrays the
    library made and derives other arrays from once, such as a model's weights, which an edit
    in place would change in part only. ``array`` may be a view of an array the library made
    (a reshape): the arrays it views are made read-only too, or the view could be made
    writeable again."""
    base = array
    while isinstance(base, np.ndarray):
        base.flags.writeable = False
        base = base.base
    return array.view()
