#include "dma/types.hpp"

namespace dma {

const char* form_name(Form f) { return f == Form::exp ? "exp" : "linear"; }

Form parse_form(const std::string& name) {
  if (name == "exp") return Form::exp;
  if (name == "linear") return Form::linear;
  throw Error("form: unknown '" + name + "' (expected exp or linear)");
}

}  // namespace dma
