// Replays fuzz inputs without libFuzzer: every file named on the command line, or every file in a
// named folder, goes through LLVMFuzzerTestOneInput once. Used by ctest to keep the seed corpus
// and every input that once crashed as regression tests, with the ordinary compiler.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

int main(int argc, char** argv) {
  namespace fs = std::filesystem;
  int replayed = 0;
  for (int n = 1; n < argc; ++n) {
    std::vector<fs::path> files;
    if (fs::is_directory(argv[n])) {
      for (const auto& e : fs::directory_iterator(argv[n]))
        if (e.is_regular_file()) files.push_back(e.path());
    } else {
      files.emplace_back(argv[n]);
    }
    for (const auto& f : files) {
      std::ifstream in(f, std::ios::binary);
      const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      LLVMFuzzerTestOneInput(bytes.data(), bytes.size());
      ++replayed;
    }
  }
  std::printf("replayed %d inputs\n", replayed);
  return replayed > 0 ? 0 : 1;
}
