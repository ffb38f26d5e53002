// CUDA runtime queries the Python side needs before it dispatches to a CUDA kernel; built only
// with -DFASTMERGE_CUDA=ON (FASTMERGE_WITH_CUDA).
#pragma once

namespace fastmerge {

// Number of CUDA devices this process can use; 0 when there is no GPU or no (new enough) driver.
// The runtime is linked statically and loads the driver on first use, so the module imports on
// any machine and this is where a missing driver shows up.
int cuda_device_count();

}  // namespace fastmerge
