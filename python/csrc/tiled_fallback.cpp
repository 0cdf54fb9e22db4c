// Stands in for core/src/tiled.cpp when Eigen3 is not found at build time (setup.py): the same
// functions, computed by the scalar reference on the explicit mask expanded from evict. Results
// agree with the tiled code to rounding; it is slower and holds B*Hd*Lq*Lk mask bytes. No counters.
#include "dma/mask.hpp"
#include "dma/reference.hpp"
#include "dma/tiled.hpp"

#include <tuple>

namespace dma {

const char* tile_mode_name(TileMode m) {
  return m == TileMode::dense ? "dense" : m == TileMode::skip ? "skip" : "gather";
}

template <typename T>
ForwardResult<T> tiled_forward(const Shape& s, const Options& opt, const TileConfig&,
                               const std::vector<T>& q, const std::vector<T>& k,
                               const std::vector<T>& v, const std::vector<T>& delta,
                               const std::vector<int64_t>& evict, TileCounters*) {
  return reference_forward(s, opt, q, k, v, delta, mask_from_evict(s, opt, evict));
}

template <typename T>
AttentionGrads<T> tiled_backward(const Shape& s, const Options& opt, const TileConfig&,
                                 const std::vector<T>& q, const std::vector<T>& k,
                                 const std::vector<T>& v, const std::vector<T>& delta,
                                 const std::vector<int64_t>& evict, const ForwardResult<T>& fwd,
                                 const std::vector<T>& dout, TileCounters*) {
  return reference_backward(s, opt, q, k, v, delta, mask_from_evict(s, opt, evict), fwd, dout);
}

// Referencing them from a variable with external linkage instantiates and emits them for
// pipeline.cpp, which only declares them.
extern const std::tuple<decltype(&tiled_forward<float>), decltype(&tiled_forward<double>),
                        decltype(&tiled_backward<float>), decltype(&tiled_backward<double>)>
    dma_torch_fallback_instances;
const std::tuple<decltype(&tiled_forward<float>), decltype(&tiled_forward<double>),
                 decltype(&tiled_backward<float>), decltype(&tiled_backward<double>)>
    dma_torch_fallback_instances =
    std::make_tuple(&tiled_forward<float>, &tiled_forward<double>, &tiled_backward<float>,
                    &tiled_backward<double>);

}  // namespace dma
