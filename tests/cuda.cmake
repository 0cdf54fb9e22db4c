# GPU suites (label cuda). Included by tests/CMakeLists.txt when the dma_cuda target exists.
# The binary exits 77 when no CUDA device is usable, which ctest reports as skipped.
#   test_cuda.cpp             the pipeline against the float64 reference, errors, out of memory
#   test_cuda_device_api.cpp  the device-pointer API: no allocation, graph capture, = the wrapper
#   test_cuda_rule.cu         the mask rule and the bf16/fp16 rounding: device = host
#   test_cuda_decode.cpp      the decode step: the same cache and o, lse as the CPU step
#   test_cuda_tables.cpp      the candidate tables = core's, bitwise; the backward deterministic
#   test_cuda_dynamic_weights.cpp  the dynamic-weights phases: bitwise reproducible, = core's float64
#   test_cuda_large.cpp       q, o, dq beyond 2^31 elements: replicated heads equal, a prefix = float64
add_executable(test_cuda test_main.cpp test_cuda.cpp test_cuda_device_api.cpp test_cuda_rule.cu
                         test_cuda_decode.cpp test_cuda_tables.cpp test_cuda_dynamic_weights.cpp
                         test_cuda_large.cpp)
target_compile_definitions(test_cuda PRIVATE DMA_TEST_NEEDS_CUDA=1)
if(TARGET dma_cuda_sm90)  # the library has the wgmma kernels (cuda/CMakeLists.txt)
  target_compile_definitions(test_cuda PRIVATE DMA_TEST_HAVE_SM90=1)
endif()
target_compile_options(test_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra>)
target_link_libraries(test_cuda PRIVATE dma_cuda dma_core doctest::doctest CUDA::cudart_static)
add_test(NAME cuda_tests COMMAND test_cuda)
set_tests_properties(cuda_tests PROPERTIES LABELS cuda SKIP_RETURN_CODE 77)
