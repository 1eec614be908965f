# SPDX-License-Identifier: Apache-2.0
"""Cython wrapper of the masked softmax kernel (src_c/softmax.c). Inputs are validated by
``attncore.kernels.softmax``: 2-D C-contiguous rows, lengths int64 (n_rows,), mask uint8."""
cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from cython cimport floating

from ._checks cimport first_outside
from ._ndarray cimport empty_like, float_type, last_axis_length

cnp.import_array()

cdef extern from "math.h" nogil:
    float nextafterf(float x, float y)
    double fabs(double x)
    const float INFINITY

cdef extern from "softmax.h" nogil:
    void ac_softmax_f32(const float *x, float *y, Py_ssize_t n_rows, Py_ssize_t n,
                        const int64_t *lengths, const uint8_t *mask, int log_output,
                        int num_threads)
    void ac_softmax_f64(const double *x, double *y, Py_ssize_t n_rows, Py_ssize_t n,
                        const int64_t *lengths, const uint8_t *mask, int log_output,
                        int num_threads)
    void ac_softmax_cols_f32(const float *x, float *y, Py_ssize_t P, Py_ssize_t A, Py_ssize_t B,
                             int log_output, int num_threads)


def softmax_rows(const floating[:, ::1] x, floating[:, ::1] out, const int64_t[::1] lengths,
                 const uint8_t[:, ::1] mask, bint log_output, int num_threads):
    """out (n_rows, n) = (log-)softmax of each row of x (n_rows, n); lengths/mask may be None."""
    cdef Py_ssize_t n_rows = x.shape[0], n = x.shape[1]
    # (checked again for a direct call of this private module: a short out, lengths or mask,
    # or a length past n, read or wrote past the arrays)
    if (out is None or out.shape[0] != n_rows or out.shape[1] != n
            or (lengths is not None and lengths.shape[0] != n_rows)
            or (mask is not None and (mask.shape[0] != n_rows or mask.shape[1] != n))):
        raise ValueError("softmax_rows: out must be x's shape, lengths (n_rows,), mask x's shape")
    if lengths is not None and first_outside(lengths, 0, n) >= 0:
        raise ValueError("softmax_rows: lengths must lie in [0, n]")
    if n_rows == 0 or n == 0:
        return
    cdef const int64_t *lengths_ptr = &lengths[0] if lengths is not None else NULL
    cdef const uint8_t *mask_ptr = &mask[0, 0] if mask is not None else NULL
    with nogil:
        if floating is float:
            ac_softmax_f32(&x[0, 0], &out[0, 0], n_rows, n, lengths_ptr, mask_ptr, log_output,
                           num_threads)
        else:
            ac_softmax_f64(&x[0, 0], &out[0, 0], n_rows, n, lengths_ptr, mask_ptr, log_output,
                           num_threads)


def softmax_last(x, bint log_output, int num_threads):
    """The (log-)softmax of x (..., n) over its last axis, nothing excluded, as a new array
    (softmax_rows with the front's reshapes and its fused-type dispatch left out: ~1.5 us of
    a small call)."""
    cdef int type_num = float_type(x, "x")
    cdef cnp.ndarray arr = <cnp.ndarray>x
    cdef Py_ssize_t n = last_axis_length(arr, "softmax_last: x")
    cdef Py_ssize_t size = cnp.PyArray_SIZE(arr)
    cdef cnp.ndarray out = empty_like(arr)
    if size == 0:
        return out
    cdef const void *src = cnp.PyArray_DATA(arr)
    cdef void *dst = cnp.PyArray_DATA(out)
    with nogil:
        if type_num == cnp.NPY_FLOAT32:
            ac_softmax_f32(<const float *>src, <float *>dst, size // n, n, NULL, NULL,
                           log_output, num_threads)
        else:
            ac_softmax_f64(<const double *>src, <double *>dst, size // n, n, NULL, NULL,
                           log_output, num_threads)
    return out


def softmax_cols(const float[:, :, ::1] x, float[:, :, ::1] out, bint log_output,
                 int num_threads):
    """out (P, A, B) = (log-)softmax of x (P, A, B) over its middle axis, nothing excluded."""
    cdef Py_ssize_t P = x.shape[0], A = x.shape[1], B = x.shape[2]
    if out is None or out.shape[0] != P or out.shape[1] != A or out.shape[2] != B:
        raise ValueError("softmax_cols: out must be x's shape")
    if P == 0 or A == 0 or B == 0:
        return
    with nogil:
        ac_softmax_cols_f32(&x[0, 0, 0], &out[0, 0, 0], P, A, B, log_output, num_threads)


cdef inline Py_ssize_t _offer(double v, int64_t i, double *best, int64_t *index,
                              Py_ssize_t count, Py_ssize_t k) noexcept nogil:
    """Put (v, i) in its place in the ranking best / index (count entries, descending, room for
    k >= 1) and return the new count. NaN, and values not above the k-th when full, stay out;
    an equal value goes after the ones already there (offered in index order, equal values
    rank by lower index)."""
    cdef Py_ssize_t p, j
    if v != v or (count == k and not v > best[k - 1]):
        return count
    p = count if count < k else k - 1   # the first place holding a smaller value
    while p > 0 and best[p - 1] < v:
        p -= 1
    if count < k:
        count += 1
    for j in range(count - 1, p, -1):
        best[j] = best[j - 1]
        index[j] = index[j - 1]
    best[p] = v
    index[p] = i
    return count


def top_k(const double[::1] x, Py_ssize_t k):
    """The indices of the k largest values of x (n,), largest first, equal values by lower index
    (a stable, deterministic ranking; NaN never ranks). Returns int64 (min(k, non-NaN count),).

    One pass keeping the best k in order: O(n) comparisons against the k-th best, O(k) for the
    few values that enter.
    """
    import numpy as np
    cdef Py_ssize_t n = x.shape[0], count = 0, i
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    k = min(k, n)
    cdef double[::1] best = np.empty(max(k, 1), dtype=np.float64)
    out = np.empty(max(k, 1), dtype=np.int64)
    cdef int64_t[::1] index = out
    if k == 0:
        return out[:0]
    with nogil:
        for i in range(n):
            count = _offer(x[i], i, &best[0], &index[0], count, k)
    return out[:count]


def beam_top_k(const floating[:, ::1] scores, const double[::1] base,
               const int64_t[::1] bounds, Py_ssize_t k):
    """Beam search's ranking of each source's candidates without forming them: for each group g
    of rows bounds[g] <= r < bounds[g + 1] (one source's beams), the k best values
    base[r] + scores[r, t] (float64 sums of the float32 log-probs, as NumPy adds them), as
    ``top_k`` ranks the group's (rows, V) block flattened: largest first, equal values by (row,
    token), NaN never ranks.

    scores (R, V) float32 (or float64), base (R,) float64, bounds (G + 1,) int64 from 0 to R, non-decreasing.
    Returns index (G, k') int64 (local row * V + token), value (G, k') float64 and count (G,)
    int64 (the first count[g] entries of group g are its ranking), k' = min(k, the largest
    group's candidates).
    """
    import numpy as np
    cdef Py_ssize_t R = scores.shape[0], V = scores.shape[1], G = bounds.shape[0] - 1
    cdef Py_ssize_t g, r, t, count
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if base.shape[0] != R:
        raise ValueError(f"base must have shape ({R},), got ({base.shape[0]},)")
    if G < 0 or bounds[0] != 0 or bounds[G] != R:
        raise ValueError(f"bounds must run from 0 to {R}")
    cdef Py_ssize_t widest = 0
    for g in range(G):
        if bounds[g + 1] < bounds[g]:
            raise ValueError("bounds must be non-decreasing")
        widest = max(widest, bounds[g + 1] - bounds[g])
    k = min(k, max(widest * V, 1))   # no group has more candidates (a huge beam_size)
    index_out = np.zeros((max(G, 0), k), dtype=np.int64)
    value_out = np.full((max(G, 0), k), -np.inf, dtype=np.float64)
    count_out = np.zeros(max(G, 0), dtype=np.int64)
    if G == 0:
        return index_out, value_out, count_out
    cdef int64_t[:, ::1] index = index_out
    cdef double[:, ::1] value = value_out
    cdef int64_t[::1] counts = count_out
    cdef double b
    cdef Py_ssize_t end
    with nogil:
        for g in range(G):
            count = 0
            for r in range(bounds[g], bounds[g + 1]):
                b = base[r]
                t = 0
                while t < V:
                    end = min(t + _BLOCK, V)
                    # a full ranking admits only a sum above its k-th: a float32 block none
                    # of whose scores can reach it is skipped whole (one vectorised pass of
                    # compares, a fraction of the ranking's cost per score)
                    if floating is float:
                        if count == k and not _may_enter(&scores[r, t], end - t,
                                                         _bound(b, value[g, k - 1])):
                            t = end
                            continue
                    for t in range(t, end):
                        count = _offer(b + <double>scores[r, t], (r - bounds[g]) * V + t,
                                       &value[g, 0], &index[g, 0], count, k)
                    t = end
            counts[g] = count
    return index_out, value_out, count_out


#: scores a beam_top_k block holds (its max decides whether the block is read element by
#: element)
cdef Py_ssize_t _BLOCK = 256


cdef inline float _bound(double b, double kth) noexcept nogil:
    """A float32 bound such that every score s < bound has b + s (float64) <= kth, so that it
    cannot enter a full ranking whose k-th value is kth: under kth - b by a margin far past
    the rounding of that difference (b + s rounds monotonically: s <= kth - b in exact
    arithmetic gives fl(b + s) <= kth). -inf where nothing is certain (every score is read)."""
    cdef double room = kth - b
    cdef float bound
    if room == INFINITY:   # (b = -inf, or kth = +inf: no sum exceeds kth)
        return INFINITY
    if not (fabs(room) < 1e300):
        return -INFINITY
    room -= (fabs(kth) + fabs(b)) * 1e-12 + 1e-300
    bound = <float>room
    if bound > room:   # (rounded up to float32: one step down)
        bound = nextafterf(bound, -INFINITY)
    return bound


cdef inline bint _may_enter(const float *x, Py_ssize_t n, float bound) noexcept nogil:
    """Whether a score of x[:n] is at least bound, or NaN (read those blocks one by one):
    compares summed without a branch, so that the compiler vectorises the loop."""
    cdef Py_ssize_t i
    cdef int hits = 0
    for i in range(n):
        hits += (x[i] >= bound) | (x[i] != x[i])
    return hits != 0


cdef void _radix_sort_descending(uint64_t *keys, uint64_t *scratch, Py_ssize_t n) noexcept nogil:
    """Sort n keys largest first: least-significant-byte radix passes, each a stable scatter;
    a byte every key shares is a pass skipped (the sign and most exponent bits of a row of
    probabilities)."""
    cdef Py_ssize_t counts[8][256]
    cdef Py_ssize_t i, b, total, c
    cdef int byte
    cdef uint64_t *src = keys
    cdef uint64_t *dst = scratch
    cdef uint64_t *swap
    memset(counts, 0, sizeof(counts))
    for i in range(n):
        for byte in range(8):
            counts[byte][(src[i] >> (8 * byte)) & 0xFF] += 1
    for byte in range(8):
        if counts[byte][(src[0] >> (8 * byte)) & 0xFF] == n:
            continue
        # descending: bucket 255 first
        total = 0
        for b in range(255, -1, -1):
            c = counts[byte][b]
            counts[byte][b] = total
            total += c
        for i in range(n):
            b = (src[i] >> (8 * byte)) & 0xFF
            dst[counts[byte][b]] = src[i]
            counts[byte][b] += 1
        swap = src
        src = dst
        dst = swap
    if src != keys:
        memcpy(keys, src, n * sizeof(uint64_t))


def nucleus(const double[::1] probs, double top_p, double[::1] out):
    """The top-p nucleus of probabilities probs (V,) (finite, >= 0) written to out (V,): each
    token of the smallest prefix of the ranking (largest first, equal values by lower id) whose
    running sum before it is below top_p keeps its probability, every other token 0. The
    running sums are float64 additions in ranking order (``numpy.cumsum`` of the values sorted
    largest first: ties have equal values, so the order among them does not change a sum).
    Returns the nucleus size.

    The values are ranked by a radix sort of their bit patterns (non-negative doubles order as
    their unsigned integers), about 8 times faster than NumPy's float64 sort here.
    """
    cdef Py_ssize_t V = probs.shape[0], i, size = 0, above = 0, tied
    cdef double running = 0.0, smallest
    if out.shape[0] != V:
        raise ValueError(f"out must have {V} entries, got {out.shape[0]}")
    if V == 0:
        return 0
    if not top_p > 0.0:
        raise ValueError(f"top_p must be > 0, got {top_p}")
    cdef uint64_t *keys = <uint64_t *> malloc(2 * V * sizeof(uint64_t))
    if keys == NULL:
        raise MemoryError()
    with nogil:
        memcpy(keys, &probs[0], V * sizeof(uint64_t))
        for i in range(V):   # (-0.0 as 0.0: its sign bit would rank it first)
            if keys[i] == 0x8000000000000000ULL:
                keys[i] = 0
        _radix_sort_descending(keys, keys + V, V)
        while size < V and (size == 0 or running < top_p):
            running = running + (<double *> keys)[size]
            size += 1
        smallest = (<double *> keys)[size - 1]
        for i in range(V):
            if probs[i] > smallest:
                out[i] = probs[i]
                above += 1
            else:
                out[i] = 0.0
        tied = size - above
        i = 0
        while tied > 0 and i < V:
            if probs[i] == smallest:
                out[i] = smallest
                tied -= 1
            i += 1
    free(keys)
    return size
