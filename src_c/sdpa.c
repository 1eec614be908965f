/* SPDX-License-Identifier: Apache-2.0 -- fused SDPA, see sdpa.h */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "sdpa.h"
#include "real_ops.h"

#define REAL float
#define SUF f32
#define GEMM_FN ac_sgemm_fn
#include "sdpa_impl.h"
#undef REAL
#undef SUF
#undef GEMM_FN

#define REAL double
#define SUF f64
#define GEMM_FN ac_dgemm_fn
#include "sdpa_impl.h"
#undef REAL
#undef SUF
#undef GEMM_FN
