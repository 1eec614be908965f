# SPDX-License-Identifier: Apache-2.0
"""Checks the private Cython modules repeat before their C code indexes by an array's values
(the public fronts check them for users; a direct call of a private module must not read or
write past an array either)."""
from libc.stdint cimport int64_t


cdef inline Py_ssize_t first_outside(const int64_t[::1] values, int64_t low,
                                     int64_t high) noexcept nogil:
    """The index of the first value outside [low, high], or -1 when every value is inside
    (both bounds included: lengths go up to their axis, ids pass ``high = vocab - 1``)."""
    cdef Py_ssize_t i
    for i in range(values.shape[0]):
        if values[i] < low or values[i] > high:
            return i
    return -1
