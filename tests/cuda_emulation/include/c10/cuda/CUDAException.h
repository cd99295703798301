// C10_CUDA_CHECK of the emulation (see ../../emu.h).
#pragma once

#include <c10/util/Exception.h>

#include "emu.h"

#define C10_CUDA_CHECK(EXPR)                                           \
  do {                                                                 \
    const cudaError_t fastcl_emu_err = (EXPR);                         \
    TORCH_CHECK(fastcl_emu_err == cudaSuccess, "CUDA error: ",         \
                cudaGetErrorString(fastcl_emu_err));                   \
  } while (0)
