// NumPy .npy reading and writing. The format: magic "\x93NUMPY", a version byte pair, a header
// length (2 bytes in v1, 4 in v2/v3), a Python dict literal such as
//   {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
// padded with spaces to a multiple of 64 bytes, then the raw data.
#include "dma/npy.hpp"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include "dma/types.hpp"

namespace dma {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::u8: return "uint8";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
  }
  return "?";
}

size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::u8: return 1;
    case DType::i32: return 4;
    case DType::i64: return 8;
  }
  return 0;
}

int64_t NpyArray::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

namespace {

const char* descr_of(DType t) {
  switch (t) {
    case DType::f32: return "<f4";
    case DType::f64: return "<f8";
    case DType::u8: return "|u1";
    case DType::i32: return "<i4";
    case DType::i64: return "<i8";
  }
  return "?";
}

// A tiny reader for the header's dict literal: finds a key and reads the value after its colon.
struct HeaderReader {
  const std::string& text;
  const std::string& name;

  [[noreturn]] void fail(const std::string& what) const {
    throw Error(name + ": " + what);
  }
  size_t value_of(const std::string& key) const {
    size_t at = text.find("'" + key + "'");
    if (at == std::string::npos) at = text.find("\"" + key + "\"");
    if (at == std::string::npos) fail("npy header has no '" + key + "' entry");
    at = text.find(':', at);
    if (at == std::string::npos) fail("npy header entry '" + key + "' has no value");
    at = text.find_first_not_of(" \t", at + 1);
    if (at == std::string::npos) fail("npy header entry '" + key + "' has no value");
    return at;
  }
  std::string descr() const {
    const size_t at = value_of("descr");
    const char quote = text[at];
    if (quote != '\'' && quote != '"') fail("npy descr is not a simple type string");
    const size_t end = text.find(quote, at + 1);
    if (end == std::string::npos) fail("npy descr is not terminated");
    return text.substr(at + 1, end - at - 1);
  }
  bool fortran_order() const {
    const size_t at = value_of("fortran_order");
    if (text.compare(at, 4, "True") == 0) return true;
    if (text.compare(at, 5, "False") == 0) return false;
    fail("npy fortran_order is neither True nor False");
  }
  std::vector<int64_t> shape() const {
    size_t at = value_of("shape");
    if (text[at] != '(') fail("npy shape is not a tuple");
    std::vector<int64_t> dims;
    ++at;
    for (;;) {
      at = text.find_first_not_of(" \t", at);
      if (at == std::string::npos) fail("npy shape is not terminated");
      if (text[at] == ')') break;
      if (text[at] < '0' || text[at] > '9') fail("npy shape holds a non-integer");
      int64_t d = 0;
      while (at < text.size() && text[at] >= '0' && text[at] <= '9') {
        if (d > (std::numeric_limits<int64_t>::max() - 9) / 10) fail("npy shape dimension is absurdly large");
        d = d * 10 + (text[at++] - '0');
      }
      if (text[at] == 'L') ++at;  // Python 2 long suffix
      dims.push_back(d);
      at = text.find_first_not_of(" \t", at);
      if (at == std::string::npos) fail("npy shape is not terminated");
      if (text[at] == ',') ++at;
      else if (text[at] != ')') fail("npy shape is malformed");
      if (dims.size() > 32) fail("npy shape has more than 32 dimensions");
    }
    return dims;
  }
};

DType parse_descr(const std::string& descr, const std::string& name) {
  if (descr == "<f4") return DType::f32;
  if (descr == "<f8") return DType::f64;
  if (descr == "|u1" || descr == "<u1" || descr == "u1") return DType::u8;
  if (descr == "<i4") return DType::i32;
  if (descr == "<i8") return DType::i64;
  if (!descr.empty() && descr[0] == '>')
    throw Error(name + ": big-endian data ('" + descr + "') is not supported; save it little-endian");
  throw Error(name + ": unsupported dtype '" + descr +
              "' (supported: float32, float64, uint8, int32, int64, little-endian)");
}

uint32_t read_le(const unsigned char* p, int bytes) {
  uint32_t v = 0;
  for (int n = bytes - 1; n >= 0; --n) v = (v << 8) | p[n];
  return v;
}

}  // namespace

NpyArray parse_npy(const unsigned char* bytes, size_t size, const std::string& name) {
  static const unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  if (size < 10 || std::memcmp(bytes, magic, 6) != 0)
    throw Error(name + ": not a .npy file (bad magic)");
  const unsigned major = bytes[6];
  if (major < 1 || major > 3)
    throw Error(name + ": unsupported .npy format version " + std::to_string(major) + "." +
                std::to_string(bytes[7]));
  const int len_bytes = major == 1 ? 2 : 4;
  if (size < static_cast<size_t>(8 + len_bytes)) throw Error(name + ": truncated .npy header");
  const size_t header_len = read_le(bytes + 8, len_bytes);
  const size_t data_at = 8 + static_cast<size_t>(len_bytes) + header_len;
  if (header_len > size || data_at > size)
    throw Error(name + ": truncated .npy header (claims " + std::to_string(header_len) +
                " bytes, file has " + std::to_string(size) + ")");
  const std::string header(reinterpret_cast<const char*>(bytes) + 8 + len_bytes, header_len);
  const HeaderReader reader{header, name};

  NpyArray a;
  a.dtype = parse_descr(reader.descr(), name);
  if (reader.fortran_order())
    throw Error(name + ": Fortran-order arrays are not supported; save with np.ascontiguousarray");
  a.shape = reader.shape();
  // The size the header claims, checked for overflow and against the file before allocating.
  const size_t available = size - data_at;
  size_t expected = dtype_size(a.dtype);
  for (int64_t d : a.shape)
    if (d == 0) expected = 0;  // an empty array: the caller names the empty dimension
  for (int64_t d : a.shape) {
    if (d != 0 && expected > available / static_cast<size_t>(d))
      throw Error(name + ": header claims more data than the file holds (" +
                  std::to_string(available) + " bytes of data)");
    expected *= static_cast<size_t>(d);
  }
  if (expected != available)
    throw Error(name + ": data size mismatch: header says " + std::to_string(expected) +
                " bytes, file holds " + std::to_string(available));
  // The element count must fit in int64 also when a zero dimension makes the array empty and the
  // size guard above passes: numel() and the callers multiply the dimensions in order.
  int64_t count = 1;
  for (int64_t d : a.shape) {
    if (d == 0) continue;
    if (count > std::numeric_limits<int64_t>::max() / d)
      throw Error(name + ": npy shape is absurdly large (its element count overflows int64)");
    count *= d;
  }
  a.data.assign(bytes + data_at, bytes + size);
  return a;
}

NpyArray read_npy(const std::string& path) {
  std::error_code ec;
  const auto type = std::filesystem::status(path, ec).type();
  if (type == std::filesystem::file_type::not_found) throw Error(path + ": no such file");
  if (type != std::filesystem::file_type::regular)  // a FIFO would block, a folder has no size
    throw Error(path + ": not a regular file");
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw Error(path + ": cannot open for reading");
  const std::streamoff size = in.tellg();
  if (size < 0) throw Error(path + ": cannot read");
  std::vector<unsigned char> bytes(static_cast<size_t>(size));
  in.seekg(0);
  if (size > 0 && !in.read(reinterpret_cast<char*>(bytes.data()), size))
    throw Error(path + ": read failed");
  return parse_npy(bytes.data(), bytes.size(), path);
}

void write_npy(const std::string& path, const NpyArray& array) {
  if (static_cast<size_t>(array.numel()) * dtype_size(array.dtype) != array.data.size())
    throw Error(path + ": array data does not match its shape");
  std::string header = std::string("{'descr': '") + descr_of(array.dtype) +
                       "', 'fortran_order': False, 'shape': (";
  for (size_t d = 0; d < array.shape.size(); ++d)
    header += std::to_string(array.shape[d]) + (array.shape.size() == 1 ? "," : d + 1 < array.shape.size() ? ", " : "");
  header += "), }";
  // Version 1 header: total of magic(6) + version(2) + length(2) + header padded to 64, ending '\n'.
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw Error(path + ": cannot open for writing");
  const unsigned char prefix[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0,
                                    static_cast<unsigned char>(header.size() & 0xff),
                                    static_cast<unsigned char>(header.size() >> 8)};
  out.write(reinterpret_cast<const char*>(prefix), 10);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<const char*>(array.data.data()),
            static_cast<std::streamsize>(array.data.size()));
  if (!out.flush()) throw Error(path + ": write failed");
}

namespace {
template <typename T> DType dtype_of();
template <> DType dtype_of<float>() { return DType::f32; }
template <> DType dtype_of<double>() { return DType::f64; }
template <> DType dtype_of<uint8_t>() { return DType::u8; }
template <> DType dtype_of<int32_t>() { return DType::i32; }
template <> DType dtype_of<int64_t>() { return DType::i64; }
}  // namespace

template <typename T>
NpyArray make_npy(const std::vector<T>& values, const std::vector<int64_t>& shape) {
  NpyArray a;
  a.dtype = dtype_of<T>();
  a.shape = shape;
  if (a.numel() != static_cast<int64_t>(values.size()))
    throw Error("make_npy: " + std::to_string(values.size()) + " values for a shape of " +
                std::to_string(a.numel()));
  a.data.resize(values.size() * sizeof(T));
  if (!values.empty()) std::memcpy(a.data.data(), values.data(), a.data.size());
  return a;
}

template <typename T>
std::vector<T> npy_to_float(const NpyArray& array, const std::string& name) {
  std::vector<T> out(static_cast<size_t>(array.numel()));
  if (array.dtype == DType::f32) {
    for (size_t n = 0; n < out.size(); ++n) {
      float x;
      std::memcpy(&x, array.data.data() + n * 4, 4);
      out[n] = static_cast<T>(x);
    }
  } else if (array.dtype == DType::f64) {
    for (size_t n = 0; n < out.size(); ++n) {
      double x;
      std::memcpy(&x, array.data.data() + n * 8, 8);
      out[n] = static_cast<T>(x);
    }
  } else {
    throw Error(name + ": dtype " + dtype_name(array.dtype) + " (expected float32 or float64)");
  }
  return out;
}

template NpyArray make_npy(const std::vector<float>&, const std::vector<int64_t>&);
template NpyArray make_npy(const std::vector<double>&, const std::vector<int64_t>&);
template NpyArray make_npy(const std::vector<uint8_t>&, const std::vector<int64_t>&);
template NpyArray make_npy(const std::vector<int32_t>&, const std::vector<int64_t>&);
template NpyArray make_npy(const std::vector<int64_t>&, const std::vector<int64_t>&);
template std::vector<float> npy_to_float(const NpyArray&, const std::string&);
template std::vector<double> npy_to_float(const NpyArray&, const std::string&);

}  // namespace dma
