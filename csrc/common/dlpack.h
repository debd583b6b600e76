// The DLPack ABI (the stable C structs every array library exports through __dlpack__), declared
// here so the kernels need no torch or NumPy headers.
#pragma once
#include <cstdint>

namespace hotops::dlpack {

enum TypeCode : uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4, kBool = 6 };
enum DeviceType : int32_t { kCPU = 1, kCUDA = 2, kCUDAHost = 3 };

struct Device {
  int32_t device_type;
  int32_t device_id;
};
struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null means compact row-major
  uint64_t byte_offset;
};
struct ManagedTensor {  // capsule "dltensor" (DLPack < 1.0)
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};
struct Version {
  uint32_t major;
  uint32_t minor;
};
constexpr uint64_t kFlagReadOnly = 1;
struct ManagedTensorVersioned {  // capsule "dltensor_versioned" (DLPack >= 1.0): has flags
  Version version;
  void* manager_ctx;
  void (*deleter)(ManagedTensorVersioned*);
  uint64_t flags;
  Tensor dl_tensor;
};

}  // namespace hotops::dlpack
