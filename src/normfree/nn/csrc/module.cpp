// The Python module of normfree's native CPU kernels (built by normfree.nn.native).
// One translation unit for every kernel, and only the headers it needs (ATen's tensor, dispatch
// and two factory ops in the kernels; torch/python.h for the bindings): about 25 s to build, where
// torch/extension.h, which brings the whole C++ frontend, takes about 40 s.
#include <torch/python.h>

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
