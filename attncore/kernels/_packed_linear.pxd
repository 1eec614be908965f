# SPDX-License-Identifier: Apache-2.0
"""Declarations of src_c/packed_linear.h (and the BLAS pointer type of attncore.h it takes), for
the Cython modules that run products on packed weights: _blas, _recurrent, _transformer, _ran;
and the checked weight table entries of the compiled model steps (_transformer, _ran)."""
from libc.stdint cimport int8_t, int32_t, uint16_t
from libc.string cimport memcpy
from scipy.linalg.cython_blas cimport sgemm

cdef extern from "attncore.h" nogil:
    int AC_MAX_THREADS      # the most threads a parallel region runs (threads.MAX_THREADS)


cdef extern from "packed_linear.h" nogil:
    ctypedef void (*ac_sgemm_fn)(char *, char *, int *, int *, int *, float *, float *, int *,
                                 float *, int *, float *, float *, int *)
    Py_ssize_t AC_PANEL_WIDTH
    int AC_PANELS_F32, AC_PANELS_BF16, AC_PANELS_I8
    Py_ssize_t AC_I8_MAX_K
    Py_ssize_t ac_i8_panel_rows(Py_ssize_t K)
    int ac_int8_vnni()
    int ac_int8_amx()
    void ac_pack_panels_i8(const float *w, Py_ssize_t N, Py_ssize_t K, int8_t *panels)
    void ac_round_bf16_f32(const float *x, float *y, Py_ssize_t n)
    void ac_pack_panels_f32(const float *w, Py_ssize_t N, Py_ssize_t K, float *panels)
    void ac_pack_panels_bf16(const float *w, Py_ssize_t N, Py_ssize_t K, uint16_t *panels)
    Py_ssize_t ac_packed_panel_max_rows()
    void ac_packed_linear_rows(const float *x, Py_ssize_t ldx, Py_ssize_t M, Py_ssize_t K,
                               const void *panels, int panel_type, Py_ssize_t N,
                               const float *bias, float *out, Py_ssize_t ldo, ac_sgemm_fn sgemm,
                               Py_ssize_t small_gemm_macs, int num_threads)


cdef inline tuple panels_shape(Py_ssize_t n_out, Py_ssize_t n_in, object panels):
    """The shape ``panels`` (of its dtype) must have to hold an (n_out, n_in) weight."""
    rows = ac_i8_panel_rows(n_in) if panels.dtype.char == "b" else n_in
    return ((n_out + AC_PANEL_WIDTH - 1) // AC_PANEL_WIDTH, rows, AC_PANEL_WIDTH)


cdef inline bint panels_fit(object panels, Py_ssize_t n_out, Py_ssize_t n_in) except -1:
    """Whether ``panels`` hold an (n_out, n_in) weight: their shape, and for int8 panels (whose
    in features are padded to 64) the in features stored in them."""
    cdef const float[:, :, ::1] f32
    cdef const uint16_t[:, :, ::1] bf16
    cdef const int8_t[:, :, ::1] i8
    cdef int32_t stored
    cdef tuple held
    if n_out < 0 or n_in < 0:
        return False
    # the buffer's own shape, as panels_data will read it (an array subclass's .shape could
    # claim more than the buffer holds)
    if panels.dtype.char == "b":
        i8 = panels
        held = (i8.shape[0], i8.shape[1], i8.shape[2])
    elif panels.dtype.char == "H":
        bf16 = panels
        held = (bf16.shape[0], bf16.shape[1], bf16.shape[2])
    else:
        f32 = panels
        held = (f32.shape[0], f32.shape[1], f32.shape[2])
    if held != panels_shape(n_out, n_in, panels):
        return False
    if panels.dtype.char == "b":
        if n_in > AC_I8_MAX_K:
            return False
        if i8.shape[0] == 0:   # (no output feature: nothing stored, nothing read)
            return True
        memcpy(&stored, &i8[0, i8.shape[1] - 1, 0], 4)
        return stored == n_in
    return True


cdef inline const void *panels_data(object panels, int *panel_type) except NULL:
    """The data of ``PackedLinearWeight.panels`` (a C-contiguous 3-d float32 array, uint16
    holding bfloat16, or int8 panels) and, in panel_type, how it is stored (AC_PANELS_F32 /
    AC_PANELS_BF16 / AC_PANELS_I8). The caller keeps ``panels`` alive while it uses the
    pointer, and has checked its shape (:func:`panels_shape`)."""
    cdef const float[:, :, ::1] f32
    cdef const uint16_t[:, :, ::1] bf16
    cdef const int8_t[:, :, ::1] i8
    if panels.dtype.char == "b":
        i8 = panels
        panel_type[0] = AC_PANELS_I8
        return &i8[0, 0, 0]
    if panels.dtype.char == "H":
        bf16 = panels
        panel_type[0] = AC_PANELS_BF16
        return &bf16[0, 0, 0]
    f32 = panels
    panel_type[0] = AC_PANELS_F32
    return &f32[0, 0, 0]


cdef struct Linear:         # one product of a compiled model step, on a PackedLinearWeight
    const void *panels      # (ceil(n_out / 64), n_in, 64), see src_c/packed_linear.h
    int panel_type          # float32, bfloat16 or int8 panels
    const float *bias       # (n_out,) or NULL
    Py_ssize_t n_out, n_in


cdef inline void linear_rows(const float *x, Py_ssize_t rows, Linear w, float *out,
                             Py_ssize_t small_gemm_macs, int num_threads) noexcept nogil:
    """out (rows, n_out) = x (rows, n_in) . W^T + bias on the packed panels (BLAS past the
    panel kernel's rows)."""
    ac_packed_linear_rows(x, w.n_in, rows, w.n_in, w.panels, w.panel_type, w.n_out, w.bias, out,
                          w.n_out, sgemm, small_gemm_macs, num_threads)


cdef inline object float32_array(object a, tuple shape, str owner, str name, list keep):
    """a as given if it is a C-contiguous float32 array of ``shape`` (kept alive in keep), else
    ValueError "``owner``: ``name`` must be ..."."""
    import numpy as np
    a = np.asarray(a)
    if a.dtype != np.float32 or not a.flags.c_contiguous or a.shape != shape:
        raise ValueError(f"{owner}: {name} must be a C-contiguous float32 array of shape "
                         f"{shape}, got {a.dtype} {a.shape}")
    keep.append(a)
    return a


cdef inline object float32_table(object a, Py_ssize_t width, str owner, str name, list keep):
    """a as given if it is a C-contiguous float32 (rows, width) array (an embedding or position
    table: any number of rows), else ValueError (checked before its shape is read: these
    modules index without bounds checks)."""
    import numpy as np
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{owner}: {name} must be a 2-d float32 array, got {a.ndim} dimensions")
    return float32_array(a, (a.shape[0], width), owner, name, keep)


cdef inline tuple two_parts(object pair, str owner, str name):
    """``pair`` as a 2-tuple, else ValueError naming it (indexing a shorter tuple read past
    its end: these modules index without bounds checks)."""
    try:
        first, second = pair
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be a pair, got {type(pair).__name__}") from None
    return first, second


cdef inline Linear packed_linear(object pair, Py_ssize_t n_out, Py_ssize_t n_in, str owner,
                                 str name, list keep) except *:
    """The Linear of a (PackedLinearWeight, bias or None) pair, checked against (n_out, n_in);
    the panels and the bias are kept alive in keep."""
    cdef Linear w
    cdef const float[::1] bias
    packed, bias_array = two_parts(pair, owner, name)
    if tuple(packed.shape) != (n_out, n_in):
        raise ValueError(f"{owner}: {name} must have shape {(n_out, n_in)}, got "
                         f"{tuple(packed.shape)}")
    panels = packed.panels  # PackedLinearWeight made them C-contiguous, of this shape
    if not panels_fit(panels, n_out, n_in):
        raise ValueError(f"{owner}: {name} panels have shape {panels.shape}")
    keep.append(panels)
    w.panels = panels_data(panels, &w.panel_type)
    w.bias, w.n_out, w.n_in = NULL, n_out, n_in
    if bias_array is not None:
        bias = float32_array(bias_array, (n_out,), owner, name + " bias", keep)
        w.bias = &bias[0]
    return w
