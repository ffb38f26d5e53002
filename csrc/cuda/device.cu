// See device.h.
#include <cuda_runtime.h>

#include "device.h"

namespace fastmerge {

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error so later calls start clean
    return 0;
  }
  return count;
}

}  // namespace fastmerge
