// dma_run end to end: the bundle contract of docs/design.md §4, through the real executable.
#include <doctest/doctest.h>

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "dma/bundle.hpp"
#include "test_util.hpp"

using namespace dma;
using namespace dma_test;
namespace fs = std::filesystem;

namespace {

struct Run {
  int code;
  std::string out, err;
};

// A scratch folder per test case, removed at the end.
struct Scratch {
  fs::path dir;
  Scratch() {
    static int counter = 0;
    dir = fs::temp_directory_path() / ("dma_run_test_" + std::to_string(getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  ~Scratch() { fs::remove_all(dir); }
  std::string operator/(const std::string& name) const { return (dir / name).string(); }
};

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

Run dma_run(const Scratch& tmp, const std::string& args) {
  const std::string cmd = std::string(DMA_RUN_PATH) + " " + args + " >" + (tmp / "stdout.txt") +
                          " 2>" + (tmp / "stderr.txt");
  const int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(tmp / "stdout.txt"), slurp(tmp / "stderr.txt")};
}

template <typename T>
void write_problem(const std::string& dir, const Problem<T>& p) {
  write_bundle(dir, bundle_from_problem(p));
}

int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

const Shape kShape = make_shape(2, 4, 2, 4, 7, 11, 8);  // GQA, Hd = Hq, Lq < Lk

}  // namespace

TEST_SUITE("dma_run") {
  TEST_CASE("float64 bundle: every output with its shape and dtype equals the library") {
    Scratch tmp;
    const Problem<double> p = random_problem<double>(kShape, make_options(4), test_seed());
    write_problem(tmp / "in", p);
    const Run r = dma_run(tmp, "--in " + (tmp / "in") + " --out " + (tmp / "out") + " --window 4");
    REQUIRE_MESSAGE(r.code == 0, r.err);
    const Bundle out = read_bundle(tmp / "out");
    const Result<double> want = run_pipeline(p, Backend::cpu);
    const Shape& s = kShape;
    for (const char* name : {"delta", "o", "lse", "dq", "dk", "dv", "ddelta", "dw_dt", "da"})
      CHECK_MESSAGE(out.arrays.at(name).dtype == DType::f64, name);
    CHECK(out.arrays.at("evict").dtype == DType::i64);
    CHECK(out.arrays.at("mask").dtype == DType::u8);
    CHECK(out.arrays.at("mask").shape == std::vector<int64_t>{s.B, s.Hd, s.Lq, s.Lk});
    CHECK(out.arrays.at("evict").shape == std::vector<int64_t>{s.B, s.Hd, s.Lk});
    CHECK(out.arrays.at("dw_dt").shape == std::vector<int64_t>{s.Hd, s.Hkv * s.D});
    CHECK(npy_to_float<double>(out.arrays.at("o"), "o") == want.fwd.o);
    CHECK(npy_to_float<double>(out.arrays.at("dv"), "dv") == want.grads.dv);
    CHECK(npy_to_float<double>(out.arrays.at("da"), "da") == want.da);
    CHECK(make_npy(want.evict, {s.B, s.Hd, s.Lk}).data == out.arrays.at("evict").data);
    CHECK(out.has("q"));  // the inputs travel with the outputs
    for (const auto& entry : fs::directory_iterator(tmp.dir))  // no temporary folder left
      CHECK_MESSAGE(entry.path().filename().string()[0] != '.', entry.path().string());
  }

  TEST_CASE("float32 in and float32 out and the tiled backend agrees with the reference") {
    Scratch tmp;
    Problem<float> p = random_problem<float>(kShape, make_options(3, false, Form::linear), test_seed() + 1);
    write_problem(tmp / "in", p);
    REQUIRE(dma_run(tmp, "--in " + (tmp / "in") + " --out " + (tmp / "cpu") + " --window 3 --non-causal --form linear").code == 0);
    const Run r = dma_run(tmp, "--in " + (tmp / "in") + " --out " + (tmp / "tiled") +
                                   " --window 3 --non-causal --form linear --backend tiled --tile-q 4 --tile-k 4");
    REQUIRE_MESSAGE(r.code == 0, r.err);
    const Bundle a = read_bundle(tmp / "cpu"), b = read_bundle(tmp / "tiled");
    CHECK(a.arrays.at("o").dtype == DType::f32);
    for (const char* name : {"o", "lse", "dq", "dk", "dv", "ddelta", "dw_dt", "da"})
      CHECK_MESSAGE(max_rel_error(npy_to_float<double>(b.arrays.at(name), name),
                                  npy_to_float<double>(a.arrays.at(name), name)) < 1e-5, name);
    CHECK(a.arrays.at("evict").data == b.arrays.at("evict").data);
  }

  TEST_CASE("given delta: dw_dt and da are not written and dv is the attention gradient") {
    Scratch tmp;
    Problem<double> p = random_problem<double>(kShape, make_options(5), test_seed() + 2);
    std::mt19937_64 rng(test_seed() + 3);
    p.delta = randn<double>(rng, kShape.delta_numel());
    p.w_dt.clear();
    p.a.clear();
    write_problem(tmp / "in", p);
    REQUIRE(dma_run(tmp, "--in " + (tmp / "in") + " --out " + (tmp / "out") + " --window 5").code == 0);
    const Bundle out = read_bundle(tmp / "out");
    CHECK(!out.has("dw_dt"));
    CHECK(!out.has("da"));
    CHECK(npy_to_float<double>(out.arrays.at("delta"), "delta") == p.delta);
    CHECK(npy_to_float<double>(out.arrays.at("dv"), "dv") == run_pipeline(p, Backend::cpu).grads.dv);
  }

  TEST_CASE("invalid data: one line naming the tensor and exit 2 with no output and an old bundle kept") {
    Scratch tmp;
    const Problem<double> good = random_problem<double>(kShape, make_options(4), test_seed() + 4);
    write_problem(tmp / "in", good);
    REQUIRE(dma_run(tmp, "--in " + (tmp / "in") + " --out " + (tmp / "old") + " --window 4").code == 0);
    const std::string old_o = slurp(tmp / "old/o.npy");

    Problem<double> p = good;
    p.k[5] = std::numeric_limits<double>::quiet_NaN();
    write_problem(tmp / "nan", p);
    Run r = dma_run(tmp, "--in " + (tmp / "nan") + " --out " + (tmp / "old") + " --window 4");
    CHECK(r.code == 2);
    CHECK(r.err == "dma_run: k[0,0,0,5] is nan (inputs must be finite)\n");
    CHECK(slurp(tmp / "old/o.npy") == old_o);  // the failed run touched nothing

    r = dma_run(tmp, "--in " + (tmp / "nan") + " --out " + (tmp / "fresh") + " --window 4");
    CHECK(r.code == 2);
    CHECK(!fs::exists(tmp / "fresh"));

    // shape disagreement across tensors
    fs::copy(tmp / "in", tmp / "bad_shape");
    write_npy(tmp / "bad_shape/v.npy", make_npy(std::vector<double>(8 * 11 * 2), {2, 2, 11, 4}));
    r = dma_run(tmp, "--in " + (tmp / "bad_shape") + " --out " + (tmp / "x") + " --window 4");
    CHECK(r.code == 2);
    CHECK(r.err.find("v: shape (2, 2, 11, 4) does not match") != std::string::npos);
    CHECK(count_lines(r.err) == 1);

    // a missing tensor, a wrong dtype, a window of 0, Hq % Hkv != 0
    fs::copy(tmp / "in", tmp / "no_q");
    fs::remove(tmp / "no_q/q.npy");
    r = dma_run(tmp, "--in " + (tmp / "no_q") + " --out " + (tmp / "x") + " --window 4");
    CHECK(r.code == 2);
    CHECK(r.err == "dma_run: q: missing from the bundle (q.npy)\n");
    fs::copy(tmp / "in", tmp / "f32_a");
    write_npy(tmp / "f32_a/a.npy", make_npy(std::vector<float>(4, 1.f), {4}));
    r = dma_run(tmp, "--in " + (tmp / "f32_a") + " --out " + (tmp / "x") + " --window 4");
    CHECK(r.code == 2);
    CHECK(r.err.find("a: dtype float32 differs from q's float64") != std::string::npos);
    r = dma_run(tmp, "--in " + (tmp / "in") + " --out " + (tmp / "x") + " --window 0");
    CHECK(r.code == 2);
    CHECK(r.err == "dma_run: window: w = 0 (must be >= 1)\n");
    Problem<double> gqa = random_problem<double>(make_shape(1, 3, 2, 2, 4, 4, 4), make_options(2), 1);
    write_problem(tmp / "gqa", gqa);
    r = dma_run(tmp, "--in " + (tmp / "gqa") + " --out " + (tmp / "x") + " --window 2");
    CHECK(r.code == 2);
    CHECK(r.err.find("Hq = 3 is not a multiple of Hkv = 2") != std::string::npos);
    CHECK(!fs::exists(tmp / "x"));
  }

  TEST_CASE("hostile files: each a one-line message and exit 2 and no output") {
    Scratch tmp;
    const Problem<double> good = random_problem<double>(kShape, make_options(4), test_seed() + 6);
    write_problem(tmp / "in", good);
    const std::string q_bytes = slurp(tmp / "in/q.npy");
    const size_t data_at = q_bytes.find('\n') + 1;  // the header ends with a newline
    auto patched = [&](std::string bytes, const std::string& from, const std::string& to) {
      const size_t at = bytes.find(from);
      REQUIRE(at != std::string::npos);
      return bytes.replace(at, from.size(), to);
    };
    const struct { const char* name; std::string q; const char* expect; } cases[] = {
        {"truncated", q_bytes.substr(0, q_bytes.size() - 100), "more data than the file holds"},
        {"header only", q_bytes.substr(0, 20), "truncated .npy header"},
        {"wrong magic", "PK" + q_bytes.substr(2), "bad magic"},
        {"empty file", "", "bad magic"},
        {"unsupported dtype", patched(q_bytes, "'<f8'", "'<c8'"), "unsupported dtype '<c8'"},
        {"big-endian", patched(q_bytes, "'<f8'", "'>f8'"), "big-endian"},
        {"fortran order", patched(q_bytes, "False", "True "), "Fortran-order"},
        {"absurd shape", patched(q_bytes, "(2, 4, 7, 8)", "(2, 4, 7, 99999999999999)"), "more data than the file holds"},
        {"extra data", q_bytes + std::string(16, '\0'), "data size mismatch"},
        {"integer q", patched(q_bytes, "'<f8'", "'<i8'"), "q: dtype int64 (expected float32 or float64)"},
    };
    CHECK(data_at > 10);
    for (const auto& c : cases) {
      CAPTURE(c.name);
      fs::remove_all(tmp / "bad");
      fs::copy(tmp / "in", tmp / "bad");
      std::ofstream(tmp / "bad/q.npy", std::ios::binary | std::ios::trunc) << c.q;
      const Run r = dma_run(tmp, "--in " + (tmp / "bad") + " --out " + (tmp / "out") + " --window 4");
      CHECK(r.code == 2);
      CHECK(count_lines(r.err) == 1);
      CHECK_MESSAGE(r.err.find(c.expect) != std::string::npos, r.err);
      CHECK(!fs::exists(tmp / "out"));
    }
    // an exp-form delta that overflows is named with its index
    Problem<double> hot = good;
    hot.a.assign(hot.a.size(), 500.0);
    hot.w_dt.assign(hot.w_dt.size(), 1.0);
    hot.v.assign(hot.v.size(), 1.0);
    write_problem(tmp / "hot", hot);
    const Run r = dma_run(tmp, "--in " + (tmp / "hot") + " --out " + (tmp / "out") + " --window 4");
    CHECK(r.code == 2);
    CHECK(r.err.find("dma_run: delta[0,0,0] is not finite") == 0);
    CHECK(!fs::exists(tmp / "out"));
  }

  TEST_CASE("special files as inputs and outputs that overflow float32") {
    Scratch tmp;
    const Problem<float> good = random_problem<float>(kShape, make_options(4), test_seed() + 7);
    write_problem(tmp / "in", good);
    // a folder where a tensor file should be, and a FIFO (which would block a naive reader)
    fs::copy(tmp / "in", tmp / "dir_q");
    fs::remove(tmp / "dir_q/q.npy");
    fs::create_directories(tmp / "dir_q/q.npy");
    Run r = dma_run(tmp, "--in " + (tmp / "dir_q") + " --out " + (tmp / "x") + " --window 4");
    CHECK(r.code == 2);
    CHECK(r.err.find("q.npy: not a regular file") != std::string::npos);
    fs::copy(tmp / "in", tmp / "fifo_do");
    fs::remove(tmp / "fifo_do/do.npy");
    REQUIRE(mkfifo((tmp / "fifo_do/do.npy").c_str(), 0600) == 0);
    r = dma_run(tmp, "--in " + (tmp / "fifo_do") + " --out " + (tmp / "x") + " --window 4");
    CHECK(r.code == 2);
    CHECK(r.err.find("do.npy: not a regular file") != std::string::npos);
    // finite float32 inputs whose computation overflows: a named error, never a silent NaN
    r = dma_run(tmp, "--in " + (tmp / "in") + " --out " + (tmp / "x") + " --window 4 --scale 1e39");
    CHECK(r.code == 2);
    CHECK(r.err.find("scale") != std::string::npos);
    Problem<float> hot = good;
    for (auto& x : hot.q) x = 1e20f;
    for (auto& x : hot.k) x = 1e20f;
    write_problem(tmp / "hot", hot);
    r = dma_run(tmp, "--in " + (tmp / "hot") + " --out " + (tmp / "x") + " --window 4");
    CHECK(r.code == 2);
    CHECK(r.err.find("is not finite: the computation overflowed float32") != std::string::npos);
    CHECK(count_lines(r.err) == 1);
    CHECK(!fs::exists(tmp / "x"));
  }

  TEST_CASE("re-running an output bundle uses its delta as given and says so") {
    Scratch tmp;
    write_problem(tmp / "in", random_problem<double>(kShape, make_options(4), test_seed() + 8));
    REQUIRE(dma_run(tmp, "--in " + (tmp / "in") + " --out " + (tmp / "first") + " --window 4").code == 0);
    const Run r = dma_run(tmp, "--in " + (tmp / "first") + " --out " + (tmp / "second") + " --window 4");
    REQUIRE(r.code == 0);
    CHECK(r.out.find("delta.npy is given, so w_dt and a are ignored") != std::string::npos);
    const Bundle first = read_bundle(tmp / "first"), second = read_bundle(tmp / "second");
    CHECK(!second.has("dw_dt"));
    CHECK(first.arrays.at("o").data == second.arrays.at("o").data);  // same delta, same forward
  }

  TEST_CASE("the cuda backend: unsupported head dims are bad data with or without a GPU") {
    Scratch tmp;
    write_problem(tmp / "in", random_problem<float>(make_shape(1, 2, 1, 1, 8, 8, 48), make_options(4), 9));
    const Run r = dma_run(tmp, "--in " + (tmp / "in") + " --out " + (tmp / "x") + " --window 4 --backend cuda");
#ifdef DMA_TEST_HAVE_CUDA
    CHECK(r.code == 2);
    CHECK(r.err == "dma_run: D = 48: the CUDA backend supports head dims 32, 64, 128 and 256\n");
#else
    CHECK(r.code == 3);
    CHECK(r.err == "dma_run: --backend cuda: this dma_run was built without CUDA\n");
#endif
    CHECK(!fs::exists(tmp / "x"));
  }

  TEST_CASE("the output folder is refused when it holds other files or cannot be written") {
    Scratch tmp;
    write_problem(tmp / "in", random_problem<double>(kShape, make_options(4), test_seed() + 5));
    fs::create_directories(tmp / "precious");
    std::ofstream(tmp / "precious/notes.txt") << "keep me";
    Run r = dma_run(tmp, "--in " + (tmp / "in") + " --out " + (tmp / "precious") + " --window 4");
    CHECK(r.code == 2);
    CHECK(r.err.find("not empty and not a bundle") != std::string::npos);
    CHECK(slurp(tmp / "precious/notes.txt") == "keep me");
    // a folder of other .npy files is not a bundle either
    fs::create_directories(tmp / "weights");
    fs::copy(tmp / "in/q.npy", tmp / "weights/embeddings.npy");
    r = dma_run(tmp, "--in " + (tmp / "in") + " --out " + (tmp / "weights") + " --window 4");
    CHECK(r.code == 2);
    CHECK(r.err.find("holds 'embeddings.npy'") != std::string::npos);
    CHECK(fs::exists(tmp / "weights/embeddings.npy"));
    // a folder that cannot be created, even by root
    r = dma_run(tmp, "--in " + (tmp / "in") + " --out /sys/dma_out --window 4");
    CHECK(r.code == 2);
    CHECK(count_lines(r.err) == 1);
    r = dma_run(tmp, "--in " + (tmp / "in") + " --out /nonexistent/dir/out --window 4");
    CHECK(r.code == 2);
    CHECK(count_lines(r.err) == 1);
    r = dma_run(tmp, "--in " + (tmp / "missing") + " --out " + (tmp / "x") + " --window 4");
    CHECK(r.code == 2);
    CHECK(r.err.find("not a bundle folder") != std::string::npos);
    // an empty existing folder is fine, and so is --out equal to --in (inputs are kept)
    fs::create_directories(tmp / "empty");
    CHECK(dma_run(tmp, "--in " + (tmp / "in") + " --out " + (tmp / "empty") + " --window 4").code == 0);
    CHECK(dma_run(tmp, "--in " + (tmp / "empty") + " --out " + (tmp / "empty") + " --window 4").code == 0);
    CHECK(fs::exists(tmp / "empty/q.npy"));
  }

  TEST_CASE("bad flags give the parser's message and a non-zero exit") {
    Scratch tmp;
    CHECK(dma_run(tmp, "--in a --out b").code != 0);                        // no --window
    CHECK(dma_run(tmp, "--in a --out b --window 4 --form cubic").code != 0);
    CHECK(dma_run(tmp, "--in a --out b --window four").code != 0);
    CHECK(dma_run(tmp, "--in a --out b --window 4 --backend tpu").code != 0);
    CHECK(dma_run(tmp, "--in a --out b --window 4 --scale -1").code == 2);
    CHECK(dma_run(tmp, "--in a --out b --window 4 --tile-q 0").code != 0);
  }
}

// dma_run --decode (docs/design.md §4 Decode): the full forward's o and lse, computed by prefill
// and one step per token with a cache of w keys per (sequence, delta head).
TEST_SUITE("dma_run") {
  TEST_CASE("--decode: o and lse and delta and mask equal the full forward and do is ignored") {
    Scratch tmp;
    const Shape s = make_shape(2, 4, 2, 4, 13, 13, 8);  // GQA, Hd = Hq
    const Problem<double> p = random_problem<double>(s, make_options(4), test_seed() + 20);  // with do
    write_problem(tmp / "in", p);
    const Result<double> want = run_pipeline(p, Backend::cpu);
    for (int prefill : {0, 5, 12, 13}) {
      CAPTURE(prefill);
      const std::string out = tmp / ("out" + std::to_string(prefill));
      const Run r = dma_run(tmp, "--in " + (tmp / "in") + " --out " + out + " --window 4 --decode --prefill " +
                                     std::to_string(prefill));
      REQUIRE_MESSAGE(r.code == 0, r.err);
      CHECK(r.out.find("do.npy is ignored") != std::string::npos);
      const Bundle b = read_bundle(out);
      CHECK(b.arrays.at("o").dtype == DType::f64);
      CHECK(b.arrays.at("o").shape == std::vector<int64_t>{s.B, s.Hq, s.Lq, s.D});
      CHECK(max_rel_error(npy_to_float<double>(b.arrays.at("o"), "o"), want.fwd.o) <= 1e-12);
      CHECK(max_rel_error(npy_to_float<double>(b.arrays.at("lse"), "lse"), want.fwd.lse) <= 1e-12);
      CHECK(npy_to_float<double>(b.arrays.at("delta"), "delta") == want.delta);
      CHECK(make_npy(want.mask, {s.B, s.Hd, s.Lq, s.Lk}).data == b.arrays.at("mask").data);
      CHECK(b.has("q"));
      for (const char* name : {"do", "dq", "dk", "dv", "ddelta", "dw_dt", "da"}) CHECK_MESSAGE(!b.has(name), name);
    }
    // float32 in, float32 out, the linear form
    const Problem<float> pf = random_problem<float>(s, make_options(3, true, Form::linear), test_seed() + 21, false);
    write_problem(tmp / "f32", pf);
    const Run r = dma_run(tmp, "--in " + (tmp / "f32") + " --out " + (tmp / "f32_out") + " --window 3 --form linear --decode --prefill 6");
    REQUIRE_MESSAGE(r.code == 0, r.err);
    const Bundle b = read_bundle(tmp / "f32_out");
    CHECK(b.arrays.at("o").dtype == DType::f32);
    CHECK(max_rel_error(npy_to_float<double>(b.arrays.at("o"), "o"), run_pipeline(pf, Backend::cpu).fwd.o) <= 1e-5);
  }

  TEST_CASE("--decode: refuses Lq != Lk and the non-causal mode and a prompt longer than L and the cuda backend") {
    Scratch tmp;
    write_problem(tmp / "rect", random_problem<double>(kShape, make_options(4), test_seed() + 22));  // Lq 7, Lk 11
    Run r = dma_run(tmp, "--in " + (tmp / "rect") + " --out " + (tmp / "x") + " --window 4 --decode --prefill 3");
    CHECK(r.code == 2);
    CHECK(r.err == "dma_run: --decode needs Lq == Lk (the prompt's queries, then one query per step), got Lq = 7, Lk = 11\n");
    write_problem(tmp / "sq", random_problem<double>(make_shape(1, 2, 1, 1, 6, 6, 4), make_options(4), test_seed() + 23));
    r = dma_run(tmp, "--in " + (tmp / "sq") + " --out " + (tmp / "x") + " --window 4 --decode --non-causal");
    CHECK(r.code == 2);
    CHECK(r.err == "dma_run: decode: decoding is causal (got the non-causal mode)\n");
    r = dma_run(tmp, "--in " + (tmp / "sq") + " --out " + (tmp / "x") + " --window 4 --decode --prefill 7");
    CHECK(r.code == 2);
    CHECK(r.err == "dma_run: decode: prefill of 7 tokens, expected 0 <= P <= L = 6\n");
    r = dma_run(tmp, "--in " + (tmp / "sq") + " --out " + (tmp / "x") + " --window 4 --decode --backend cuda");
    CHECK(r.code == 3);
    CHECK(count_lines(r.err) == 1);
    CHECK(dma_run(tmp, "--in " + (tmp / "sq") + " --out " + (tmp / "x") + " --window 4 --prefill 2").code != 0);  // needs --decode
    CHECK(dma_run(tmp, "--in " + (tmp / "sq") + " --out " + (tmp / "x") + " --window 4 --decode --prefill -1").code != 0);
    CHECK(!fs::exists(tmp / "x"));
  }
}
