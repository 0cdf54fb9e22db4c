# The Python package's tests (python/tests, pytest) as one ctest entry, python_tests (labels python
# and cpu). Included from tests/CMakeLists.txt:
#   include(${PROJECT_SOURCE_DIR}/python/ctest.cmake OPTIONAL)
# The test builds the extension into <build>/python-pkg (setup.py build, incremental) with the
# python3 in /usr/bin first (Debian's, which has python3-torch; a python3 earlier on PATH may lack
# it), then runs pytest on python/tests with that build on PYTHONPATH. It reports skipped (exit 77)
# when that python3 cannot import torch or pytest. CUDA tests inside it skip without a GPU.
# Not in the sanitizer and fuzzing builds: the extension is built by setup.py with torch's flags,
# never with theirs, so it would only run the same tests again.
if(DMA_SANITIZE OR DMA_FUZZ)
  return()
endif()
find_program(DMA_TORCH_PYTHON3 python3 PATHS /usr/bin NO_DEFAULT_PATH)
find_program(DMA_TORCH_PYTHON3 python3)
if(DMA_TORCH_PYTHON3)
  add_test(NAME python_tests
           COMMAND ${DMA_TORCH_PYTHON3} ${CMAKE_CURRENT_LIST_DIR}/run_tests.py
                   --build-dir ${CMAKE_BINARY_DIR}/python-pkg)
  set_tests_properties(python_tests PROPERTIES
                       LABELS "python;cpu" SKIP_RETURN_CODE 77 TIMEOUT 1800
                       ENVIRONMENT "MAX_JOBS=2")
endif()
