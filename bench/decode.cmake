# The decode benchmark: GPU decode step latency and memory per sequence against the context
# length (bench/README.md, "Decode"). Included from bench/CMakeLists.txt; needs the CUDA target.
if(TARGET dma_cuda)
  add_executable(decode_bench ${CMAKE_CURRENT_LIST_DIR}/decode_bench.cpp)
  target_link_libraries(decode_bench PRIVATE dma_cuda dma_core CLI11::CLI11 CUDA::cudart_static)
endif()
