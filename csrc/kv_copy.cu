// CUDA gather/scatter of token KV between vLLM's paged layers and a canonical chunk.
//
// One launch covers every layer: the layers' base addresses sit in a device array, so a chunk of
// L layers costs one kernel, not L. Each thread moves one vector of VecT (16 bytes when every
// address and stride allows it) of one (layer, token, head, K/V) row; consecutive threads take
// consecutive vectors of a row, then the next row, so both sides are read and written coalesced.
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

#include <cstdint>
#include <vector>

namespace {

struct CopyParams {
  const int64_t* layer_addrs;  // device array: byte address of element [0, 0, 0, 0] of each layer
  const int64_t* slots;        // device array: block_id * block_size + offset, one per token
  char* chunk;                 // device-accessible address of chunk element [0, 0, 0, 0, 0]
  int64_t num_layers, num_tokens, num_heads, num_kv, row_bytes, block_size;
  int64_t layer_block_stride, layer_head_stride, layer_token_stride;                    // bytes
  int64_t chunk_kv_stride, chunk_layer_stride, chunk_token_stride, chunk_head_stride;  // bytes
};

template <typename VecT, typename IndexT, bool kGather>
__global__ void kv_copy_kernel(const CopyParams p) {
  const IndexT vecs_per_row = static_cast<IndexT>(p.row_bytes / sizeof(VecT));
  const IndexT rows_per_token = static_cast<IndexT>(p.num_heads * p.num_kv);
  const IndexT per_token = rows_per_token * vecs_per_row;
  const IndexT num_tokens = static_cast<IndexT>(p.num_tokens);
  const IndexT total = static_cast<IndexT>(p.num_layers) * num_tokens * per_token;
  const IndexT step = static_cast<IndexT>(gridDim.x) * blockDim.x;
  for (IndexT i = static_cast<IndexT>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const IndexT inner = i % per_token;
    const IndexT layer_token = i / per_token;
    const IndexT token = layer_token % num_tokens;
    const IndexT layer = layer_token / num_tokens;
    const IndexT vec = inner % vecs_per_row;
    const IndexT row = inner / vecs_per_row;
    const IndexT kv = row % static_cast<IndexT>(p.num_kv);
    const IndexT head = row / static_cast<IndexT>(p.num_kv);

    const int64_t slot = __ldg(p.slots + token);
    const int64_t block = slot / p.block_size;
    const int64_t offset = slot - block * p.block_size;
    const int64_t vec_bytes = static_cast<int64_t>(vec) * sizeof(VecT);
    char* cache = reinterpret_cast<char*>(__ldg(p.layer_addrs + layer)) + block * p.layer_block_stride +
                  head * p.layer_head_stride + offset * p.layer_token_stride + kv * p.row_bytes + vec_bytes;
    char* chunk = p.chunk + kv * p.chunk_kv_stride + layer * p.chunk_layer_stride +
                  token * p.chunk_token_stride + head * p.chunk_head_stride + vec_bytes;
    if constexpr (kGather) {
      *reinterpret_cast<VecT*>(chunk) = *reinterpret_cast<const VecT*>(cache);
    } else {
      *reinterpret_cast<VecT*>(cache) = *reinterpret_cast<const VecT*>(chunk);
    }
  }
}

template <typename VecT, bool kGather>
void launch_with_index(const CopyParams& p, cudaStream_t stream) {
  const int64_t total = p.num_layers * p.num_tokens * p.num_heads * p.num_kv * (p.row_bytes / sizeof(VecT));
  if (total == 0) return;
  constexpr int kThreads = 256;
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(std::min<int64_t>(wanted, static_cast<int64_t>(sms) * 32));
  if (total < (int64_t{1} << 31)) {
    kv_copy_kernel<VecT, uint32_t, kGather><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    kv_copy_kernel<VecT, uint64_t, kGather><<<blocks, kThreads, 0, stream>>>(p);
  }
}

template <bool kGather>
void launch(const CopyParams& p, int64_t vec_bytes, cudaStream_t stream) {
  switch (vec_bytes) {
    case 16: launch_with_index<uint4, kGather>(p, stream); break;
    case 8: launch_with_index<uint2, kGather>(p, stream); break;
    case 4: launch_with_index<uint32_t, kGather>(p, stream); break;
    case 2: launch_with_index<uint16_t, kGather>(p, stream); break;
    default: launch_with_index<uint8_t, kGather>(p, stream); break;
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
             int64_t num_kv, int64_t row_bytes, int64_t block_size, std::vector<int64_t> layer_strides,
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
        py::arg("row_bytes"), py::arg("block_size"), py::arg("layer_strides"), py::arg("chunk_strides"),
        py::arg("vec_bytes"), py::arg("gather"));
}
