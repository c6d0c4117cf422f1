// Run-time choice of the instruction-set path: one table, one call.
#pragma once

#include <string>
#include <vector>

#include "fusedattn/params.h"

namespace fusedattn {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
bool isa_from_name(const std::string& name, Isa* isa);

std::vector<Isa> compiled_isas();   // built into this binary, best last
std::vector<Isa> supported_isas();  // compiled and runnable on this CPU, best last
Isa best_supported_isa();

Isa current_isa();
// Throws std::invalid_argument if `isa` is not compiled or not supported by this CPU.
void set_isa(Isa isa);

// Validates `params` (std::invalid_argument on inconsistency) and runs the selected kernel.
void attention_forward(const AttnParams& params);

int max_threads();
bool openmp_enabled();

}  // namespace fusedattn
