# bench/mqar's tests (test_mqar.py, pytest, CPU only, well under a minute) as one ctest entry,
# mqar_tests (labels python and cpu). Included from bench/CMakeLists.txt. python/run_tests.py
# builds the dma_torch extension into <build>/python-pkg, the folder python_tests
# (python/ctest.cmake) builds into, incrementally, with the python3 in /usr/bin first (Debian's,
# which has python3-torch);
# DEPENDS runs it after python_tests when both are selected, so the two never build the same
# folder at once. Exit 77 (skipped) without torch, numpy or pytest.
if(DMA_SANITIZE OR DMA_FUZZ)
  return()
endif()
find_program(DMA_MQAR_PYTHON3 python3 PATHS /usr/bin NO_DEFAULT_PATH)
find_program(DMA_MQAR_PYTHON3 python3)
if(DMA_MQAR_PYTHON3)
  add_test(NAME mqar_tests
           COMMAND ${DMA_MQAR_PYTHON3} ${PROJECT_SOURCE_DIR}/python/run_tests.py
                   --build-dir ${CMAKE_BINARY_DIR}/python-pkg
                   --tests ${CMAKE_CURRENT_LIST_DIR}/test_mqar.py)
  set_tests_properties(mqar_tests PROPERTIES
                       LABELS "python;cpu" SKIP_RETURN_CODE 77 TIMEOUT 1800 DEPENDS python_tests
                       ENVIRONMENT "MAX_JOBS=2;CUDA_VISIBLE_DEVICES=")
endif()
