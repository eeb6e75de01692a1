// CUDA gather/scatter of token KV between vLLM's paged layers and a canonical chunk.
//
// One launch covers every layer: the layers' base addresses sit in a device array, so a chunk of
// L layers costs one kernel, not L. Each thread moves vectors of VecT (16 bytes when every address
// and stride allows it) of one (token, head) row of K or V; threads of a block take consecutive
// vectors of a row, then consecutive rows in chunk order, so both sides stay coalesced.
// The chunk may be pinned host memory: the kernel then writes (or reads) it over the bus through
// its mapped device address, with no staging copy.
//
// Built with torch.utils.cpp_extension.load by vllm_kvcache_plugin/kernels/cuda_copy.py, only on
// machines with CUDA. Arguments are validated in Python (shapes, strides, slot range) first.

// Narrow includes on purpose: <torch/extension.h> pulls in all of ATen and triples compile time.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

struct CopyParams {
  const int64_t* layer_addrs;  // device array: byte address of element [0, 0, 0, 0] of each layer
  const int64_t* slots;        // device array: block_id * block_size + offset, one per token
  char* chunk;                 // device-accessible address of chunk element [0, 0, 0, 0, 0]
  int64_t num_layers, num_tokens, num_heads, num_kv, row_bytes, block_size;
  int64_t num_slots;  // num_blocks * block_size (slots were range-checked on the host)
  int64_t layer_block_stride, layer_head_stride, layer_token_stride;                    // bytes
  int64_t chunk_kv_stride, chunk_layer_stride, chunk_token_stride, chunk_head_stride;  // bytes
};

// Block (x: vectors of a row, y: rows) per (group of rows, layer, K/V). A row is one (token, head),
// numbered token-major like the chunk, so a block reads/writes a contiguous stretch of the chunk's
// (kv, layer) plane. Index math is 32-bit, two divisions per row; the slot split is 32-bit too
// when every slot fits (kSmallSlots), since 64-bit division is slow on GPUs.
template <typename VecT, bool kGather, bool kSmallSlots>
__global__ void kv_copy_kernel(const CopyParams p) {
  const uint32_t vecs_per_row = static_cast<uint32_t>(p.row_bytes / sizeof(VecT));
  const uint32_t num_heads = static_cast<uint32_t>(p.num_heads);
  const uint32_t num_rows = static_cast<uint32_t>(p.num_tokens) * num_heads;
  const uint32_t layer = blockIdx.y;
  const uint32_t kv = blockIdx.z;
  const char* layer_base = reinterpret_cast<const char*>(__ldg(p.layer_addrs + layer)) + kv * p.row_bytes;
  char* chunk_plane = p.chunk + kv * p.chunk_kv_stride + layer * p.chunk_layer_stride;
  for (uint32_t row = blockIdx.x * blockDim.y + threadIdx.y; row < num_rows; row += gridDim.x * blockDim.y) {
    const uint32_t token = row / num_heads;
    const uint32_t head = row - token * num_heads;
    const int64_t slot = __ldg(p.slots + token);
    int64_t block, offset;
    if constexpr (kSmallSlots) {
      const uint32_t block32 = static_cast<uint32_t>(slot) / static_cast<uint32_t>(p.block_size);
      block = block32;
      offset = static_cast<int64_t>(static_cast<uint32_t>(slot) - block32 * static_cast<uint32_t>(p.block_size));
    } else {
      block = slot / p.block_size;
      offset = slot - block * p.block_size;
    }
    const char* cache_row = layer_base + block * p.layer_block_stride + head * p.layer_head_stride +
                            offset * p.layer_token_stride;
    char* chunk_row = chunk_plane + token * p.chunk_token_stride + head * p.chunk_head_stride;
    for (uint32_t vec = threadIdx.x; vec < vecs_per_row; vec += blockDim.x) {
      const VecT* from = reinterpret_cast<const VecT*>(kGather ? cache_row : chunk_row) + vec;
      VecT* to = reinterpret_cast<VecT*>(kGather ? chunk_row : const_cast<char*>(cache_row)) + vec;
      *to = *from;
    }
  }
}

template <typename VecT, bool kGather>
void launch_vec(const CopyParams& p, cudaStream_t stream) {
  const int64_t vecs_per_row = p.row_bytes / static_cast<int64_t>(sizeof(VecT));
  const int64_t rows = p.num_tokens * p.num_heads;
  if (rows == 0 || p.num_layers == 0) return;
  constexpr int64_t kThreads = 256;
  const int64_t x = std::min<int64_t>(vecs_per_row, kThreads);
  const int64_t y = std::max<int64_t>(1, kThreads / x);
  TORCH_CHECK(p.num_layers <= 65535, "kv_copy: at most 65535 layers per launch, got ", p.num_layers);
  TORCH_CHECK(rows < (int64_t{1} << 32), "kv_copy: too many (token, head) rows: ", rows);
  const dim3 threads(static_cast<unsigned>(x), static_cast<unsigned>(y));
  const int64_t groups = std::min<int64_t>((rows + y - 1) / y, 65535);
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(p.num_layers), static_cast<unsigned>(p.num_kv));
  const bool small_slots = p.block_size > 0 && p.num_slots <= static_cast<int64_t>(UINT32_MAX);
  if (small_slots) {
    kv_copy_kernel<VecT, kGather, true><<<grid, threads, 0, stream>>>(p);
  } else {
    kv_copy_kernel<VecT, kGather, false><<<grid, threads, 0, stream>>>(p);
  }
}

template <bool kGather>
void launch(const CopyParams& p, int64_t vec_bytes, cudaStream_t stream) {
  switch (vec_bytes) {
    case 16: launch_vec<uint4, kGather>(p, stream); break;
    case 8: launch_vec<uint2, kGather>(p, stream); break;
    case 4: launch_vec<uint32_t, kGather>(p, stream); break;
    case 2: launch_vec<uint16_t, kGather>(p, stream); break;
    default: launch_vec<uint8_t, kGather>(p, stream); break;
  }
}

// The chunk's address as the device sees it: itself on the device, the mapped alias of pinned host
// memory otherwise (identical under unified addressing, but asked for rather than assumed).
char* device_address(const at::Tensor& chunk) {
  if (chunk.is_cuda()) return static_cast<char*>(chunk.data_ptr());
  TORCH_CHECK(chunk.is_pinned(), "kv_copy: a host chunk must be in pinned memory");
  void* mapped = nullptr;
  const cudaError_t status = cudaHostGetDevicePointer(&mapped, chunk.data_ptr(), 0);
  TORCH_CHECK(status == cudaSuccess, "kv_copy: pinned chunk is not mapped for the device: ",
              cudaGetErrorString(status));
  return static_cast<char*>(mapped);
}

// layer_strides: block, head, token (bytes); chunk_strides: kv, layer, token, head (bytes).
void kv_copy(const at::Tensor& layer_addrs, const at::Tensor& slots, const at::Tensor& chunk, int64_t num_heads,
             int64_t num_kv, int64_t row_bytes, int64_t block_size, int64_t num_slots, std::vector<int64_t> layer_strides,
             std::vector<int64_t> chunk_strides, int64_t vec_bytes, bool gather) {
  TORCH_CHECK(layer_addrs.is_cuda() && layer_addrs.scalar_type() == at::kLong, "kv_copy: layer_addrs must be cuda int64");
  TORCH_CHECK(slots.is_cuda() && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "kv_copy: slots must be contiguous cuda int64");
  TORCH_CHECK(layer_strides.size() == 3 && chunk_strides.size() == 4, "kv_copy: bad stride lists");
  TORCH_CHECK(row_bytes % vec_bytes == 0, "kv_copy: row of ", row_bytes, " bytes is not a multiple of ", vec_bytes);
  const c10::cuda::CUDAGuard guard(layer_addrs.device());
  CopyParams p{};
  p.layer_addrs = layer_addrs.data_ptr<int64_t>();
  p.slots = slots.data_ptr<int64_t>();
  p.chunk = device_address(chunk);
  p.num_layers = layer_addrs.numel();
  p.num_tokens = slots.numel();
  p.num_heads = num_heads;
  p.num_kv = num_kv;
  p.row_bytes = row_bytes;
  p.block_size = block_size;
  p.num_slots = num_slots;
  p.layer_block_stride = layer_strides[0];
  p.layer_head_stride = layer_strides[1];
  p.layer_token_stride = layer_strides[2];
  p.chunk_kv_stride = chunk_strides[0];
  p.chunk_layer_stride = chunk_strides[1];
  p.chunk_token_stride = chunk_strides[2];
  p.chunk_head_stride = chunk_strides[3];
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (gather) {
    launch<true>(p, vec_bytes, stream);
  } else {
    launch<false>(p, vec_bytes, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!chunk.is_cuda()) {
    // The host reads (gather) or may reuse (scatter) the pinned chunk as soon as we return.
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vllm-kvcache-plugin: one-launch gather/scatter of token KV across all layers";
  m.def("kv_copy", &kv_copy, "gather (cache -> chunk) or scatter (chunk -> cache) of token KV",
        py::arg("layer_addrs"), py::arg("slots"), py::arg("chunk"), py::arg("num_heads"), py::arg("num_kv"),
        py::arg("row_bytes"), py::arg("block_size"), py::arg("num_slots"), py::arg("layer_strides"),
        py::arg("chunk_strides"),
        py::arg("vec_bytes"), py::arg("gather"));
}
