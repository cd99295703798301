// The CUDA runtime of the emulation (see emu.h).
#pragma once

#include "emu.h"
