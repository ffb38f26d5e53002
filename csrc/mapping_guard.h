// Input files are read through read-only memory mappings (fastmerge/io/safetensors_file.py). If a
// file is cut short while it is mapped (copied over, re-downloaded in place), touching a page past
// its new end raises SIGBUS, which ends the process on the spot: no error naming the file, and the
// hidden staged output left behind. While a mapping is guarded, the SIGBUS handler here instead
// maps a page of zeros over the faulting page, so the read goes on, and marks the mapping as cut;
// the output is then refused before it is committed (fastmerge/io/mapping_guard.py). Faults
// outside guarded mappings go to the handler that was there before. Linux only: elsewhere
// guard_mapping returns -1 and nothing is guarded.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastmerge {

// Guards [begin, begin + length); returns the mapping's slot, or -1 where it cannot be guarded.
int guard_mapping(std::uintptr_t begin, std::size_t length);
// Stops guarding the mapping in `slot` (it is about to be unmapped).
void unguard_mapping(int slot);
// Whether a page of the mapping in `slot` was found past the end of its file.
bool mapping_cut_short(int slot);
// How many pages past the end of a guarded file were touched in this process so far.
std::uint64_t cut_short_pages();

}  // namespace fastmerge
