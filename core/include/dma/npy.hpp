// Reading and writing NumPy .npy files (format versions 1-3), the project's exchange format.
//
// Supported: little-endian float32, float64, uint8, int32, int64 in C order. Anything else
// (big-endian, Fortran order, other dtypes, truncated or oversized data) is a dma::Error whose
// message names the file. The header is checked against the file size before any allocation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace dma {

enum class DType { f32, f64, u8, i32, i64 };
const char* dtype_name(DType t);   // numpy spelling: "float32", ...
size_t dtype_size(DType t);

struct NpyArray {
  DType dtype = DType::f32;
  std::vector<int64_t> shape;        // () is a scalar with one element
  std::vector<unsigned char> data;   // numel * dtype_size bytes, little-endian, C order
  int64_t numel() const;
};

// Parses an in-memory .npy file; `name` is used in error messages.
NpyArray parse_npy(const unsigned char* bytes, size_t size, const std::string& name);
NpyArray read_npy(const std::string& path);
void write_npy(const std::string& path, const NpyArray& array);

// Builds an array from typed data (the dtype follows T) and checks numel against the shape.
template <typename T>
NpyArray make_npy(const std::vector<T>& values, const std::vector<int64_t>& shape);

// Converts a float32 or float64 array to T; other dtypes are a dma::Error naming `name`.
template <typename T>
std::vector<T> npy_to_float(const NpyArray& array, const std::string& name);

}  // namespace dma
