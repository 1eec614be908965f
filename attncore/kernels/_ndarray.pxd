# SPDX-License-Identifier: Apache-2.0
"""NumPy C-API helpers of the private wrappers that take and return whole arrays.

A wrapper over typed memoryviews of fused type costs ~1 us a call in Cython's dispatch and
buffer acquisition, as much as the C work of a small call. These read an ndarray's type and
flags, make its result and hand the C code raw pointers instead. A module cimporting this
calls ``numpy.import_array()`` (Cython 3 does so for a module that cimports numpy)."""
cimport numpy as cnp


cdef inline bint readable_as_is(cnp.ndarray x):
    """C-contiguous, aligned, native byte order: a pointer the C code can read."""
    return (cnp.PyArray_IS_C_CONTIGUOUS(x) and cnp.PyArray_ISALIGNED(x)
            and cnp.PyArray_ISNOTSWAPPED(x))


cdef inline bint is_float(cnp.ndarray x):
    """float32 or float64, the dtypes the kernels compute in."""
    cdef int type_num = cnp.PyArray_TYPE(x)
    return type_num == cnp.NPY_FLOAT32 or type_num == cnp.NPY_FLOAT64


cdef inline int float_type(object x, str name) except -1:
    """``cnp.NPY_FLOAT32`` or ``cnp.NPY_FLOAT64`` for an ndarray of that dtype the C code can
    read as it is (C-contiguous, aligned, native byte order); ValueError otherwise. The
    public fronts convert what they accept into such arrays; this guards a direct call."""
    if not isinstance(x, cnp.ndarray):
        raise ValueError(f"{name} must be an ndarray, got {type(x).__name__}")
    if not (is_float(<cnp.ndarray>x) and readable_as_is(<cnp.ndarray>x)):
        raise ValueError(f"{name} must be a C-contiguous, aligned float32 or float64 array "
                         f"in native byte order")
    return cnp.PyArray_TYPE(<cnp.ndarray>x)


cdef inline Py_ssize_t last_axis_length(cnp.ndarray x, str name) except -1:
    """The length of x's last axis (the rows' length of a row-wise kernel); ValueError for a
    0-d array."""
    if cnp.PyArray_NDIM(x) == 0:
        raise ValueError(f"{name} must have at least one dimension")
    return cnp.PyArray_DIMS(x)[cnp.PyArray_NDIM(x) - 1]


cdef inline cnp.ndarray empty_like(cnp.ndarray x):
    """A new C-contiguous array of x's shape and dtype (never a subclass)."""
    return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), cnp.PyArray_TYPE(x), 0)


cdef inline bint is_int64(cnp.ndarray x):
    """A signed 64-bit integer dtype: NPY_INT64 (long on LP64 platforms) or an equivalent
    NPY_LONGLONG (``np.longlong`` ids), which ``int64_t`` reads alike."""
    return cnp.PyArray_ISSIGNED(x) and cnp.PyArray_ITEMSIZE(x) == 8


cdef inline cnp.ndarray int64_array(object x, str name):
    """x as an ndarray of native int64 the C code can read as it is; ValueError otherwise."""
    if not (isinstance(x, cnp.ndarray) and is_int64(<cnp.ndarray>x)
            and readable_as_is(<cnp.ndarray>x)):
        raise ValueError(f"{name} must be a C-contiguous, aligned int64 array in native byte "
                         f"order")
    return <cnp.ndarray>x
