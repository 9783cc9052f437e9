// The Python module of normfree's native CPU kernels (built by normfree.nn.native).
// One translation unit, and only the headers it needs (ATen's tensor, dispatch and two factory
// ops in the kernels; torch/python.h for the bindings): about 25 s to build, where
// torch/extension.h, which brings the whole C++ frontend, takes about 40 s.
#include <torch/python.h>

#include "scaled_ws.h"
#include "scaled_ws_update.h"
#include "tanh_gelu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scaled_ws_forward", &scaled_ws_forward, "Scaled WS forward over weight rows",
        pybind11::arg("w"), pybind11::arg("gain"), pybind11::arg("eps"), pybind11::arg("gamma"),
        pybind11::arg("bf16_out") = false);
  m.def("scaled_ws_backward", &scaled_ws_backward, "Scaled WS backward over weight rows");
  m.def("scaled_ws_backward_sgd", &scaled_ws_backward_sgd,
        "Scaled WS backward with AGC and an SGD step applied to the weight rows");
  m.def("scaled_ws_backward_adam", &scaled_ws_backward_adam,
        "Scaled WS backward with AGC and an Adam/AdamW step applied to the weight rows");
  m.def("tanh_gelu_forward", &tanh_gelu_forward, "tanh-GELU forward, float32");
  m.def("tanh_gelu_backward", &tanh_gelu_backward, "tanh-GELU backward, float32");
}
