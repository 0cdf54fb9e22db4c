// The Dear ImGui context of the panel tests (test_viewer_panels.cpp, test_viewer_slots.cpp): the
// real panels are drawn into it with a fake mouse, no window.
#pragma once

#include <imgui.h>

#include <cstdint>

namespace dma_test {

// One ImGui context for a test, with a built font atlas and a 1600 x 1000 display.
struct ImGuiContextForTest {
  ImGuiContextForTest() {
    ImGui::CreateContext();
    ImGuiIO& io = ImGui::GetIO();
    io.IniFilename = nullptr;
    io.DisplaySize = ImVec2(1600, 1000);
    unsigned char* pixels = nullptr;
    int w = 0, h = 0;
    io.Fonts->GetTexDataAsRGBA32(&pixels, &w, &h);
    io.Fonts->SetTexID(reinterpret_cast<ImTextureID>(intptr_t{999}));
  }
  ~ImGuiContextForTest() { ImGui::DestroyContext(); }
  ImGuiContextForTest(const ImGuiContextForTest&) = delete;
  ImGuiContextForTest& operator=(const ImGuiContextForTest&) = delete;
};

}  // namespace dma_test
