// Runs the real dma_inspector headless under xvfb-run and checks the screenshot is not blank.
//
//   test_viewer_xvfb INSPECTOR OUT.png [extra inspector arguments...]
//   test_viewer_xvfb --no-display INSPECTOR     (without a display it must exit 77)
//
// Exit 0: the PNG exists, has the window's size and shows a real picture (many colours, no single
// colour covering nearly everything). Exit 77 (skipped): no xvfb-run, or the inspector found no
// display. Exit 1: anything else.
#include <stb_image.h>

#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <map>
#include <string>
#include <sys/wait.h>

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: test_viewer_xvfb INSPECTOR OUT.png [args...]\n");
    return 1;
  }
  if (std::string(argv[1]) == "--no-display") {
    const std::string cmd = "env -u DISPLAY -u WAYLAND_DISPLAY '" + std::string(argv[2]) +
                            "' --frames 1 --screenshot /dev/null";
    const int status = std::system(cmd.c_str());
    const int rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    std::printf("%s: exit %d (want 77)\n%s\n", cmd.c_str(), rc, rc == 77 ? "PASS" : "FAIL");
    return rc == 77 ? 0 : 1;
  }
  if (std::system("command -v xvfb-run >/dev/null 2>&1") != 0) {
    std::printf("SKIP: xvfb-run not found\n");
    return 77;
  }
  const std::string out = argv[2];
  std::remove(out.c_str());
  std::string cmd = "xvfb-run -a -s '-screen 0 1600x1000x24' '" + std::string(argv[1]) +
                    "' --frames 20 --width 1600 --height 1000 --screenshot '" + out + "'";
  for (int i = 3; i < argc; ++i) cmd += std::string(" '") + argv[i] + "'";
  std::printf("%s\n", cmd.c_str());
  std::fflush(stdout);
  const int status = std::system(cmd.c_str());
  const int rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  if (rc == 77) {
    std::printf("SKIP: the inspector found no display\n");
    return 77;
  }
  if (rc != 0) {
    std::printf("FAIL: the inspector exited with %d\n", rc);
    return 1;
  }

  int w = 0, h = 0, n = 0;
  unsigned char* px = stbi_load(out.c_str(), &w, &h, &n, 4);
  if (!px) {
    std::printf("FAIL: cannot read %s\n", out.c_str());
    return 1;
  }
  std::map<unsigned, long> colours;
  for (long i = 0; i < static_cast<long>(w) * h; ++i) {
    const unsigned char* p = px + 4 * i;
    ++colours[(p[0] << 16) | (p[1] << 8) | p[2]];
  }
  stbi_image_free(px);
  long most = 0;
  for (const auto& [c, count] : colours) most = std::max(most, count);
  const double dominant = static_cast<double>(most) / (static_cast<double>(w) * h);
  std::printf("%s: %d x %d, %zu colours, the commonest covers %.1f%%\n", out.c_str(), w, h,
              colours.size(), 100.0 * dominant);
  // A blank or failed frame has a handful of colours; the sparsest real view (the model view of
  // a 2-layer, 1-head model: two small heatmaps and text) has about 60.
  if (w != 1600 || h != 1000 || colours.size() < 32 || dominant > 0.9) {
    std::printf("FAIL: the screenshot looks blank\n");
    return 1;
  }
  std::printf("PASS\n");
  return 0;
}
