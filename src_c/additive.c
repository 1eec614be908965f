/* SPDX-License-Identifier: Apache-2.0 -- additive attention and Nadaraya-Watson, see additive.h */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "additive.h"
#include "real_ops.h"
#include "simd.h"

#define REAL float
#define SUF f32
#define AC_ADDITIVE_SPLIT 1 /* the split tanh (simd.h) is a float32 primitive */
#include "additive_impl.h"
#undef REAL
#undef SUF
#undef AC_ADDITIVE_SPLIT
#define REAL double
#define SUF f64
#define AC_ADDITIVE_SPLIT 0
#include "additive_impl.h"
