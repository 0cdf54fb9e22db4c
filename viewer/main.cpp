// dma_inspector: the platform layer. Parses the command line, opens a GLFW window with an
// OpenGL 3 context, runs the Dear ImGui frame loop, uploads textures and takes screenshots.
// Everything the user sees is drawn by draw_inspector() (inspector.cpp and the panel_*.cpp).
//
//   dma_inspector                          the built-in example (assets/example)
//   dma_inspector --example mqar           the built-in trained model (assets/mqar, MQAR)
//   dma_inspector --in DIR                 a bundle in the dma_run layout, or a model: a folder
//                                          of bundles layer_00/ layer_01/ ... (--layer, --model-view)
//   dma_inspector --random --lk 2048 ...   random inputs of any shape
//   dma_inspector --frames 30 --screenshot shot.png   headless: render, save, exit 0
//
// Exit codes: 0 ok, 2 unreadable --in bundle or bad values, 77 no display (tests count it as
// skipped), 1 anything else.
#include <GLFW/glfw3.h>  // also brings <GL/gl.h>: our own GL calls are GL 1.1
#include <backends/imgui_impl_glfw.h>
#include <backends/imgui_impl_opengl3.h>
#include <imgui.h>
#include <stb_image_write.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "bundle_data.hpp"
#include "inspector.hpp"
#include "worker.hpp"

namespace dv = dma::viewer;

namespace {

// Textures for the heatmaps: RGBA8, nearest filtering (a texel is a block of cells, blurring it
// would invent values), uploaded with plain GL 1.1 calls.
struct GlTextures : dv::TextureUploader {
  ImTextureID upload(ImTextureID existing, const dv::Image& img) override {
    GLuint tex = static_cast<GLuint>(reinterpret_cast<intptr_t>(existing));
    if (!tex) glGenTextures(1, &tex);
    glBindTexture(GL_TEXTURE_2D, tex);
    glTexParameteri(GL_TEXTURE_2D, GL_TEXTURE_MIN_FILTER, GL_NEAREST);
    glTexParameteri(GL_TEXTURE_2D, GL_TEXTURE_MAG_FILTER, GL_NEAREST);
    glTexParameteri(GL_TEXTURE_2D, GL_TEXTURE_WRAP_S, GL_CLAMP_TO_EDGE);
    glTexParameteri(GL_TEXTURE_2D, GL_TEXTURE_WRAP_T, GL_CLAMP_TO_EDGE);
    glPixelStorei(GL_UNPACK_ALIGNMENT, 1);
    glTexImage2D(GL_TEXTURE_2D, 0, GL_RGBA, img.width, img.height, 0, GL_RGBA, GL_UNSIGNED_BYTE,
                 img.pixels.data());
    return reinterpret_cast<ImTextureID>(static_cast<intptr_t>(tex));
  }
  void destroy(ImTextureID id) override {
    const GLuint tex = static_cast<GLuint>(reinterpret_cast<intptr_t>(id));
    glDeleteTextures(1, &tex);
  }
};

// Reads the back buffer (the frame just rendered, before the swap) and writes it as PNG.
bool save_screenshot(GLFWwindow* window, const std::string& path) {
  int w = 0, h = 0;
  glfwGetFramebufferSize(window, &w, &h);
  std::vector<unsigned char> pixels(static_cast<size_t>(w) * h * 4);
  glReadBuffer(GL_BACK);
  glPixelStorei(GL_PACK_ALIGNMENT, 1);
  glReadPixels(0, 0, w, h, GL_RGBA, GL_UNSIGNED_BYTE, pixels.data());
  for (size_t i = 3; i < pixels.size(); i += 4) pixels[i] = 255;
  stbi_flip_vertically_on_write(1);  // GL's first row is the bottom one
  const int ok = stbi_write_png(path.c_str(), w, h, 4, pixels.data(), w * 4);
  stbi_flip_vertically_on_write(0);
  return ok != 0;
}

std::string default_assets_dir(const char* argv0) {
#ifdef DMA_ASSETS_DIR
  if (std::filesystem::exists(DMA_ASSETS_DIR "/example")) return DMA_ASSETS_DIR;
#endif
  // An installed or moved binary: look next to it and above it.
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path exe = fs::weakly_canonical(fs::path(argv0), ec).parent_path();
  for (const fs::path& p : {exe / "assets", exe / ".." / "assets", exe / ".." / ".." / "assets"})
    if (fs::exists(p / "example", ec)) return p.string();
  return "assets";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dma_inspector: a live view of Dynamic Mask Attention per head"};
  std::string in_dir, screenshot, assets_dir, view = "probs", hover;
  int frames = 0, head = 0, width = 1600, height = 1000;
  bool random = false, non_causal = false, live = false;
  dv::Params cli;
  int window = 0;
  std::string form;
  app.add_option("--in", in_dir, "Open a bundle folder (the dma_run layout), or a model folder of "
                               "bundles layer_00/ layer_01/ ...");
  int layer = 0;
  bool model_view = false;
  app.add_option("--layer", layer, "A model: the layer to open first")->check(CLI::NonNegativeNumber);
  app.add_flag("--model-view", model_view, "A model: start in the model view (layers x heads)");
  app.add_flag("--random", random, "Start on random inputs (see the shape options)");
  app.add_option("--batch", cli.B, "Random inputs: batch size")->check(CLI::Range(1, 4));
  app.add_option("--lq", cli.Lq, "Random inputs: queries")->check(CLI::Range(1, 4096));
  app.add_option("--lk", cli.Lk, "Random inputs: keys")->check(CLI::Range(1, 4096));
  app.add_option("--hq", cli.Hq, "Random inputs: query heads")->check(CLI::Range(1, 16));
  app.add_option("--hkv", cli.Hkv, "Random inputs: key/value heads")->check(CLI::Range(1, 16));
  app.add_flag("--hd-is-hq", cli.hd_is_hq, "Random inputs: one mask per query head (Hd = Hq)");
  app.add_option("--d", cli.D, "Random inputs: head dim")->check(CLI::Range(1, 256));
  app.add_option("--seed", cli.seed, "Random inputs: seed");
  app.add_option("--window", window, "Window w (default: the data's, or 64)")->check(CLI::Range(1, 1 << 20));
  app.add_flag("--non-causal", non_causal, "Every query sees every key");
  app.add_option("--form", form, "Dynamic weight form")->check(CLI::IsMember({"exp", "linear"}));
  app.add_flag("--bf16", cli.bf16_inputs, "Round q k v do to bf16 before the CPU runs (as CUDA does)");
  app.add_option("--bq", cli.Bq, "Queries per tile")->check(CLI::Range(1, 1024));
  app.add_option("--bk", cli.Bk, "Keys per tile")->check(CLI::Range(1, 1024));
  app.add_option("--view", view, "Initial view (slots: the slot view of the candidate table)")
      ->check(CLI::IsMember({"probs", "delta", "mask", "ds", "dq", "diff", "slots"}));
  app.add_option("--head", head, "Initial locked head");
  app.add_flag("--live", live, "Start with live timing on (re-times the backends while idle)");
  app.add_option("--hover", hover, "Hover this cell of the large view, QUERY,KEY (the slot view: "
                                   "TILE,SLOT) (for screenshots)");
  std::string zoom;
  app.add_option("--zoom", zoom, "Zoom the large view to rows R0..R1-1 and columns C0..C1-1: R0,R1,C0,C1");
  app.add_option("--frames", frames, "Render this many frames after the first result, then exit")
      ->check(CLI::Range(1, 100000));
  app.add_option("--screenshot", screenshot, "With --frames: write the last frame as PNG");
  app.add_option("--width", width, "Window width")->check(CLI::Range(320, 8192));
  app.add_option("--height", height, "Window height")->check(CLI::Range(240, 8192));
  app.add_option("--assets", assets_dir, "Folder holding example/ (default: the source tree's)");
  std::string example_name = "example";
  app.add_option("--example", example_name, "Built-in example: example (planted structure, the "
                 "default) or mqar (assets/mqar: a 2-layer DMA model trained on MQAR, opened as --in)")
      ->check(CLI::IsMember({"example", "mqar"}));
  CLI11_PARSE(app, argc, argv);
  if (assets_dir.empty()) assets_dir = default_assets_dir(argv[0]);
  if (example_name == "mqar") {  // a model folder shipped in assets/: open it as --in does
    if (!in_dir.empty()) {
      std::fprintf(stderr, "dma_inspector: --example mqar and --in exclude each other\n");
      return 2;
    }
    in_dir = assets_dir + "/mqar";
  }

  // Data first: a bad --in is an error before any window appears.
  std::shared_ptr<const dv::BundleData> example, bundle;
  try {
    example = dv::load_bundle_data(assets_dir + "/example", "built-in example");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dma_inspector: no built-in example (%s); starting on random inputs\n", e.what());
  }
  std::shared_ptr<const dv::Model> model;
  if (!in_dir.empty()) {
    try {
      model = dv::load_model(in_dir);
      if (model) {  // a model: open the chosen layer (or the first readable one)
        for (const dv::ModelLayer& l : model->layers)
          if (!l.data) std::fprintf(stderr, "dma_inspector: %s: %s\n", l.name.c_str(), l.error.c_str());
        if (layer >= static_cast<int>(model->layers.size()) || !model->layers[layer].data)
          layer = model->first_readable();
        if (layer < 0) {
          std::fprintf(stderr, "dma_inspector: %s: no layer could be read\n", in_dir.c_str());
          return 2;
        }
        bundle = model->layers[layer].data;
      } else {
        bundle = dv::load_bundle_data(in_dir, "bundle " + in_dir);
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "dma_inspector: %s\n", e.what());
      return 2;
    }
    if (!bundle->labels.error.empty())
      std::fprintf(stderr, "dma_inspector: %s\n", bundle->labels.error.c_str());
  }

  // The state the panels draw from, set up as the command line says.
  dv::InspectorState st;
  st.example = example;
  st.bundle = bundle;
  st.model = model;
  st.view.model_view = model && model_view;
  dv::Params& p = st.params;
  p = cli;
  p.layer = model ? layer : 0;
  p.Hkv = std::min(p.Hkv, p.Hq);
  const dv::BundleData* data = bundle ? bundle.get() : (!random && example) ? example.get() : nullptr;
  p.source = bundle ? dv::Source::bundle : data ? dv::Source::example : dv::Source::random;
  if (data) {
    p.window = data->window;
    p.causal = data->causal;
    p.form = data->form;
    p.a = data->a;
  } else {
    p.a = dv::default_a(p.Hd());
  }
  if (window > 0) p.window = window;
  if (non_causal) p.causal = false;
  if (!form.empty()) p.form = dma::parse_form(form);
  if (!data && p.causal) p.Lq = std::min(p.Lq, p.Lk);
  static const char* views[] = {"probs", "delta", "mask", "ds", "dq", "diff"};
  for (int k = 0; k < dv::kViewKindCount; ++k)
    if (view == views[k]) st.view.kind = static_cast<dv::ViewKind>(k);
  st.view.slot_view = view == "slots";
  st.view.locked_head = head;
  long long hq = 0, hk = 0;
  // --hover scripts the mouse for headless screenshots only: interactively the real mouse rules.
  if (frames > 0 && !hover.empty() && std::sscanf(hover.c_str(), "%lld,%lld", &hq, &hk) == 2)
    st.script_hover = dv::Cell{hq, hk};
  long long z[4];
  if (!zoom.empty() && std::sscanf(zoom.c_str(), "%lld,%lld,%lld,%lld", &z[0], &z[1], &z[2], &z[3]) == 4)
    st.script_zoom = dv::Window{z[0], z[1], z[2], z[3]};

  // The window. No display (no X server, no Wayland): exit 77, which ctest reports as skipped.
  glfwSetErrorCallback([](int code, const char* what) {
    std::fprintf(stderr, "dma_inspector: GLFW error %d: %s\n", code, what);
  });
  if (!glfwInit()) {
    std::fprintf(stderr, "dma_inspector: no display (glfwInit failed)\n");
    return 77;
  }
  glfwWindowHint(GLFW_CONTEXT_VERSION_MAJOR, 3);
  glfwWindowHint(GLFW_CONTEXT_VERSION_MINOR, 0);
  GLFWwindow* win = glfwCreateWindow(width, height, "DMA inspector", nullptr, nullptr);
  if (!win) {
    std::fprintf(stderr, "dma_inspector: cannot create an OpenGL 3.0 window\n");
    glfwTerminate();
    return 77;
  }
  glfwMakeContextCurrent(win);
  const bool headless = frames > 0;
  glfwSwapInterval(headless ? 0 : 1);  // headless: measure the real frame cost

  IMGUI_CHECKVERSION();
  ImGui::CreateContext();
  ImGui::GetIO().IniFilename = nullptr;  // the layout is computed, nothing to remember
  ImGui::StyleColorsDark();
  ImGui_ImplGlfw_InitForOpenGL(win, true);
  ImGui_ImplOpenGL3_Init("#version 130");

  GlTextures textures;
  int exit_code = 0;
  {
    // The worker wakes the UI (which sleeps in glfwWaitEvents when idle) when it has news.
    dv::Worker worker([] { glfwPostEmptyEvent(); });
    worker.set_data(example, bundle);
    worker.set_model(model);
    st.worker = &worker;
    st.textures = &textures;
    worker.request(p);
    worker.set_live(live);

    int counted = 0, quiet_frames = 0;
    double counted_seconds = 0, slowest_s = 0;
    const auto start = std::chrono::steady_clock::now();
    while (!glfwWindowShouldClose(win)) {
      // Idle policy: poll while something moves (a job, live timing, headless); after input,
      // draw a few more frames so hover states settle; then sleep until the next event.
      // Headless runs wait for the first result without spinning (the worker needs the CPU).
      const dv::WorkerStatus ws = worker.status();
      const bool animating = ws.busy || !ws.stage.empty() || worker.live() || st.builds_pending;
      if (headless) {
        if (ws.busy) glfwWaitEventsTimeout(0.05);
        else glfwPollEvents();
      } else if (st.builds_pending) {
        glfwPollEvents();  // textures still to build: draw the next frame at once
      } else if (animating) {
        glfwWaitEventsTimeout(1.0 / 30.0);  // the progress bar moves
      } else if (quiet_frames < 2 || ImGui::IsAnyItemActive()) {
        glfwPollEvents();
      } else {
        glfwWaitEvents();  // idle: no CPU until the next input or worker news
        quiet_frames = 0;
      }
      ++quiet_frames;

      const auto t0 = std::chrono::steady_clock::now();
      ImGui_ImplOpenGL3_NewFrame();
      ImGui_ImplGlfw_NewFrame();
      if (st.script_mouse) ImGui::GetIO().MousePos = *st.script_mouse;
      ImGui::NewFrame();
      dv::draw_inspector(st);
      ImGui::Render();
      int fb_w = 0, fb_h = 0;
      glfwGetFramebufferSize(win, &fb_w, &fb_h);
      glViewport(0, 0, fb_w, fb_h);
      glClearColor(0.08f, 0.08f, 0.09f, 1.0f);
      glClear(GL_COLOR_BUFFER_BIT);
      ImGui_ImplOpenGL3_RenderDrawData(ImGui::GetDrawData());
      glFinish();  // so the frame time below includes the rendering
      const double frame_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

      if (!st.screenshot_request.empty()) {
        const bool ok = save_screenshot(win, st.screenshot_request);
        st.message = (ok ? "wrote " : "cannot write ") + st.screenshot_request;
        st.screenshot_request.clear();
      }
      if (st.snap && st.snap->views && !ws.busy) slowest_s = std::max(slowest_s, frame_s);
      if (headless) {
        // Count frames only once the first result (and its timings) is on screen.
        const dv::WorkerStatus now = worker.status();
        if (!now.busy && !st.builds_pending && st.snap && st.snap->params == st.params) {
          ++counted;
          if (counted > 2) counted_seconds += frame_s;
        }
        if (counted >= frames) {
          if (!screenshot.empty() && !save_screenshot(win, screenshot)) {
            std::fprintf(stderr, "dma_inspector: cannot write %s\n", screenshot.c_str());
            exit_code = 1;
          }
          if (counted > 2)
            std::printf("dma_inspector: %d frames, mean frame time %.2f ms (%.0f fps possible); "
                        "the slowest frame with the worker idle (textures built) took %.1f ms\n",
                        counted - 2, 1e3 * counted_seconds / (counted - 2),
                        (counted - 2) / std::max(counted_seconds, 1e-9), 1e3 * slowest_s);
          if (st.snap && !st.snap->error.empty()) {  // a headless check must not pass over it
            std::printf("dma_inspector: the result holds an error: %s\n", st.snap->error.c_str());
            exit_code = 1;
          }
          glfwSwapBuffers(win);
          break;
        }
        if (std::chrono::steady_clock::now() - start > std::chrono::minutes(9)) {
          std::fprintf(stderr, "dma_inspector: gave up waiting for the first result\n");
          exit_code = 1;
          break;
        }
      }
      glfwSwapBuffers(win);
    }
    dv::release_textures(st);
    // The worker finishes its current step before it joins (the core reference has no cancel
    // point inside a step): hide the window first, so closing looks immediate.
    glfwHideWindow(win);
    st.worker = nullptr;
  }  // the worker joins here, before the context goes away

  ImGui_ImplOpenGL3_Shutdown();
  ImGui_ImplGlfw_Shutdown();
  ImGui::DestroyContext();
  glfwDestroyWindow(win);
  glfwTerminate();
  return exit_code;
}
