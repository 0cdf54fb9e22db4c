# GPU suites (label cuda). Included by tests/CMakeLists.txt when the dma_cuda target exists.
# The binaries exit 77 when no CUDA device is usable, which ctest reports as skipped.
add_executable(test_cuda test_cuda_main.cpp test_cuda.cpp)
target_link_libraries(test_cuda PRIVATE dma_cuda dma_core doctest::doctest CUDA::cudart_static)
add_test(NAME cuda_tests COMMAND test_cuda)
set_tests_properties(cuda_tests PROPERTIES LABELS cuda SKIP_RETURN_CODE 77)
