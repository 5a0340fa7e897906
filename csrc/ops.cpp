// The schemas of magma_ext's ops and their CUDA implementations; nothing else.
//
// Importing the module magma_ext._C runs these static registrations; the ops are then
// torch.ops.magma_ext.*.  There is no pybind11 module: PyInit__C only creates an empty one.
// The CMake build (a plain shared library for torch.ops.load_library) defines
// MAGMA_EXT_NO_PYTHON and has no module init.
//
// The three ops share their leading arguments; fused_step.cpp states what each op does and
// the contract of block_sums.  The alias annotations say exactly what each op writes:
//   fused_step        params, exp_avgs, exp_avg_sqs, scores, master_params
//   moments_partials  the same and block_sums
//   finalize_apply    params, scores, master_params
#ifndef MAGMA_EXT_NO_PYTHON
#include <Python.h>
#endif
#include <torch/library.h>

#include "fused_step.h"

#ifndef MAGMA_EXT_NO_PYTHON
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif

// The arguments after the state lists, the same in every op.
#define MAGMA_EXT_SCHEMA_TAIL                                                                   \
  "Tensor[] steps, int[] tensor_indices, int[] block_sizes, int[] offsets, "                    \
  "int[] logical_numels, float lr, Tensor? lr_tensor, float beta1, float beta2, float eps, "    \
  "float weight_decay, str base, str mask, float keep_prob, float tau, float score_ema, "       \
  "int seed, Tensor? grad_scale, Tensor? found_inf"

TORCH_LIBRARY(magma_ext, m) {
  m.def(
      "fused_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] scores, Tensor(e!)[] master_params, "
      MAGMA_EXT_SCHEMA_TAIL ") -> ()");
  m.def(
      "moments_partials(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] scores, Tensor(e!)[] master_params, "
      MAGMA_EXT_SCHEMA_TAIL ", Tensor(f!) block_sums) -> ()");
  m.def(
      "finalize_apply(Tensor(a!)[] params, Tensor[] grads, Tensor[] exp_avgs, "
      "Tensor[] exp_avg_sqs, Tensor(d!)[] scores, Tensor(e!)[] master_params, "
      MAGMA_EXT_SCHEMA_TAIL ", Tensor block_sums) -> ()");
}

TORCH_LIBRARY_IMPL(magma_ext, CUDA, m) {
  m.impl("fused_step", &magma::fused_step);
  m.impl("moments_partials", &magma::moments_partials);
  m.impl("finalize_apply", &magma::finalize_apply);
}
