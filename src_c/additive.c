/* SPDX-License-Identifier: Apache-2.0 -- additive attention and Nadaraya-Watson, see additive.h */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "additive.h"
#include "real_ops.h"

#define REAL float
#define SUF f32
#include "additive_impl.h"
#undef REAL
#undef SUF
#define REAL double
#define SUF f64
#include "additive_impl.h"
