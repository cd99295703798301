// bfloat16 of the emulation (see emu.h): c10's, which rounds to nearest even like
// __float2bfloat16_rn.
#pragma once

#include <c10/util/BFloat16.h>

#include "emu.h"

using __nv_bfloat16 = c10::BFloat16;

inline __nv_bfloat16 __float2bfloat16_rn(float x) { return c10::BFloat16(x); }
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }
