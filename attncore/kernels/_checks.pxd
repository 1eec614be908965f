# SPDX-License-Identifier: Apache-2.0
"""Checks the private Cython modules repeat before their C code indexes by an array's values
(the public fronts check them for users; a direct call of a private module must not read or
write past an array either)."""
from libc.stdint cimport int64_t


cdef inline Py_ssize_t first_outside_of(const int64_t *values, Py_ssize_t n, int64_t low,
                                        int64_t high) noexcept nogil:
    """The index of the first of the n values outside [low, high], or -1 when every value is
    inside (both bounds included: lengths go up to their axis, ids pass ``high = vocab - 1``)."""
    cdef Py_ssize_t i
    for i in range(n):
        if values[i] < low or values[i] > high:
            return i
    return -1


cdef inline Py_ssize_t first_outside(const int64_t[::1] values, int64_t low,
                                     int64_t high) noexcept nogil:
    """first_outside_of over a memoryview's values."""
    if values.shape[0] == 0:
        return -1
    return first_outside_of(&values[0], values.shape[0], low, high)
