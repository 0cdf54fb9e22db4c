// What the panel tests share (test_viewer_panels.cpp, test_viewer_slots.cpp): a Dear ImGui
// context the real panels are drawn into with a fake mouse, no window, a texture uploader that
// only counts, and one frame of the inspector.
#pragma once

#include <doctest/doctest.h>
#include <imgui.h>

#include <cstdint>

#include "inspector.hpp"

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

// Hands out ids and counts uploads and live textures; nothing is drawn.
struct FakeTextures : dma::viewer::TextureUploader {
  int uploads = 0, live = 0;
  intptr_t next = 1;
  ImTextureID upload(ImTextureID existing, const dma::viewer::Image& img) override {
    ++uploads;
    CHECK(img.width > 0);
    CHECK(img.pixels.size() == static_cast<size_t>(img.width) * img.height);
    if (existing) return existing;
    ++live;
    return reinterpret_cast<ImTextureID>(next++);
  }
  void destroy(ImTextureID) override { --live; }
};

// One frame of the inspector with the mouse at (x, y), the left button down or not.
inline void frame(dma::viewer::InspectorState& st, float x, float y, bool down = false) {
  ImGuiIO& io = ImGui::GetIO();
  io.DeltaTime = 1.0f / 60.0f;
  io.MousePos = ImVec2(x, y);
  io.MouseDown[0] = down;
  ImGui::NewFrame();
  dma::viewer::draw_inspector(st);
  ImGui::Render();
}

}  // namespace dma_test
