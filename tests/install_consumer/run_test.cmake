# Installs meshtrain from a build tree into a fresh prefix, then configures, builds and runs
# tests/install_consumer against that prefix only.
#
#   cmake -DBUILD_DIR=... -DWORK_DIR=... -DCONSUMER_DIR=... -DGENERATOR=... -P run_test.cmake
foreach(var BUILD_DIR WORK_DIR CONSUMER_DIR GENERATOR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_test.cmake: -D${var}=... is required")
  endif()
endforeach()

function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "install test: ${what} failed (${rc}):\n${out}\n${err}")
  endif()
  set(last_output "${out}" PARENT_SCOPE)
endfunction()

set(prefix ${WORK_DIR}/prefix)
file(REMOVE_RECURSE ${WORK_DIR})
run("cmake --install" ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})

# What the package must hold: headers in the source layout plus the generated config.hpp,
# the libraries, the CLI, and the package files.
file(GLOB libs ${prefix}/lib*/libmeshtrain_*.a)
file(GLOB config ${prefix}/lib*/cmake/meshtrain/meshtrainConfig.cmake)
file(GLOB version ${prefix}/lib*/cmake/meshtrain/meshtrainConfigVersion.cmake)
foreach(f include/meshtrain/runtime/tensor.hpp include/meshtrain/runtime/config.hpp
          include/meshtrain/models/gpt.hpp include/meshtrain/launch/trainer.hpp bin/meshtrain)
  if(NOT EXISTS ${prefix}/${f})
    message(FATAL_ERROR "install test: ${prefix}/${f} was not installed")
  endif()
endforeach()
list(LENGTH libs n_libs)
if(n_libs LESS 3 OR NOT config OR NOT version)
  message(FATAL_ERROR "install test: expected libmeshtrain_{runtime,models,launch}.a and the "
                      "package files under ${prefix}/lib*, found: ${libs} ${config} ${version}")
endif()
file(GLOB_RECURSE cuda_headers ${prefix}/include/meshtrain/*/cuda/*)
if(cuda_headers)
  message(FATAL_ERROR "install test: CUDA headers were installed: ${cuda_headers}")
endif()

run("the installed meshtrain --version" ${prefix}/bin/meshtrain --version)
if(NOT last_output MATCHES "^meshtrain [0-9]+\\.[0-9]+\\.[0-9]+")
  message(FATAL_ERROR "install test: bin/meshtrain --version printed '${last_output}'")
endif()

run("configuring the consumer" ${CMAKE_COMMAND} -S ${CONSUMER_DIR} -B ${WORK_DIR}/build
    -G ${GENERATOR} -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=${prefix}
    -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON)
# The package must come from the fresh prefix, not from a build tree or the system.
if(NOT last_output MATCHES "meshtrain [0-9.]+ from ${prefix}/")
  message(FATAL_ERROR
          "install test: the consumer did not find meshtrain in ${prefix}:\n${last_output}")
endif()
run("building the consumer" ${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run("running the consumer" ${WORK_DIR}/build/consumer ${WORK_DIR}/run)
message("${last_output}")
if(NOT last_output MATCHES "trained 2 steps")
  message(FATAL_ERROR "install test: unexpected consumer output")
endif()
file(REMOVE_RECURSE ${WORK_DIR})
