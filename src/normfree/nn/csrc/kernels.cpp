// The kernels of normfree's native CPU extension: the one translation unit that compiles the
// kernel headers (their entry points are declared in ops.h and registered as operators in
// library.cpp, which builds beside this one).
#include "scaled_ws.h"
#include "scaled_ws_update.h"
#include "tanh_gelu.h"
