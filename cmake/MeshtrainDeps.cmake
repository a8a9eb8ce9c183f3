# Finds every dependency and fails with the Debian package to install when one is missing.

macro(meshtrain_require found what package)
  if(NOT ${found})
    message(FATAL_ERROR "meshtrain: ${what} not found. Install it with: apt-get install ${package}")
  endif()
endmacro()

find_package(Threads REQUIRED)

find_package(OpenMP QUIET)
meshtrain_require(OpenMP_CXX_FOUND "OpenMP for C++" "libgomp1 (comes with g++); with clang: libomp-dev")

# oneDNN's own CMake package can fail inside itself, where QUIET does not reach: Debian's (built
# with the OpenCL GPU runtime) runs find_package(OpenCL REQUIRED), and libdnnl-dev only recommends
# the OpenCL headers and loader. Look for what that config will ask for first, and name the
# package, instead of letting CMake stop inside dnnl-config.cmake with "Could NOT find OpenCL".
find_file(MESHTRAIN_DNNL_CONFIG NAMES dnnl-config.cmake dnnlConfig.cmake
  PATH_SUFFIXES lib/cmake/dnnl lib/x86_64-linux-gnu/cmake/dnnl lib64/cmake/dnnl
  HINTS ${dnnl_DIR})
if(MESHTRAIN_DNNL_CONFIG)
  file(READ "${MESHTRAIN_DNNL_CONFIG}" _dnnl_config)
  if(_dnnl_config MATCHES "find_package\\(OpenCL")
    find_package(OpenCL QUIET)
    meshtrain_require(OpenCL_FOUND
      "OpenCL (headers and loader), which oneDNN's CMake package (${MESHTRAIN_DNNL_CONFIG}) requires"
      "ocl-icd-opencl-dev")
  endif()
endif()
find_package(dnnl CONFIG QUIET)
meshtrain_require(dnnl_FOUND "oneDNN (CPU matmul)" "libdnnl-dev")

find_package(spdlog CONFIG QUIET)
meshtrain_require(spdlog_FOUND "spdlog" "libspdlog-dev")

find_package(nlohmann_json 3.10 CONFIG QUIET)
meshtrain_require(nlohmann_json_FOUND "nlohmann-json (JSON headers for tensor files and configs)" "nlohmann-json3-dev")

find_package(tomlplusplus CONFIG QUIET)
meshtrain_require(tomlplusplus_FOUND "toml++ (config files)" "libtomlplusplus-dev")

# The tokenizer (runtime/tokenizer*.cpp): PCRE2's 8-bit library for the pre-tokenizers' Unicode
# regular expressions, utf8proc for NFC. Plain find_path/find_library so that a prefix of
# unpacked Debian packages (CMAKE_PREFIX_PATH, the GPU machine's .deps) serves as well as /usr;
# where only the run-time library is installed (libpcre2-8-0 is in every image) its soname is
# linked directly.
find_path(MESHTRAIN_PCRE2_INCLUDE pcre2.h)
find_library(MESHTRAIN_PCRE2_LIB NAMES pcre2-8 libpcre2-8.so.0)
meshtrain_require(MESHTRAIN_PCRE2_INCLUDE "PCRE2's headers (pcre2.h, the tokenizer's regular expressions)" "libpcre2-dev")
meshtrain_require(MESHTRAIN_PCRE2_LIB "PCRE2's 8-bit library (the tokenizer's regular expressions)" "libpcre2-dev")
find_path(MESHTRAIN_UTF8PROC_INCLUDE utf8proc.h)
find_library(MESHTRAIN_UTF8PROC_LIB NAMES utf8proc libutf8proc.so.2)
meshtrain_require(MESHTRAIN_UTF8PROC_INCLUDE "utf8proc's header (utf8proc.h, the tokenizer's NFC normalizer)" "libutf8proc-dev")
meshtrain_require(MESHTRAIN_UTF8PROC_LIB "utf8proc (the tokenizer's NFC normalizer)" "libutf8proc-dev")

find_package(MPI QUIET COMPONENTS C)
meshtrain_require(MPI_C_FOUND "MPI (Open MPI)" "libopenmpi-dev openmpi-bin")

if(MESHTRAIN_TESTS)
  find_package(GTest CONFIG QUIET)
  meshtrain_require(GTest_FOUND "GoogleTest" "libgtest-dev")
  # The independent reference for op checks is Debian's PyTorch, run by Debian's python.
  find_program(MESHTRAIN_TORCH_PYTHON NAMES python3 PATHS /usr/bin NO_DEFAULT_PATH)
  if(MESHTRAIN_TORCH_PYTHON)
    execute_process(COMMAND ${MESHTRAIN_TORCH_PYTHON} -c "import torch"
                    RESULT_VARIABLE _torch_rc OUTPUT_QUIET ERROR_QUIET)
  endif()
  if(NOT MESHTRAIN_TORCH_PYTHON OR NOT _torch_rc EQUAL 0)
    # Name the interpreter that was tried: -DMESHTRAIN_TORCH_PYTHON=... replaces /usr/bin/python3
    # (scripts/gpu_check.sh passes the GPU machine's python3).
    if(MESHTRAIN_TORCH_PYTHON)
      set(_torch_py "${MESHTRAIN_TORCH_PYTHON}")
    else()
      set(_torch_py "/usr/bin/python3")
    endif()
    message(FATAL_ERROR "meshtrain: PyTorch reference checks need ${_torch_py} with torch "
                        "(import torch failed). Install it with: apt-get install python3-torch, "
                        "or pass -DMESHTRAIN_TORCH_PYTHON=<a python3 that has torch>")
  endif()
endif()

if(MESHTRAIN_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90)
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  meshtrain_require(CMAKE_CUDA_COMPILER "the CUDA compiler (nvcc)" "nvidia-cuda-toolkit (or the CUDA Toolkit, with nvcc on PATH)")
  enable_language(CUDA)
  # C++17 for .cu files: the CMake of Debian 12 knows no CUDA20 dialect for nvcc, and the
  # kernels need nothing newer.
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  # Debian 12's CMake 3.25.1 sets a deprecation property on CUDA::nvToolsExt without checking
  # that the target exists (fixed in 3.25.2), and CUDA 13 ships no libnvToolsExt (NVTX 3 is
  # header-only): find_package(CUDAToolkit) then fails with "set_property could not find TARGET
  # CUDA::nvToolsExt". meshtrain does not use it: an empty stand-in lets the module finish.
  if(CMAKE_VERSION VERSION_LESS 3.25.2 AND NOT TARGET CUDA::nvToolsExt)
    get_filename_component(_mt_nvcc_dir "${CMAKE_CUDA_COMPILER}" DIRECTORY)
    find_library(MESHTRAIN_NVTOOLSEXT NAMES nvToolsExt nvToolsExt64
                 HINTS "${_mt_nvcc_dir}/.." PATH_SUFFIXES lib64 lib NO_DEFAULT_PATH)
    if(NOT MESHTRAIN_NVTOOLSEXT)
      add_library(CUDA::nvToolsExt INTERFACE IMPORTED)
    endif()
  endif()
  find_package(CUDAToolkit REQUIRED)
  meshtrain_require(CUDAToolkit_FOUND "the CUDA Toolkit" "nvidia-cuda-toolkit")
  if(NOT TARGET CUDA::cublasLt)
    message(FATAL_ERROR "meshtrain: cuBLASLt not found. Install it with: apt-get install libcublas-dev (or the CUDA Toolkit)")
  endif()
  find_path(MESHTRAIN_NCCL_INCLUDE nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/include)
  find_library(MESHTRAIN_NCCL_LIB nccl HINTS ${CUDAToolkit_LIBRARY_DIR} /usr/lib/x86_64-linux-gnu)
  meshtrain_require(MESHTRAIN_NCCL_LIB "NCCL" "libnccl-dev")
  find_path(MESHTRAIN_CUDNN_INCLUDE cudnn.h HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/include)
  find_library(MESHTRAIN_CUDNN_LIB cudnn HINTS ${CUDAToolkit_LIBRARY_DIR} /usr/lib/x86_64-linux-gnu)
  meshtrain_require(MESHTRAIN_CUDNN_LIB "cuDNN 9" "libcudnn9-dev-cuda-13")
  # cudnn-frontend (header-only) ships in PyPI's nvidia-cudnn-frontend, whose wheel holds an
  # include/ folder; scripts/setup.sh cuda unpacks it into .deps/cudnn_frontend. Or point
  # -DMESHTRAIN_CUDNN_FRONTEND_INCLUDE (or the environment's CUDNN_FRONTEND_INCLUDE) at it.
  find_path(MESHTRAIN_CUDNN_FRONTEND_INCLUDE cudnn_frontend.h
    HINTS $ENV{CUDNN_FRONTEND_INCLUDE} ${PROJECT_SOURCE_DIR}/.deps/cudnn_frontend/include
          /usr/include /usr/local/include)
  if(NOT MESHTRAIN_CUDNN_FRONTEND_INCLUDE)
    message(FATAL_ERROR "meshtrain: cudnn-frontend headers (cudnn_frontend.h) not found. Run "
      "scripts/setup.sh cuda (it unpacks PyPI's nvidia-cudnn-frontend into .deps/), or pass "
      "-DMESHTRAIN_CUDNN_FRONTEND_INCLUDE=<dir with cudnn_frontend.h>")
  endif()
endif()
