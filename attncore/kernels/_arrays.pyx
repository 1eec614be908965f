# SPDX-License-Identifier: Apache-2.0
"""The common case of ``_validation.check_float_array`` in C: an array a kernel can read as it
is. The Python checks (type, dtype, byte order, flags, ndim) cost about 0.5 us an argument
through attribute lookups -- an attention call checks three, an additive one eight -- and
these NumPy C-API reads 0.03 us. Anything else (a conversion, a copy, an error message)
stays with the Python function."""
cimport numpy as cnp
from libc.limits cimport INT_MAX
from libc.stdint cimport int64_t

from ._checks cimport first_outside_of
from ._ndarray cimport is_float, is_int64, readable_as_is

cnp.import_array()


def plain_float_array(x, ndim, min_ndim, dtype):
    """True when ``x`` is an ndarray (not a subclass) of native float32 or float64, aligned and
    C-contiguous, with ``ndim`` dimensions (None: any) and at least ``min_ndim`` (None: any),
    of ``dtype`` when one is given: ``check_float_array`` would return it unchanged. False
    does not mean the array is refused, only that the Python checks must look at it."""
    if type(x) is not cnp.ndarray:
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>x
    if not (is_float(arr) and readable_as_is(arr)):
        return False
    if ndim is not None and cnp.PyArray_NDIM(arr) != <int>ndim:
        return False
    if min_ndim is not None and cnp.PyArray_NDIM(arr) < <int>min_ndim:
        return False
    if dtype is not None:
        # (a dtype instance of a builtin type is a singleton: ``q.dtype`` passed for k and v
        # is the same object; anything else, a type such as np.float32 included, goes the
        # Python way)
        if <object>cnp.PyArray_DESCR(arr) is not dtype:
            return False
    return True


cdef inline bint _plain_4d(object x):
    """``plain_float_array(x, 4, None, None)``."""
    if type(x) is not cnp.ndarray:
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>x
    return is_float(arr) and readable_as_is(arr) and cnp.PyArray_NDIM(arr) == 4


def plain_qkv(q, k, v):
    """True when ``attention``'s q, k and v are arrays its checks would return unchanged:
    plain float arrays (``plain_float_array``) of one dtype, 4-D, k and v of one shape with
    q's batch and head_dim, head_dim > 0, q's heads a multiple of k's (> 0), and q_len,
    kv_len and head_dim within BLAS's int range. False leaves every check, and its message,
    to the Python function (``attention._check_qkv``: 1.2 us a call, a fifth of a small
    decoding call)."""
    if not (_plain_4d(q) and _plain_4d(k) and _plain_4d(v)):
        return False
    cdef cnp.ndarray qa = <cnp.ndarray>q, ka = <cnp.ndarray>k, va = <cnp.ndarray>v
    cdef int type_num = cnp.PyArray_TYPE(qa)
    if cnp.PyArray_TYPE(ka) != type_num or cnp.PyArray_TYPE(va) != type_num:
        return False
    cdef cnp.npy_intp *qs = cnp.PyArray_DIMS(qa)
    cdef cnp.npy_intp *ks = cnp.PyArray_DIMS(ka)
    cdef cnp.npy_intp *vs = cnp.PyArray_DIMS(va)
    cdef int axis
    for axis in range(4):
        if ks[axis] != vs[axis]:
            return False
    return (ks[0] == qs[0] and ks[3] == qs[3] and qs[3] > 0 and ks[1] > 0
            and qs[1] % ks[1] == 0 and qs[2] <= INT_MAX and qs[3] <= INT_MAX
            and ks[2] <= INT_MAX)


def int64_first_outside(x, int64_t low, int64_t high):
    """The flat index of the first value of ``x`` outside [low, high], -1 when there is none,
    or None when ``x`` is not an aligned, C-contiguous, native int64 ndarray (the caller then
    asks NumPy). One pass in C: ``x.min()`` and ``x.max()`` on a few token ids or lengths cost
    2 us each."""
    if type(x) is not cnp.ndarray:
        return None
    cdef cnp.ndarray arr = <cnp.ndarray>x
    if not (is_int64(arr) and readable_as_is(arr)):
        return None
    return first_outside_of(<const int64_t *>cnp.PyArray_DATA(arr), cnp.PyArray_SIZE(arr),
                            low, high)
