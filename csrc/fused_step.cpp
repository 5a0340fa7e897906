// Host side of the fused step: check the inputs, sort the tensors onto the kernels that fit
// them, pack them into launches and launch on the current stream.  Nothing here reads device
// memory, so the step never synchronises with the host.
#include "fused_step.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <vector>

#include "launch.h"
#include "keep_threshold.h"

namespace magma {
namespace {

// Two-pass launches can be cut at this many elements (MAGMA_EXT_TWO_PASS_BATCH_ELEMS, for
// tuning); by default they are not.  Small batches would let the apply pass find more of what
// the moments pass wrote still in L2, but each batch costs three dependent launches of 27 KB of
// parameters and a partly idle GPU at its edges: on an H100 one batch per 256 tensors wins for
// LLM shapes (benchmarks/results).
int64_t two_pass_batch_elems() {
  static const int64_t value = [] {
    const char* text = std::getenv("MAGMA_EXT_TWO_PASS_BATCH_ELEMS");
    return text != nullptr ? std::max<int64_t>(std::atoll(text), 1) : LLONG_MAX;
  }();
  return value;
}

struct Inputs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps;
  at::IntArrayRef tensor_indices, block_sizes, offsets, logical_numels;
};

void check_inputs(const Inputs& in, int64_t base, int64_t mask, double keep_prob) {
  const size_t n = in.params.size();
  TORCH_CHECK(in.grads.size() == n && in.exp_avgs.size() == n && in.exp_avg_sqs.size() == n &&
                  in.scores.size() == n && in.steps.size() == n && in.tensor_indices.size() == n &&
                  in.block_sizes.size() == n && in.offsets.size() == n && in.logical_numels.size() == n,
              "magma_ext.fused_step: params, grads, exp_avgs, exp_avg_sqs, scores, steps, "
              "tensor_indices, block_sizes, offsets and logical_numels must have the same length");
  TORCH_CHECK(in.master_params.empty() || in.master_params.size() == n,
              "magma_ext.fused_step: master_params must be empty or as long as params");
  TORCH_CHECK(base >= kAdam && base <= kLaprop, "magma_ext.fused_step: unknown base ", base);
  TORCH_CHECK(mask >= kMagma && mask <= kNone, "magma_ext.fused_step: unknown mask ", mask);
  TORCH_CHECK(keep_prob >= 0.0 && keep_prob <= 1.0, "magma_ext.fused_step: keep_prob must be in [0, 1]");
  if (n == 0) return;
  const auto device = in.params[0].device();
  const auto param_dtype = in.params[0].scalar_type();
  const auto grad_dtype = in.grads[0].scalar_type();
  auto check_state = [&](const at::Tensor& t, const char* name, size_t i, int64_t numel) {
    TORCH_CHECK(t.device() == device, "magma_ext.fused_step: ", name, "[", i, "] is on ", t.device(),
                ", params[0] on ", device);
    TORCH_CHECK(t.scalar_type() == at::kFloat, "magma_ext.fused_step: ", name, "[", i, "] must be float32");
    TORCH_CHECK(t.is_contiguous(), "magma_ext.fused_step: ", name, "[", i, "] must be contiguous");
    TORCH_CHECK(t.numel() == numel, "magma_ext.fused_step: ", name, "[", i, "] has ", t.numel(),
                " elements, expected ", numel);
  };
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = in.params[i];
    const at::Tensor& g = in.grads[i];
    TORCH_CHECK(p.is_cuda() && p.device() == device, "magma_ext.fused_step: params[", i,
                "] is on ", p.device(), ", params[0] on ", device);
    TORCH_CHECK(p.scalar_type() == param_dtype, "magma_ext.fused_step: params must share one dtype");
    TORCH_CHECK(p.is_contiguous(), "magma_ext.fused_step: params[", i, "] must be contiguous");
    TORCH_CHECK(g.device() == device && g.is_contiguous() && g.numel() == p.numel(),
                "magma_ext.fused_step: grads[", i, "] must be a contiguous tensor like params[", i, "]");
    TORCH_CHECK(g.scalar_type() == grad_dtype, "magma_ext.fused_step: grads must share one dtype");
    check_state(in.exp_avgs[i], "exp_avgs", i, p.numel());
    check_state(in.exp_avg_sqs[i], "exp_avg_sqs", i, p.numel());
    check_state(in.steps[i], "steps", i, 1);
    if (!in.master_params.empty()) check_state(in.master_params[i], "master_params", i, p.numel());
    TORCH_CHECK(in.block_sizes[i] >= 1, "magma_ext.fused_step: block_sizes[", i, "] must be >= 1");
    TORCH_CHECK(in.offsets[i] >= 0 && in.offsets[i] + p.numel() <= in.logical_numels[i],
                "magma_ext.fused_step: piece ", i, " lies outside its logical tensor");
    TORCH_CHECK(in.tensor_indices[i] >= 0 && in.tensor_indices[i] <= int64_t{UINT32_MAX},
                "magma_ext.fused_step: tensor_indices[", i, "] must fit in 32 bits");
    const Piece piece = make_piece(p.numel(), in.block_sizes[i], in.offsets[i]);
    check_state(in.scores[i], "scores", i, num_blocks(piece));
    TORCH_CHECK(in.offsets[i] / in.block_sizes[i] + num_blocks(piece) <= (int64_t{1} << 32),
                "magma_ext.fused_step: tensor ", i, " has more than 2**32 blocks");
  }
}

void check_scalar(const std::optional<at::Tensor>& t, const char* name, const at::Device& device) {
  if (!t) return;
  TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->numel() == 1,
              "magma_ext.fused_step: ", name, " must be a one-element float32 tensor on ", device);
}

bool whole_blocks(int64_t numel, int64_t block_size, int64_t offset, int64_t logical_numel) {
  const int64_t end = offset + numel;
  return offset % block_size == 0 && (end % block_size == 0 || end == logical_numel);
}

// Packs tensors into launches; `flush` launches what has been packed.
class Packer {
 public:
  Packer(const Inputs& in, int64_t max_elems) : in_(in), max_elems_(max_elems) { reset(); }

  template <typename Flush>
  void add(size_t i, const Piece& piece, int64_t units, Flush&& flush) {
    TORCH_CHECK(units <= INT_MAX, "magma_ext.fused_step: tensor ", i, " needs ", units,
                " work units, more than one launch takes; use a larger block");
    if (args_.count == kMaxTensors || args_.work_start[args_.count] + units > INT_MAX ||
        (args_.count > 0 && elems_ + piece.numel > max_elems_)) {
      flush(args_);
      reset();
    }
    const int c = args_.count;
    args_.param[c] = in_.params[i].data_ptr();
    args_.grad[c] = in_.grads[i].data_ptr();
    args_.exp_avg[c] = in_.exp_avgs[i].data_ptr<float>();
    args_.exp_avg_sq[c] = in_.exp_avg_sqs[i].data_ptr<float>();
    args_.master[c] = in_.master_params.empty() ? nullptr : in_.master_params[i].data_ptr<float>();
    args_.score[c] = in_.scores[i].data_ptr<float>();
    args_.step[c] = in_.steps[i].data_ptr<float>();
    args_.piece[c] = piece;
    args_.first_block[c] = in_.offsets[i] / in_.block_sizes[i];
    args_.tensor_index[c] = static_cast<uint32_t>(in_.tensor_indices[i]);
    args_.work_start[c + 1] = args_.work_start[c] + units;
    args_.block_start[c + 1] = args_.block_start[c] + num_blocks(piece);
    args_.count = c + 1;
    elems_ += piece.numel;
  }

  template <typename Flush>
  void finish(Flush&& flush) {
    if (args_.count > 0) flush(args_);
    reset();
  }

 private:
  void reset() {
    args_.count = 0;
    args_.work_start[0] = 0;
    args_.block_start[0] = 0;
    elems_ = 0;
  }
  const Inputs& in_;
  int64_t max_elems_;
  int64_t elems_ = 0;
  TensorArgs args_;
};

}  // namespace

void fused_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList scores, at::TensorList master_params,
                at::TensorList steps, at::IntArrayRef tensor_indices, at::IntArrayRef block_sizes,
                at::IntArrayRef offsets, at::IntArrayRef logical_numels, double lr,
                const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                double weight_decay, int64_t base, int64_t mask, double keep_prob, double tau,
                double score_ema, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf) {
  const Inputs in{params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps,
                  tensor_indices, block_sizes, offsets, logical_numels};
  check_inputs(in, base, mask, keep_prob);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  check_scalar(lr_tensor, "lr", device);
  check_scalar(grad_scale, "grad_scale", device);
  check_scalar(found_inf, "found_inf", device);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const at::ScalarType param_dtype = params[0].scalar_type();
  const at::ScalarType grad_dtype = grads[0].scalar_type();

  StepHyper hyper;
  hyper.lr = static_cast<float>(lr);
  hyper.lr_ptr = lr_tensor ? lr_tensor->data_ptr<float>() : nullptr;
  hyper.beta1 = static_cast<float>(beta1);
  hyper.beta2 = static_cast<float>(beta2);
  hyper.eps = static_cast<float>(eps);
  hyper.weight_decay = static_cast<float>(weight_decay);
  hyper.base = static_cast<int>(base);
  hyper.inv_keep_prob = keep_prob > 0 ? 1.f / static_cast<float>(keep_prob) : 0.f;
  hyper.keep_threshold = keep_threshold(keep_prob);
  hyper.tau = static_cast<float>(tau);
  hyper.score_ema = static_cast<float>(score_ema);
  hyper.seed = static_cast<uint64_t>(seed);
  hyper.grad_scale = grad_scale ? grad_scale->data_ptr<float>() : nullptr;
  hyper.found_inf = found_inf ? found_inf->data_ptr<float>() : nullptr;

  const auto float_options = params[0].options().dtype(at::kFloat);
  auto launch_moments_only = [&](const TensorArgs& args) {
    launch_moments(param_dtype, grad_dtype, static_cast<int>(mask), args, hyper, nullptr, stream);
  };
  auto launch_two_pass = [&](const TensorArgs& args) {
    const int64_t items = args.work_start[args.count];
    const int64_t blocks = args.block_start[args.count];
    const at::Tensor item_sums = at::empty({3 * items}, float_options);
    const at::Tensor block_sums = at::empty({3 * blocks}, float_options);
    const at::Tensor block_scale = at::empty({blocks}, float_options);
    launch_moments(param_dtype, grad_dtype, kMagma, args, hyper, item_sums.data_ptr<float>(), stream);
    launch_finalize(args, hyper, item_sums.data_ptr<float>(), block_sums.data_ptr<float>(),
                    block_scale.data_ptr<float>(), stream);
    launch_apply(param_dtype, grad_dtype, args, hyper, block_scale.data_ptr<float>(), stream);
  };

  Packer chunked(in, LLONG_MAX);
  Packer two_pass(in, two_pass_batch_elems());
  std::vector<Packer> single_pass(4, Packer(in, LLONG_MAX));
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    if (mask == kNone) {  // blocks do not matter: one block per tensor gives the largest items
      const Piece piece{numel, numel, numel};
      chunked.add(i, piece, num_items(piece), launch_moments_only);
      continue;
    }
    const Piece piece = make_piece(numel, block_sizes[i], offsets[i]);
    if (mask == kSkip) {
      chunked.add(i, piece, num_items(piece), launch_moments_only);
      continue;
    }
    const int config = block_config_for(block_sizes[i]);
    if (config >= 0 && whole_blocks(numel, block_sizes[i], offsets[i], logical_numels[i])) {
      single_pass[config].add(i, piece, num_blocks(piece), [&](const TensorArgs& args) {
        launch_block(param_dtype, grad_dtype, config, args, hyper, stream);
      });
    } else {
      two_pass.add(i, piece, num_items(piece), launch_two_pass);
    }
  }
  chunked.finish(launch_moments_only);
  two_pass.finish(launch_two_pass);
  for (int config = 0; config < 4; ++config) {
    single_pass[config].finish([&](const TensorArgs& args) {
      launch_block(param_dtype, grad_dtype, config, args, hyper, stream);
    });
  }
}

}  // namespace magma
