// Token labels of a bundle from a real model (docs/design.md §4), and what a head selects in
// terms of them. Pure: no ImGui, no GL.
//
//   tokens.txt  one token string per line, Lk lines, UTF-8: the axes' tooltips name the token
//   roles.txt   one of key / value / query / filler per line, Lk lines (e.g. an MQAR-like
//               sequence: key-value pairs, then queries, filler between): coloured on the axes,
//               and the selection statistics count kept keys per role
//
// Both are optional; a file with the wrong number of lines (or an unknown role) is reported in
// `error` and left out, and the bundle opens without it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "colormap.hpp"

namespace dma::viewer {

enum class Role : uint8_t { key, value, query, filler };
const char* role_name(Role r);
Rgba role_colour(Role r);

struct TokenLabels {
  std::vector<std::string> tokens;  // Lk entries, or none
  std::vector<Role> roles;          // Lk entries, or none
  std::string error;                // what was wrong with tokens.txt or roles.txt ("" if nothing)
};

// The lines of a text: "\n" or "\r\n" separated; a final newline ends the last line (it does not
// start an empty one), so "a\nb\n" and "a\nb" are both two lines.
std::vector<std::string> split_lines(const std::string& text);

// Checks and converts already-read files (empty text: the file is absent). Never throws.
TokenLabels parse_labels(const std::string* tokens_txt, const std::string* roles_txt, int64_t Lk);
// Reads dir/tokens.txt and dir/roles.txt when present. Never throws.
TokenLabels read_labels(const std::string& dir, int64_t Lk);

// `query 180 "the"` (token at `position` when labels has tokens, else `query 180`). The token is
// shown with control characters escaped and cut at 40 bytes (at a UTF-8 boundary).
std::string axis_label(const char* axis, int64_t index, const TokenLabels* labels,
                       int64_t position);
std::string printable_token(const std::string& token);

// What one (batch, delta head) keeps, summed over its queries, from its eviction positions.
struct SelectionStats {
  int64_t kept = 0;                  // (query, key) pairs kept
  int64_t per_role[4] = {0, 0, 0, 0};  // of those, by the key's role (when roles are known)
  bool has_roles = false;
  double mean_distance = 0;          // mean |position of the query - key| over kept pairs
  double share(Role r) const { return kept ? static_cast<double>(per_role[static_cast<int>(r)]) / kept : 0; }
  double key_value_share() const { return share(Role::key) + share(Role::value); }
};
SelectionStats selection_stats(const int64_t* evict_bh, int64_t Lq, int64_t Lk, bool causal,
                               const std::vector<Role>* roles);

}  // namespace dma::viewer
