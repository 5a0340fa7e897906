# Makes curand_kernel.h (the Philox generator of philox.cuh) available to magma_ext_ops.
#
# Some CUDA toolkits ship without the cuRAND headers (this machine's has none); the `nvidia`
# pip wheels that a CUDA build of torch depends on carry them, e.g.
# site-packages/nvidia/cu13/include (CUDA 13) or site-packages/nvidia/curand/include (CUDA 12).
# Searched, first hit wins:
#   1. MAGMA_EXT_CURAND_INCLUDE_DIR, when set (it must then hold curand_kernel.h);
#   2. the CUDA toolkit's include directories;
#   3. nvidia/*/include beside the torch package that find_package(Torch) found;
#   4. nvidia/*/include in the site-packages of Python3_EXECUTABLE (or the python3 found).
#
# A wheel's include directory also holds its own cuda_runtime.h, cuda_fp16.h, ...; nvcc
# searches -I directories before the toolkit's, so adding it would shadow the headers of the
# toolkit that nvcc belongs to.  Only the curand*.h files are therefore copied into the build
# tree and that directory is added.
#
# Defines magma_ext_add_curand_headers(target).

set(MAGMA_EXT_CURAND_INCLUDE_DIR "" CACHE PATH
    "Directory with curand_kernel.h, for CUDA toolkits that lack the cuRAND headers")

# Appends to out_var the nvidia/*/include directories under `site_dir` that hold curand_kernel.h.
function(_magma_ext_wheel_curand_dirs site_dir out_var)
  file(GLOB _headers "${site_dir}/nvidia/*/include/curand_kernel.h")
  set(_dirs "${${out_var}}")
  foreach(_header IN LISTS _headers)
    get_filename_component(_dir "${_header}" DIRECTORY)
    list(APPEND _dirs "${_dir}")
  endforeach()
  set(${out_var} "${_dirs}" PARENT_SCOPE)
endfunction()

# Sets out_var to the directory holding curand_kernel.h, or "" when the toolkit's has it.
function(_magma_ext_find_curand out_var)
  if(MAGMA_EXT_CURAND_INCLUDE_DIR)
    if(NOT EXISTS "${MAGMA_EXT_CURAND_INCLUDE_DIR}/curand_kernel.h")
      message(FATAL_ERROR "magma_ext: MAGMA_EXT_CURAND_INCLUDE_DIR=${MAGMA_EXT_CURAND_INCLUDE_DIR} "
                          "has no curand_kernel.h")
    endif()
    set(${out_var} "${MAGMA_EXT_CURAND_INCLUDE_DIR}" PARENT_SCOPE)
    return()
  endif()
  foreach(_dir IN LISTS CUDAToolkit_INCLUDE_DIRS CMAKE_CUDA_IMPLICIT_INCLUDE_DIRECTORIES)
    if(EXISTS "${_dir}/curand_kernel.h")
      set(${out_var} "" PARENT_SCOPE)
      return()
    endif()
  endforeach()

  set(_candidates "")
  if(MAGMA_EXT_TORCH_SITE_DIR)
    _magma_ext_wheel_curand_dirs("${MAGMA_EXT_TORCH_SITE_DIR}" _candidates)
  endif()
  if(NOT _candidates)
    find_package(Python3 COMPONENTS Interpreter QUIET)
    if(Python3_Interpreter_FOUND)
      execute_process(
        COMMAND "${Python3_EXECUTABLE}" -c
                "import site, sysconfig; print(';'.join([sysconfig.get_paths()['purelib']] + site.getsitepackages()))"
        OUTPUT_VARIABLE _site_dirs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
      foreach(_site_dir IN LISTS _site_dirs)
        _magma_ext_wheel_curand_dirs("${_site_dir}" _candidates)
      endforeach()
    endif()
  endif()
  if(NOT _candidates)
    message(FATAL_ERROR "magma_ext: curand_kernel.h is neither in the CUDA toolkit nor in the nvidia "
                        "pip packages beside torch; install nvidia-curand (or the toolkit's cuRAND "
                        "headers), or pass -DMAGMA_EXT_CURAND_INCLUDE_DIR=<dir with curand_kernel.h>")
  endif()
  list(GET _candidates 0 _found)
  set(${out_var} "${_found}" PARENT_SCOPE)
endfunction()

function(magma_ext_add_curand_headers target)
  _magma_ext_find_curand(_curand_dir)
  if(NOT _curand_dir)
    return()
  endif()
  message(STATUS "magma_ext: cuRAND headers from ${_curand_dir}")
  set(_staged "${CMAKE_CURRENT_BINARY_DIR}/curand_include")
  file(REMOVE_RECURSE "${_staged}")
  file(GLOB _headers "${_curand_dir}/curand*.h")
  file(COPY ${_headers} DESTINATION "${_staged}")
  target_include_directories(${target} PRIVATE "${_staged}")
endfunction()
