#include "model.hpp"

#include <algorithm>
#include <cctype>
#include <filesystem>

#include "heatmap.hpp"

namespace dma::viewer {

std::vector<std::string> model_layer_dirs(const std::string& dir) {
  namespace fs = std::filesystem;
  std::vector<std::pair<long long, std::string>> found;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.size() <= 6 || name.compare(0, 6, "layer_") != 0 || !it->is_directory(ec)) continue;
    const std::string digits = name.substr(6);
    if (digits.size() > 9 ||
        !std::all_of(digits.begin(), digits.end(), [](unsigned char c) { return std::isdigit(c); }))
      continue;
    found.emplace_back(std::stoll(digits), it->path().string());
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& [n, path] : found) out.push_back(path);
  return out;
}

int Model::first_readable() const {
  for (size_t i = 0; i < layers.size(); ++i)
    if (layers[i].data) return static_cast<int>(i);
  return -1;
}

int Model::max_delta_heads() const {
  int64_t n = 0;
  for (const ModelLayer& l : layers)
    if (l.data) n = std::max(n, l.data->shape.Hd);
  return static_cast<int>(n);
}

std::shared_ptr<const Model> load_model(const std::string& dir) {
  const std::vector<std::string> dirs = model_layer_dirs(dir);
  if (dirs.empty()) return nullptr;
  auto m = std::make_shared<Model>();
  m->dir = dir;
  for (const std::string& d : dirs) {
    ModelLayer l;
    l.dir = d;
    l.name = std::filesystem::path(d).filename().string();
    try {
      auto data = load_bundle_data(d, "model " + dir + ", " + l.name);
      const Shape& s = data->shape;
      if (data->bundle.has("evict")) {
        l.evict = npy_to_i64(data->bundle.arrays.at("evict"));
        l.last_allowed = causal_limits(s.Lq, s.Lk, data->causal);
        for (int64_t bd = 0; bd < s.B * s.Hd; ++bd)
          l.stats.push_back(selection_stats(l.evict.data() + bd * s.Lk, s.Lq, s.Lk, data->causal,
                                            data->labels.roles.empty() ? nullptr : &data->labels.roles));
      }
      l.data = std::move(data);
    } catch (const std::exception& e) {
      l.error = e.what();
    }
    m->layers.push_back(std::move(l));
  }
  return m;
}

}  // namespace dma::viewer
