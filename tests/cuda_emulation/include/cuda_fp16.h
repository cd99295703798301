// float16 of the emulation (see emu.h): c10's, which rounds to nearest even like
// __float2half_rn.
#pragma once

#include <c10/util/Half.h>

#include "emu.h"

using __half = c10::Half;

inline __half __float2half_rn(float x) { return c10::Half(x); }
inline float __half2float(__half x) { return static_cast<float>(x); }
