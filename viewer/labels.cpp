#include "labels.hpp"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "dma/mask_rule.hpp"

namespace dma::viewer {

const char* role_name(Role r) {
  switch (r) {
    case Role::key: return "key";
    case Role::value: return "value";
    case Role::query: return "query";
    case Role::filler: return "filler";
  }
  return "?";
}

Rgba role_colour(Role r) {
  switch (r) {
    case Role::key: return {240, 130, 40, 255};    // orange
    case Role::value: return {70, 200, 110, 255};  // green
    case Role::query: return {90, 160, 255, 255};  // blue
    case Role::filler: return {110, 110, 118, 255};
  }
  return {};
}

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(start, end - start);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(std::move(line));
    start = end + 1;
  }
  return lines;
}

namespace {

bool parse_role(const std::string& s, Role* r) {
  for (Role c : {Role::key, Role::value, Role::query, Role::filler})
    if (s == role_name(c)) {
      *r = c;
      return true;
    }
  return false;
}

bool read_text(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::ostringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return true;
}

}  // namespace

TokenLabels parse_labels(const std::string* tokens_txt, const std::string* roles_txt, int64_t Lk) {
  TokenLabels out;
  auto count_error = [&](const char* file, size_t got) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "%s has %zu lines, expected Lk = %lld (one per key); not used. ",
                  file, got, static_cast<long long>(Lk));
    out.error += buf;
  };
  if (tokens_txt) {
    std::vector<std::string> lines = split_lines(*tokens_txt);
    if (static_cast<int64_t>(lines.size()) == Lk) out.tokens = std::move(lines);
    else count_error("tokens.txt", lines.size());
  }
  if (roles_txt) {
    const std::vector<std::string> lines = split_lines(*roles_txt);
    if (static_cast<int64_t>(lines.size()) != Lk) {
      count_error("roles.txt", lines.size());
    } else {
      std::vector<Role> roles(lines.size());
      for (size_t i = 0; i < lines.size(); ++i) {
        if (!parse_role(lines[i], &roles[i])) {
          out.error += "roles.txt line " + std::to_string(i + 1) + ": \"" +
                       printable_token(lines[i]) +
                       "\" is not key, value, query or filler; not used. ";
          roles.clear();
          break;
        }
      }
      out.roles = std::move(roles);
    }
  }
  if (!out.error.empty() && out.error.back() == ' ') out.error.pop_back();
  return out;
}

TokenLabels read_labels(const std::string& dir, int64_t Lk) {
  std::string tokens, roles;
  const bool has_tokens = read_text(dir + "/tokens.txt", &tokens);
  const bool has_roles = read_text(dir + "/roles.txt", &roles);
  return parse_labels(has_tokens ? &tokens : nullptr, has_roles ? &roles : nullptr, Lk);
}

std::string printable_token(const std::string& token) {
  std::string out;
  for (size_t i = 0; i < token.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(token[i]);
    // Cut at 40 bytes, never inside a UTF-8 sequence (continuation bytes are 10xxxxxx).
    if (out.size() >= 40 && (c & 0xC0) != 0x80) {
      out += "...";
      break;
    }
    if (c == '\t') out += "\\t";
    else if (c == '"') out += "\\\"";
    else if (c == '\\') out += "\\\\";
    else if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

std::string axis_label(const char* axis, int64_t index, const TokenLabels* labels,
                       int64_t position) {
  std::string s = std::string(axis) + " " + std::to_string(index);
  if (labels && position >= 0 && position < static_cast<int64_t>(labels->tokens.size()))
    s += " \"" + printable_token(labels->tokens[static_cast<size_t>(position)]) + "\"";
  if (labels && position >= 0 && position < static_cast<int64_t>(labels->roles.size()))
    s += std::string(" (") + role_name(labels->roles[static_cast<size_t>(position)]) + ")";
  return s;
}

SelectionStats selection_stats(const int64_t* evict_bh, int64_t Lq, int64_t Lk, bool causal,
                               const std::vector<Role>* roles) {
  SelectionStats st;
  st.has_roles = roles && static_cast<int64_t>(roles->size()) == Lk;
  double distance = 0;
  for (int64_t i = 0; i < Lq; ++i) {
    const int64_t p = std::min(Lk - 1, rule::query_position<int64_t>(Lq, Lk, causal, i));
    const int64_t own = i + (Lk - Lq);  // the query's own token position
    for (int64_t j = 0; j <= p; ++j) {
      if (!rule::is_kept(j, p, evict_bh[j])) continue;
      ++st.kept;
      distance += static_cast<double>(own >= j ? own - j : j - own);
      if (st.has_roles) ++st.per_role[static_cast<int>((*roles)[static_cast<size_t>(j)])];
    }
  }
  st.mean_distance = st.kept ? distance / static_cast<double>(st.kept) : 0;
  return st;
}

}  // namespace dma::viewer
