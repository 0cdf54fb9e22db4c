# Install rules and the CMake package (included at the end of the root CMakeLists.txt):
#
#   cmake --install <build> --prefix <prefix>
#
# puts the libraries in <prefix>/lib, the public headers in <prefix>/include/dma and the package
# in <prefix>/lib/cmake/dma, so that another project does
#
#   find_package(dma 0.1 REQUIRED)                       # or: COMPONENTS cuda
#   target_link_libraries(app PRIVATE dma::core)         # and dma::cuda if(TARGET dma::cuda)
#
# Two export sets: dmaCoreTargets (dma::core) and, in a CUDA build, dmaCudaTargets (dma::cuda),
# which dmaConfig.cmake loads only when the consumer finds the CUDA toolkit (dma::cuda links the
# CUDA runtime statically, so the consumer links CUDA::cudart_static).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(DMA_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/dma)

# Eigen is header-only and used inside dma_core's sources only, but a static library exports its
# PRIVATE dependencies as $<LINK_ONLY:...>, which would make every consumer find Eigen3. Keep that
# entry for the build tree only.
get_target_property(_dma_core_links dma_core INTERFACE_LINK_LIBRARIES)
if(_dma_core_links)
  list(TRANSFORM _dma_core_links REPLACE "^\\$<LINK_ONLY:Eigen3::Eigen>$"
       "$<BUILD_INTERFACE:$<LINK_ONLY:Eigen3::Eigen>>")
  set_property(TARGET dma_core PROPERTY INTERFACE_LINK_LIBRARIES "${_dma_core_links}")
endif()
# The public headers need C++17; say so to the consumer.
set_property(TARGET dma_core APPEND PROPERTY INTERFACE_COMPILE_FEATURES cxx_std_17)

set_target_properties(dma_core PROPERTIES EXPORT_NAME core)
install(TARGETS dma_core EXPORT dmaCoreTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/core/include/dma DESTINATION include
        FILES_MATCHING PATTERN "*.hpp")
install(EXPORT dmaCoreTargets NAMESPACE dma:: DESTINATION ${DMA_INSTALL_CMAKEDIR})

set(DMA_INSTALLED_CUDA OFF)
if(TARGET dma_cuda)
  set(DMA_INSTALLED_CUDA ON)
  set_target_properties(dma_cuda PROPERTIES EXPORT_NAME cuda)
  install(TARGETS dma_cuda EXPORT dmaCudaTargets ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
  install(DIRECTORY ${PROJECT_SOURCE_DIR}/cuda/include/dma DESTINATION include
          FILES_MATCHING PATTERN "*.hpp")
  install(EXPORT dmaCudaTargets NAMESPACE dma:: DESTINATION ${DMA_INSTALL_CMAKEDIR})
endif()

configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/dmaConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/cmake/dmaConfig.cmake
                              INSTALL_DESTINATION ${DMA_INSTALL_CMAKEDIR})
# 0.x: a new minor version may break the API, so only 0.1.* satisfies find_package(dma 0.1).
write_basic_package_version_file(${PROJECT_BINARY_DIR}/cmake/dmaConfigVersion.cmake
                                 VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/cmake/dmaConfig.cmake
              ${PROJECT_BINARY_DIR}/cmake/dmaConfigVersion.cmake
        DESTINATION ${DMA_INSTALL_CMAKEDIR})
