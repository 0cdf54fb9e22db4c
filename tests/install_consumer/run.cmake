# The install test (ctest install_consumer, registered in tests/CMakeLists.txt):
#   1. cmake --install BUILD_DIR into WORK_DIR/prefix;
#   2. no path of the build machine's source or build tree in the installed CMake files;
#   3. configures and builds this folder's consumer against the prefix (find_package(dma)) and
#      runs it: it must print PASS.
#
#   cmake -DBUILD_DIR=<dma build> -DWORK_DIR=<scratch> -DSOURCE_DIR=<dma source> [-DCONFIG=Release]
#         [-DGENERATOR=...] [-DMAKE_PROGRAM=...] [-DCXX_COMPILER=...] [-DCXX_FLAGS=...]
#         [-DLINKER_FLAGS=...] [-DREQUIRE_CUDA=ON] [-DCUDA_ROOT=...] -P run.cmake
foreach(var BUILD_DIR WORK_DIR SOURCE_DIR)
  if(NOT ${var})
    message(FATAL_ERROR "run.cmake: -D${var}=... is required")
  endif()
endforeach()
if(NOT DEFINED REQUIRE_CUDA)
  set(REQUIRE_CUDA OFF)
endif()

function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "install test: ${what} failed (${rc}):\n${out}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

set(prefix ${WORK_DIR}/prefix)
set(consumer ${WORK_DIR}/consumer)
file(REMOVE_RECURSE ${WORK_DIR})

set(config_args)
if(CONFIG)
  set(config_args --config ${CONFIG})
endif()
run_step("cmake --install" ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix} ${config_args})

# The package must be relocatable: nothing in it may point back into this machine's trees.
file(GLOB_RECURSE cmake_files ${prefix}/*.cmake)
if(NOT cmake_files)
  message(FATAL_ERROR "install test: no CMake package files under ${prefix}")
endif()
file(REAL_PATH ${SOURCE_DIR} source_real)
file(REAL_PATH ${BUILD_DIR} build_real)
foreach(f ${cmake_files})
  file(READ ${f} text)
  foreach(path ${SOURCE_DIR} ${source_real} ${BUILD_DIR} ${build_real} ${prefix})
    string(FIND "${text}" "${path}" at)
    if(NOT at EQUAL -1)
      message(FATAL_ERROR "install test: ${f} contains the build machine's path ${path}")
    endif()
  endforeach()
endforeach()

set(configure_args -S ${CMAKE_CURRENT_LIST_DIR} -B ${consumer} -DCMAKE_PREFIX_PATH=${prefix}
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF -DCONSUMER_REQUIRE_CUDA=${REQUIRE_CUDA})
if(GENERATOR)
  list(APPEND configure_args -G ${GENERATOR})
endif()
foreach(pair "MAKE_PROGRAM;CMAKE_MAKE_PROGRAM" "CXX_COMPILER;CMAKE_CXX_COMPILER"
             "CXX_FLAGS;CMAKE_CXX_FLAGS" "LINKER_FLAGS;CMAKE_EXE_LINKER_FLAGS"
             "CONFIG;CMAKE_BUILD_TYPE" "CUDA_ROOT;CUDAToolkit_ROOT")
  list(GET pair 0 from)
  list(GET pair 1 to)
  if(${from})
    list(APPEND configure_args "-D${to}=${${from}}")
  endif()
endforeach()
run_step("configuring the consumer" ${CMAKE_COMMAND} ${configure_args})
message(STATUS "${step_output}")

# It must have used the package just installed, not one found elsewhere.
file(STRINGS ${consumer}/CMakeCache.txt dma_dir REGEX "^dma_DIR:")
string(REGEX REPLACE "^[^=]*=" "" dma_dir "${dma_dir}")
file(REAL_PATH "${dma_dir}" dma_dir)
file(REAL_PATH ${prefix} prefix_real)
string(FIND "${dma_dir}" "${prefix_real}/" at)
if(NOT at EQUAL 0)
  message(FATAL_ERROR "install test: the consumer found dma in ${dma_dir}, not under ${prefix}")
endif()

run_step("building the consumer" ${CMAKE_COMMAND} --build ${consumer} ${config_args})
set(exe ${consumer}/consumer)
if(CONFIG AND EXISTS ${consumer}/${CONFIG}/consumer)  # multi-config generators
  set(exe ${consumer}/${CONFIG}/consumer)
endif()
run_step("running the consumer" ${exe})
message(STATUS "${step_output}")
if(NOT step_output MATCHES "PASS")
  message(FATAL_ERROR "install test: the consumer did not print PASS")
endif()
