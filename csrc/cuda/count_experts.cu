// CUDA twin of count_experts: counts selections on the device, with no host synchronisation,
// so a router hook can keep live per-expert usage on the GPU during decode.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

namespace {

template <typename T>
__global__ void count_kernel(const T* __restrict__ ids, int64_t n, int64_t layers, int64_t top_k,
                             int64_t num_experts, unsigned long long* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const int64_t e = static_cast<int64_t>(ids[i]);
    // Out-of-range ids are ignored on the device (no host check, which would sync); negative
    // ids mark missing or dropped slots.
    if (e >= 0 && e < num_experts) {
      const int64_t layer = (i / top_k) % layers;
      atomicAdd(out + layer * num_experts + e, 1ULL);
    }
  }
}

}  // namespace

torch::Tensor count_experts_cuda(const torch::Tensor& ids, int64_t num_experts) {
  auto c = ids.contiguous();
  auto out = torch::zeros({c.size(1), num_experts}, c.options().dtype(torch::kInt64));
  const int64_t n = c.numel();
  if (n == 0) return out;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 4096));
  auto stream = at::cuda::getCurrentCUDAStream();
  auto* dst = reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>());
  if (c.scalar_type() == torch::kInt16) {
    count_kernel<<<blocks, threads, 0, stream>>>(c.data_ptr<int16_t>(), n, c.size(1), c.size(2), num_experts, dst);
  } else if (c.scalar_type() == torch::kInt32) {
    count_kernel<<<blocks, threads, 0, stream>>>(c.data_ptr<int32_t>(), n, c.size(1), c.size(2), num_experts, dst);
  } else if (c.scalar_type() == torch::kInt64) {
    count_kernel<<<blocks, threads, 0, stream>>>(c.data_ptr<int64_t>(), n, c.size(1), c.size(2), num_experts, dst);
  } else {
    TORCH_CHECK(false, "count_experts: ids must be int16, int32 or int64, got ", c.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
