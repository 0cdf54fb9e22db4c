# Tests of the inspector (viewer/), included by tests/CMakeLists.txt when dma_inspector exists.
#
#   test_viewer       doctest, TEST_SUITE("gui"): the pure helpers (colour maps, downsampling,
#                     hover mapping, tile classification against the core's counters), the worker's
#                     jobs (inputs, comparisons, the capped timing history) and the real panels
#                     driven in a Dear ImGui context with a fake mouse, no window
#   test_viewer_slots doctest, "gui": the slot view (key runs, its picture, the slot sweep's
#                     counters against dma::tiled_backward's, the panel with a fake mouse)
#   viewer_xvfb_*     the real executable under xvfb-run: renders, writes a screenshot, which must
#                     not be blank (labels gui, xvfb; exit 77 = skipped without xvfb-run)
#   viewer_no_display without a display the executable exits 77
#   viewer_make_model tools/make_model_bundle.py (numpy) writes a synthetic 4-layer model with
#                     tokens.txt and roles.txt into the build folder, each layer run by dma_run;
#                     viewer_xvfb_model* open it: the model view, and a layer's mask with a
#                     hovered, token-labelled cell
add_executable(test_viewer test_viewer_main.cpp test_viewer_pure.cpp test_viewer_panels.cpp)
target_link_libraries(test_viewer PRIVATE dma_inspector_ui doctest::doctest)
target_compile_definitions(test_viewer PRIVATE DMA_ASSETS_DIR="${PROJECT_SOURCE_DIR}/assets")
doctest_discover_tests(test_viewer ADD_LABELS 1)

add_executable(test_viewer_slots test_viewer_main.cpp test_viewer_slots.cpp)
target_link_libraries(test_viewer_slots PRIVATE dma_inspector_ui doctest::doctest)
doctest_discover_tests(test_viewer_slots ADD_LABELS 1)

add_executable(test_viewer_xvfb test_viewer_xvfb.cpp)
target_link_libraries(test_viewer_xvfb PRIVATE PkgConfig::IMGUI)  # for stb_image (-lstb)
add_dependencies(test_viewer_xvfb dma_inspector)
add_test(NAME viewer_xvfb_screenshot
         COMMAND test_viewer_xvfb $<TARGET_FILE:dma_inspector>
                 ${CMAKE_CURRENT_BINARY_DIR}/viewer_xvfb_screenshot.png)
add_test(NAME viewer_xvfb_random_2048
         COMMAND test_viewer_xvfb $<TARGET_FILE:dma_inspector>
                 ${CMAKE_CURRENT_BINARY_DIR}/viewer_xvfb_random_2048.png
                 --random --lq 512 --lk 2048 --hq 8 --hkv 2 --window 128 --view mask)
# The slot view of a random GQA head (w = 128, tiles of 32), one key's run hovered.
add_test(NAME viewer_xvfb_slots
         COMMAND test_viewer_xvfb $<TARGET_FILE:dma_inspector>
                 ${CMAKE_CURRENT_BINARY_DIR}/viewer_xvfb_slots.png
                 --random --lq 1024 --lk 1024 --hq 4 --hkv 2 --window 128 --bq 32 --bk 32
                 --head 3 --view slots --hover 20,40)
set_tests_properties(viewer_xvfb_screenshot viewer_xvfb_random_2048 viewer_xvfb_slots PROPERTIES
                     LABELS "gui;xvfb" SKIP_RETURN_CODE 77 TIMEOUT 600)
if(DMA_SANITIZE)
  # Mesa's driver, loaded and unloaded at run time, leaves ~112 bytes at exit from frames that
  # cannot be attributed: leak checking is off for the windowed runs (address and UB checks
  # stay on; test_viewer, which drives the same panels without a window, keeps leak checking).
  set_tests_properties(viewer_xvfb_screenshot viewer_xvfb_random_2048 viewer_xvfb_slots PROPERTIES
                       ENVIRONMENT "ASAN_OPTIONS=detect_leaks=0")
endif()
# Without a display the inspector exits 77 (so that ctest reports GUI runs as skipped there).
add_test(NAME viewer_no_display COMMAND test_viewer_xvfb --no-display $<TARGET_FILE:dma_inspector>)
set_tests_properties(viewer_no_display PROPERTIES LABELS "gui" TIMEOUT 60)

# A model to open (docs/design.md §4), generated at test time: a Python with numpy is needed
# (Debian's /usr/bin/python3 has it; the first python3 on PATH may not).
set(DMA_VIEWER_PYTHON "")
foreach(candidate /usr/bin/python3 python3)
  find_program(_dma_py NAMES ${candidate} NO_CACHE)
  if(_dma_py AND NOT DMA_VIEWER_PYTHON)
    execute_process(COMMAND ${_dma_py} -c "import numpy" RESULT_VARIABLE _dma_np OUTPUT_QUIET ERROR_QUIET)
    if(_dma_np EQUAL 0)
      set(DMA_VIEWER_PYTHON ${_dma_py})
    endif()
  endif()
  unset(_dma_py)
endforeach()
if(DMA_VIEWER_PYTHON AND TARGET dma_run)
  set(_dma_model ${CMAKE_CURRENT_BINARY_DIR}/viewer_model)
  add_test(NAME viewer_make_model
           COMMAND ${DMA_VIEWER_PYTHON} ${PROJECT_SOURCE_DIR}/tools/make_model_bundle.py
                   --out ${_dma_model} --dma-run $<TARGET_FILE:dma_run>)
  set_tests_properties(viewer_make_model PROPERTIES LABELS "gui;xvfb" FIXTURES_SETUP viewer_model
                       TIMEOUT 300)
  add_test(NAME viewer_xvfb_model
           COMMAND test_viewer_xvfb $<TARGET_FILE:dma_inspector>
                   ${CMAKE_CURRENT_BINARY_DIR}/viewer_xvfb_model.png --in ${_dma_model} --model-view)
  add_test(NAME viewer_xvfb_model_layer
           COMMAND test_viewer_xvfb $<TARGET_FILE:dma_inspector>
                   ${CMAKE_CURRENT_BINARY_DIR}/viewer_xvfb_model_layer.png --in ${_dma_model}
                   --layer 3 --view mask --hover 200,5)
  set_tests_properties(viewer_xvfb_model viewer_xvfb_model_layer PROPERTIES
                       LABELS "gui;xvfb" SKIP_RETURN_CODE 77 TIMEOUT 600
                       FIXTURES_REQUIRED viewer_model)
  if(DMA_SANITIZE)
    set_tests_properties(viewer_xvfb_model viewer_xvfb_model_layer PROPERTIES
                         ENVIRONMENT "ASAN_OPTIONS=detect_leaks=0")
  endif()
else()
  message(STATUS "viewer: no python3 with numpy (or no dma_run): the model tests are left out")
endif()

# The built-in trained model, assets/mqar (bench/mqar/export_bundle.py; `dma_inspector --example
# mqar`): test_viewer_mqar checks its data against the core (labels, inferred settings, stored
# delta and evict = recomputed), and under xvfb the model view and layer 1's mask with a hovered,
# labelled cell.
if(IS_DIRECTORY ${PROJECT_SOURCE_DIR}/assets/mqar)
  add_executable(test_viewer_mqar test_viewer_main.cpp test_viewer_mqar.cpp)
  target_link_libraries(test_viewer_mqar PRIVATE dma_inspector_ui doctest::doctest)
  target_compile_definitions(test_viewer_mqar PRIVATE DMA_ASSETS_DIR="${PROJECT_SOURCE_DIR}/assets")
  doctest_discover_tests(test_viewer_mqar ADD_LABELS 1)
  add_test(NAME viewer_xvfb_mqar
           COMMAND test_viewer_xvfb $<TARGET_FILE:dma_inspector>
                   ${CMAKE_CURRENT_BINARY_DIR}/viewer_xvfb_mqar.png --example mqar --model-view)
  add_test(NAME viewer_xvfb_mqar_layer
           COMMAND test_viewer_xvfb $<TARGET_FILE:dma_inspector>
                   ${CMAKE_CURRENT_BINARY_DIR}/viewer_xvfb_mqar_layer.png --example mqar --layer 1
                   --view mask --hover 400,10)
  set_tests_properties(viewer_xvfb_mqar viewer_xvfb_mqar_layer PROPERTIES
                       LABELS "gui;xvfb" SKIP_RETURN_CODE 77 TIMEOUT 600)
  if(DMA_SANITIZE)
    set_tests_properties(viewer_xvfb_mqar viewer_xvfb_mqar_layer PROPERTIES
                         ENVIRONMENT "ASAN_OPTIONS=detect_leaks=0")
  endif()
endif()
