/* SPDX-License-Identifier: Apache-2.0 -- masked softmax, see softmax.h */
#include <math.h>
#include <string.h>
#include "softmax.h"
#include "real_ops.h"

#define REAL float
#define SUF f32
#include "softmax_impl.h"
#undef REAL
#undef SUF
#define REAL double
#define SUF f64
#include "softmax_impl.h"
