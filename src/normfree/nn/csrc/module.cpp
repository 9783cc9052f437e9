// The Python module of normfree's native CPU kernels (built by normfree.nn.native).
// One translation unit for every kernel: the build compiles torch/extension.h once (~30 s).
#include <torch/extension.h>

#include "pooled_linear.h"
#include "scaled_ws.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scaled_ws_forward", &scaled_ws_forward, "Scaled WS forward over weight rows");
  m.def("scaled_ws_backward", &scaled_ws_backward, "Scaled WS backward over weight rows");
  m.def("pooled_linear_forward", &pooled_linear_forward,
        "Small-batch linear map with the weight's per-unit statistics");
  m.def("pooled_linear_backward", &pooled_linear_backward,
        "Its backward with the weight gradient's per-unit norms");
}
