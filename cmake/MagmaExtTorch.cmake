# Finds a CUDA build of libtorch for magma_ext_ops, after enable_language(CUDA).
#
# torch's CMake config (Caffe2/public/cuda.cmake) needs three things fixed around it:
#
#  * It locates the toolkit with the old FindCUDA, which takes the parent of the first `nvcc`
#    on PATH.  Where that nvcc is a wrapper script (/usr/local/bin/nvcc -> exec the real one)
#    that gives /usr/local, which has no headers or libcudart.  We point it at the toolkit
#    that CMake's own compiler detection found (it asks nvcc itself).
#  * It ignores CMAKE_CUDA_ARCHITECTURES: when defined it warns and sets it OFF, and it adds
#    -gencode flags for TORCH_CUDA_ARCH_LIST (default: the visible GPUs) to CMAKE_CUDA_FLAGS.
#    We hide our setting while it runs, then restore it and drop the flags it added, so the
#    CUDA_ARCHITECTURES of the target alone decides.
#  * TORCH_LIBRARIES contains ${CUDA_NVRTC_LIB}, NOTFOUND where the toolkit lacks nvrtc (as
#    here: the toolkit has no nvrtc, cuBLAS, cuRAND...; torch loads them from the nvidia
#    wheels at run time).  We link the imported target `torch` instead, which needs only
#    CUDA::cudart; nothing here calls nvrtc.  CUDA::nvToolsExt is not needed either: this
#    torch uses the header-only NVTX3.
#
# Sets MAGMA_EXT_TORCH_SITE_DIR: the directory that holds the torch package (site-packages
# for a pip-installed torch), where the nvidia wheels' headers may also be.

if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR AND CMAKE_CUDA_COMPILER_TOOLKIT_ROOT)
  set(CUDA_TOOLKIT_ROOT_DIR "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}" CACHE PATH "CUDA toolkit used by torch's FindCUDA")
endif()

set(_magma_ext_cuda_architectures "${CMAKE_CUDA_ARCHITECTURES}")
set(_magma_ext_cuda_flags "${CMAKE_CUDA_FLAGS}")
unset(CMAKE_CUDA_ARCHITECTURES)
unset(CMAKE_CUDA_ARCHITECTURES CACHE)
# Only so that torch does not compile a GPU-detection program; the flags it derives are dropped.
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(TORCH_CUDA_ARCH_LIST "")
  foreach(_arch IN LISTS _magma_ext_cuda_architectures)
    if(_arch MATCHES "^([0-9]+)([0-9])")
      list(APPEND TORCH_CUDA_ARCH_LIST "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}")
    endif()
  endforeach()
  if(NOT TORCH_CUDA_ARCH_LIST)
    unset(TORCH_CUDA_ARCH_LIST)
  endif()
endif()

find_package(Torch REQUIRED)

set(CMAKE_CUDA_ARCHITECTURES "${_magma_ext_cuda_architectures}" CACHE STRING
    "CUDA architectures to compile magma_ext_ops for" FORCE)
set(CMAKE_CUDA_FLAGS "${_magma_ext_cuda_flags}")

if(NOT TARGET torch_cuda)
  message(FATAL_ERROR "magma_ext: the Torch found in ${TORCH_INSTALL_PREFIX} is not a CUDA build; "
                      "use a CUDA build of torch or configure with -DMAGMA_EXT_BUILD_CUDA=OFF")
endif()

get_filename_component(MAGMA_EXT_TORCH_SITE_DIR "${TORCH_INSTALL_PREFIX}" DIRECTORY)
