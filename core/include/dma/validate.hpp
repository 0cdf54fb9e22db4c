// Input validation: every check throws dma::Error with a one-line message naming the tensor.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dma/types.hpp"

namespace dma {

// Sizes: every dimension >= 1, Hq % Hkv == 0, Hd in {Hkv, Hq}, causal needs Lq <= Lk.
void validate_shape(const Shape& s, bool causal);
// Options: window >= 1, scale finite (0 = default).
void validate_options(const Shape& s, const Options& opt);
// The softmax scale opt gives for s is a positive number representable in T (float32 or float64).
template <typename T>
void validate_scale(const Shape& s, const Options& opt);
// The parameters of the dynamic weights: w_dt (Hd, Hkv*D) and a (Hd), sizes and finiteness.
template <typename T>
void validate_dynamic_weight_params(const Shape& s, const std::vector<T>& w_dt,
                                    const std::vector<T>& a);
// A tensor has the numel its shape says.
template <typename T>
void validate_numel(const std::vector<T>& t, int64_t expected, const std::string& name);
// The flat index of the first NaN or infinity in t, or -1 when every element is finite.
template <typename T>
int64_t first_non_finite(const std::vector<T>& t);

// Every element is finite; else "q[0,1,2,3] is nan" (dims give the index layout).
template <typename T>
void validate_finite(const std::vector<T>& t, const std::vector<int64_t>& dims,
                     const std::string& name);

// Formats a flat index as "[i0,i1,...]" under dims.
std::string format_index(int64_t flat, const std::vector<int64_t>& dims);

}  // namespace dma
