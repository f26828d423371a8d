/* A stand-in for the CUDA driver (libcuda.so.1) with the three calls Mosaic GPU's compiler
 * (MosaicGpuCompile in jax's CUDA plugin) makes before it loads a kernel: the current device
 * and its compute capability (9.0: Hopper, sm_90a), and an error's text. Loading the compiled
 * kernel (cuModuleLoadData) is missing, so the compile stops there, after its dumps.
 * benchmarks/sass_offline.py builds it with gcc. */

typedef int CUresult;  /* CUDA_SUCCESS is 0 */
typedef int CUdevice;

enum { COMPUTE_CAPABILITY_MAJOR = 75, COMPUTE_CAPABILITY_MINOR = 76 };

CUresult cuCtxGetDevice(CUdevice *device) {
  *device = 0;
  return 0;
}

CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
  (void)device;
  *value = attribute == COMPUTE_CAPABILITY_MAJOR ? 9 : 0;
  return attribute == COMPUTE_CAPABILITY_MAJOR || attribute == COMPUTE_CAPABILITY_MINOR ? 0 : 1;
}

CUresult cuGetErrorString(CUresult error, const char **text) {
  (void)error;
  *text = "not available in benchmarks/cuda_driver_stub.c (no GPU)";
  return 0;
}
