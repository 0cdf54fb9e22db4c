// .npy reading and writing: round trips, format versions, and every malformed file we can think of.
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <unistd.h>

#include "dma/npy.hpp"
#include "dma/types.hpp"

using namespace dma;

namespace {

// Builds a .npy file by hand: version, header text (padded), raw data.
std::vector<unsigned char> npy_bytes(int major, const std::string& dict, size_t data_bytes,
                                     const void* data = nullptr) {
  std::string header = dict;
  const size_t prefix = major == 1 ? 10 : 12;
  header.append((64 - (prefix + header.size() + 1) % 64) % 64, ' ');
  header += '\n';
  std::vector<unsigned char> out = {0x93, 'N', 'U', 'M', 'P', 'Y', static_cast<unsigned char>(major), 0};
  const size_t len = header.size();
  out.push_back(len & 0xff);
  out.push_back((len >> 8) & 0xff);
  if (major != 1) {
    out.push_back((len >> 16) & 0xff);
    out.push_back((len >> 24) & 0xff);
  }
  out.insert(out.end(), header.begin(), header.end());
  const auto* d = static_cast<const unsigned char*>(data);
  for (size_t n = 0; n < data_bytes; ++n) out.push_back(d ? d[n] : 0);
  return out;
}

std::string parse_error(const std::vector<unsigned char>& bytes) {
  try {
    parse_npy(bytes.data(), bytes.size(), "x.npy");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_SUITE("npy") {
  TEST_CASE("round trip of every supported dtype through a file") {
    const auto dir = std::filesystem::temp_directory_path() / ("dma_npy_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir);
    const std::string path = (dir / "t.npy").string();
    const std::vector<double> f64 = {1.5, -2.25, 3e300, -0.0, 7, 8};
    write_npy(path, make_npy(f64, {2, 3}));
    NpyArray a = read_npy(path);
    CHECK(a.dtype == DType::f64);
    CHECK(a.shape == std::vector<int64_t>{2, 3});
    CHECK(npy_to_float<double>(a, "t") == f64);
    write_npy(path, make_npy(std::vector<float>{1.f, 2.f, 3.f}, {3}));
    CHECK(npy_to_float<double>(read_npy(path), "t") == std::vector<double>{1, 2, 3});
    write_npy(path, make_npy(std::vector<int64_t>{-1, 5}, {1, 2}));
    CHECK(read_npy(path).dtype == DType::i64);
    write_npy(path, make_npy(std::vector<int32_t>{4}, {}));  // a scalar
    CHECK(read_npy(path).shape.empty());
    write_npy(path, make_npy(std::vector<uint8_t>{1, 0, 1, 1}, {2, 2}));
    a = read_npy(path);
    CHECK(a.dtype == DType::u8);
    CHECK(a.data == std::vector<unsigned char>{1, 0, 1, 1});
    CHECK_THROWS_WITH_AS(npy_to_float<double>(a, "mask"), "mask: dtype uint8 (expected float32 or float64)", Error);
    std::filesystem::remove_all(dir);
  }

  TEST_CASE("format versions 1 2 and 3 and header spellings") {
    const float data[2] = {1.0f, -4.0f};
    for (int major : {1, 2, 3}) {
      const auto bytes = npy_bytes(major, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 8, data);
      const NpyArray a = parse_npy(bytes.data(), bytes.size(), "x.npy");
      CHECK(npy_to_float<float>(a, "x") == std::vector<float>{1.0f, -4.0f});
    }
    const auto spaced = npy_bytes(1, "{\"shape\": ( 1 , 2 ), \"fortran_order\": False, \"descr\": \"<f4\"}", 8, data);
    CHECK(parse_npy(spaced.data(), spaced.size(), "x").shape == std::vector<int64_t>{1, 2});
  }

  TEST_CASE("malformed files are clear errors") {
    const std::string ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
    auto good = npy_bytes(1, ok, 24);
    CHECK(parse_error(good) == "");
    auto bad_magic = good;
    bad_magic[1] = 'X';
    CHECK(parse_error(bad_magic) == "x.npy: not a .npy file (bad magic)");
    auto truncated = good;
    truncated.resize(good.size() - 5);
    CHECK(parse_error(truncated).find("more data than the file holds") != std::string::npos);
    auto trailing = good;
    trailing.push_back(0);
    CHECK(parse_error(trailing).find("data size mismatch") != std::string::npos);
    CHECK(parse_error(std::vector<unsigned char>(good.begin(), good.begin() + 12)).find("truncated") != std::string::npos);
    CHECK(parse_error({0x93, 'N'}) == "x.npy: not a .npy file (bad magic)");
    auto version = good;
    version[6] = 9;
    CHECK(parse_error(version).find("unsupported .npy format version 9") != std::string::npos);
    CHECK(parse_error(npy_bytes(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", 24)).find("big-endian") != std::string::npos);
    CHECK(parse_error(npy_bytes(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", 24)).find("Fortran-order") != std::string::npos);
    CHECK(parse_error(npy_bytes(1, "{'descr': '<c8', 'fortran_order': False, 'shape': (2, 3), }", 48)).find("unsupported dtype '<c8'") != std::string::npos);
    CHECK(parse_error(npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3), }", 24)).find("non-integer") != std::string::npos);
    CHECK(parse_error(npy_bytes(1, "{'descr': '<f4', 'fortran_order': False}", 24)).find("no 'shape'") != std::string::npos);
    // A header that claims absurd sizes is rejected before anything is allocated.
    CHECK(parse_error(npy_bytes(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (4000000000, 4000000000, 4000000000), }", 16)).find("more data than the file holds") != std::string::npos);
    CHECK(parse_error(npy_bytes(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (99999999999999999999999,), }", 16)).find("absurdly large") != std::string::npos);
    // header length pointing past the end of the file
    auto long_header = good;
    long_header[8] = 0xff;
    long_header[9] = 0xff;
    CHECK(parse_error(long_header).find("truncated .npy header") != std::string::npos);
  }

  TEST_CASE("missing and unwritable files") {
    CHECK_THROWS_WITH_AS(read_npy("/nonexistent/dir/q.npy"), "/nonexistent/dir/q.npy: no such file", Error);
    CHECK_THROWS_AS(write_npy("/nonexistent/dir/q.npy", make_npy(std::vector<float>{1}, {1})), Error);
  }
}
