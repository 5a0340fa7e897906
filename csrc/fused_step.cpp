// Host side of the step ops: check the inputs, sort the pieces onto the kernels that fit them,
// pack them into launches and launch on the current stream.  Nothing here reads device memory,
// so no op synchronises with the host; with found_inf > 0 every kernel returns at once.  The
// kernels are picked by the lists' dtypes: parameters, gradients and each moment (float32 or
// bfloat16, NOTE: [the rounding stream] in rounding.cuh).
//
// NOTE: [the whole step and the split step]
// fused_step runs the whole step.  moments_partials and finalize_apply run the same step in two
// halves, so that a sharded integration can all-reduce the block sums in between
// (docs/ALGORITHM.md section 3).  Run back to back they give fused_step's results bit for bit.
//
//   piece                  fused_step             moments_partials         finalize_apply
//   mask "none" / "skip"   one_pass               one_pass (whole step)    nothing
//   "magma", single pass   block                  block, + its sum rows    nothing
//   "magma", two passes    moments_sums,          moments_sums,            finalize (score part,
//                          finalize (both parts), finalize (sums part)     from the rows), apply
//                          apply                  -> its sum rows
//
// A "magma" piece takes the single pass when its blocks lie wholly inside it (it starts on a
// block boundary and ends on one or at the end of its logical tensor) and hold at most
// kMaxSinglePassBlock elements.  Its sums are then complete on this rank: moments_partials runs
// its whole step and still writes its rows, so that every row of block_sums is written.
//
// block_sums: a contiguous float32 tensor of shape (B, 3), B = sum of scores[i].numel(), one
// row per block of each piece in list order (piece 0's blocks, then piece 1's, ...): row b is
// (<m, g>, ||m||^2, ||g||^2) over this piece's elements of that block, m the first moment after
// this step's update and g the unscaled gradient.  Launches pack a subset of the pieces, so each
// piece carries the row of its first block in TensorArgs::sum_row.  Masks "none" and "skip"
// never touch block_sums (any tensor will do, e.g. of shape (0, 3)).
#include "fused_step.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <string>
#include <vector>

#include "check_message.h"
#include "keep_threshold.h"
#include "launch.h"

namespace magma {
namespace {

// MAGMA_EXT_TWO_PASS_BATCH_ELEMS=N (read once, for tuning; README.md "Building with CUDA")
// cuts the two-pass launches of a step at about N elements; by default they are not cut.
// Small batches would let the apply pass find more of what the moments pass wrote still in
// L2, but each batch costs three dependent launches of 28 KB of parameters and a partly idle
// GPU at its edges: on an H100 one batch per 256 tensors wins for LLM shapes
// (benchmarks/results/step_bench_h100_2026-11-23_two_pass_batch_4M.md).
int64_t two_pass_batch_elems() {
  static const int64_t value = [] {
    const char* text = std::getenv("MAGMA_EXT_TWO_PASS_BATCH_ELEMS");
    return text != nullptr ? std::max<int64_t>(std::atoll(text), 1) : LLONG_MAX;
  }();
  return value;
}

// Which half of the step an op runs (NOTE: [the whole step and the split step]).
enum class Phase { kWhole, kMomentsPartials, kFinalizeApply };

// The one place that maps the schema's strings to the kernels' enums.
Base parse_base(const char* op, std::string_view base) {
  if (base == "adam") return kAdam;
  if (base == "rmsprop") return kRmsprop;
  if (base == "laprop") return kLaprop;
  MAGMA_CHECK(false, op, ": base must be 'adam', 'rmsprop' or 'laprop', got '", std::string(base), "'");
}

Mask parse_mask(const char* op, std::string_view mask) {
  if (mask == "magma") return kMagma;
  if (mask == "skip") return kSkip;
  if (mask == "none") return kNone;
  MAGMA_CHECK(false, op, ": mask must be 'magma', 'skip' or 'none', got '", std::string(mask), "'");
}

struct Inputs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps;
  at::IntArrayRef tensor_indices, block_sizes, offsets, logical_numels;
};

void check_inputs(const char* op, const Inputs& in, double keep_prob) {
  const size_t n = in.params.size();
  MAGMA_CHECK(in.grads.size() == n && in.exp_avgs.size() == n && in.exp_avg_sqs.size() == n &&
                  in.scores.size() == n && in.steps.size() == n && in.tensor_indices.size() == n &&
                  in.block_sizes.size() == n && in.offsets.size() == n && in.logical_numels.size() == n,
              op, ": params, grads, exp_avgs, exp_avg_sqs, scores, steps, "
              "tensor_indices, block_sizes, offsets and logical_numels must have the same length");
  MAGMA_CHECK(in.master_params.empty() || in.master_params.size() == n,
              op, ": master_params must be empty or as long as params");
  MAGMA_CHECK(keep_prob >= 0.0 && keep_prob <= 1.0, op, ": keep_prob must be in [0, 1], got ", keep_prob);
  if (n == 0) return;
  const auto device = in.params[0].device();
  const auto param_dtype = in.params[0].scalar_type();
  const auto grad_dtype = in.grads[0].scalar_type();
  const bool rounded = in.exp_avgs[0].scalar_type() == at::kBFloat16 ||
                       in.exp_avg_sqs[0].scalar_type() == at::kBFloat16;
  // moment: float32 or bfloat16 (then one dtype for the whole list), else float32 only
  auto check_state = [&](const at::Tensor& t, const char* name, size_t i, int64_t numel,
                         at::TensorList list = {}) {
    MAGMA_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(),
                ", params[0] on ", device);
    if (list.empty()) {
      MAGMA_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, "[", i, "] must be float32, got ",
                  t.scalar_type());
    } else {
      MAGMA_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
                  "[", i, "] must be float32 or bfloat16, got ", t.scalar_type());
      MAGMA_CHECK(t.scalar_type() == list[0].scalar_type(), op, ": ", name, " must share one dtype");
    }
    MAGMA_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
    MAGMA_CHECK(t.numel() == numel, op, ": ", name, "[", i, "] has ", t.numel(),
                " elements, expected ", numel);
  };
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = in.params[i];
    const at::Tensor& g = in.grads[i];
    MAGMA_CHECK(p.is_cuda() && p.device() == device, op, ": params[", i, "] is on ", p.device(),
                ", params[0] on ", device, " (a CUDA device)");
    MAGMA_CHECK(p.scalar_type() == param_dtype, op, ": params must share one dtype");
    MAGMA_CHECK(p.is_contiguous(), op, ": params[", i, "] must be contiguous");
    MAGMA_CHECK(g.device() == device && g.is_contiguous() && g.numel() == p.numel(),
                op, ": grads[", i, "] must be a contiguous tensor like params[", i, "]");
    MAGMA_CHECK(g.scalar_type() == grad_dtype, op, ": grads must share one dtype");
    check_state(in.exp_avgs[i], "exp_avgs", i, p.numel(), in.exp_avgs);
    check_state(in.exp_avg_sqs[i], "exp_avg_sqs", i, p.numel(), in.exp_avg_sqs);
    check_state(in.steps[i], "steps", i, 1);
    if (!in.master_params.empty()) check_state(in.master_params[i], "master_params", i, p.numel());
    MAGMA_CHECK(in.block_sizes[i] >= 1, op, ": block_sizes[", i, "] must be >= 1");
    MAGMA_CHECK(in.offsets[i] >= 0 && in.offsets[i] + p.numel() <= std::abs(in.logical_numels[i]),
                op, ": piece ", i, " lies outside its logical tensor");
    MAGMA_CHECK(in.tensor_indices[i] >= 0 && in.tensor_indices[i] < (int64_t{1} << 62),
                op, ": tensor_indices[", i, "] must be in [0, 2**62)");
    const Piece piece = make_piece(p.numel(), in.block_sizes[i], in.offsets[i]);
    check_state(in.scores[i], "scores", i, num_blocks(piece));
    MAGMA_CHECK(in.offsets[i] / in.block_sizes[i] + num_blocks(piece) <= (int64_t{1} << 32),
                op, ": tensor ", i, " has more than 2**32 blocks");
    if (rounded) {  // NOTE: [the rounding stream]: elements keyed by their logical index
      MAGMA_CHECK(in.logical_numels[i] >= 0, op, ": piece ", i, " is a piece of a column slice, ",
                  "whose elements' logical indices bfloat16 moments cannot key their rounding with");
      MAGMA_CHECK(in.logical_numels[i] <= (int64_t{1} << 36), op, ": tensor ", i,
                  " has more than 2**36 elements, too many for bfloat16 moments");
    }
  }
}

void check_scalar(const char* op, const std::optional<at::Tensor>& t, const char* name,
                  const at::Device& device) {
  if (!t) return;
  MAGMA_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->numel() == 1,
              op, ": ", name, " must be a one-element float32 tensor on ", device);
}

// block_sums of mask "magma": (B, 3) float32, contiguous, on the params' device.
void check_block_sums(const char* op, const Inputs& in, const at::Tensor& block_sums) {
  int64_t rows = 0;
  for (const at::Tensor& score : in.scores) rows += score.numel();
  const bool on_device = in.params.empty() || block_sums.device() == in.params[0].device();
  MAGMA_CHECK(block_sums.dim() == 2 && block_sums.size(0) == rows && block_sums.size(1) == 3 &&
                  block_sums.scalar_type() == at::kFloat && block_sums.is_contiguous() && on_device,
              op, ": block_sums must be a contiguous float32 tensor of shape (", rows,
              ", 3) (one row per block of scores) on the params' device, got shape ",
              block_sums.sizes(), ", ", block_sums.scalar_type(), " on ", block_sums.device());
}

// The single-pass configuration that takes piece i of mask "magma" (its blocks lie wholly
// inside it and hold at most kMaxSinglePassBlock elements), or -1: the piece takes two passes.
// A negative logical_numels[i] marks a piece of a column slice, whose blocks run on through
// the other slices: never whole here.
int single_pass_config(const Inputs& in, size_t i) {
  if (in.logical_numels[i] < 0) return -1;
  const int64_t block_size = in.block_sizes[i];
  const int64_t begin = in.offsets[i];
  const int64_t end = begin + in.params[i].numel();
  const bool whole_blocks = begin % block_size == 0 && (end % block_size == 0 || end == in.logical_numels[i]);
  return whole_blocks ? block_config_for(block_size) : -1;
}

// Where a launch's block-sum rows are: rows of the op's block_sums (the split step), or of a
// buffer of the launch's own blocks (the whole step's two-pass launches).
enum class Rows { kOfList, kOfLaunch };

// Packs pieces into launches; `flush` launches what has been packed.
class Packer {
 public:
  Packer(const Inputs& in, int64_t max_elems, Rows rows) : in_(in), max_elems_(max_elems), rows_(rows) {
    reset();
  }

  // Adds piece i, `units` work units (CTAs or items), whose first block is row `sum_row` of
  // the op's block_sums.
  template <typename Flush>
  void add(const char* op, size_t i, const Piece& piece, int64_t units, int64_t sum_row, Flush&& flush) {
    MAGMA_CHECK(units <= INT_MAX, op, ": tensor ", i, " needs ", units,
                " work units, more than one launch takes; use a larger block");
    if (args_.count == kMaxTensors || args_.work_start[args_.count] + units > INT_MAX ||
        (args_.count > 0 && elems_ + piece.numel > max_elems_)) {
      flush(args_);
      reset();
    }
    const int c = args_.count;
    args_.param[c] = in_.params[i].data_ptr();
    args_.grad[c] = in_.grads[i].data_ptr();
    args_.exp_avg[c] = in_.exp_avgs[i].data_ptr();
    args_.exp_avg_sq[c] = in_.exp_avg_sqs[i].data_ptr();
    args_.master[c] = in_.master_params.empty() ? nullptr : in_.master_params[i].data_ptr<float>();
    args_.score[c] = in_.scores[i].data_ptr<float>();
    args_.step[c] = in_.steps[i].data_ptr<float>();
    args_.piece[c] = piece;
    args_.sum_row[c] = rows_ == Rows::kOfList ? sum_row : args_.block_start[c];
    args_.first_block[c] = static_cast<uint32_t>(in_.offsets[i] / in_.block_sizes[i]);  // checked
    args_.tensor_index[c] = static_cast<uint64_t>(in_.tensor_indices[i]);  // checked
    args_.offset[c] = in_.offsets[i];
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
  Rows rows_;
  int64_t elems_ = 0;
  TensorArgs args_;
};

void run(const char* op, Phase phase, const at::Tensor* block_sums, MAGMA_EXT_STEP_PARAMS) {
  const Inputs in{params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps,
                  tensor_indices, block_sizes, offsets, logical_numels};
  const Base base_id = parse_base(op, base);
  const Mask mask_id = parse_mask(op, mask);
  check_inputs(op, in, keep_prob);
  const bool split_sums = phase != Phase::kWhole && mask_id == kMagma;
  if (split_sums) check_block_sums(op, in, *block_sums);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  check_scalar(op, lr_tensor, "lr", device);
  check_scalar(op, grad_scale, "grad_scale", device);
  check_scalar(op, found_inf, "found_inf", device);
  if (phase == Phase::kFinalizeApply && mask_id != kMagma) return;  // moments_partials did it all
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const ListTypes types{params[0].scalar_type(), grads[0].scalar_type(), exp_avgs[0].scalar_type(),
                        exp_avg_sqs[0].scalar_type()};

  StepHyper hyper;
  hyper.lr = static_cast<float>(lr);
  hyper.lr_ptr = lr_tensor ? lr_tensor->data_ptr<float>() : nullptr;
  hyper.beta1 = static_cast<float>(beta1);
  hyper.beta2 = static_cast<float>(beta2);
  hyper.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  hyper.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  hyper.eps = static_cast<float>(eps);
  hyper.weight_decay = static_cast<float>(weight_decay);
  hyper.base = base_id;
  hyper.inv_keep_prob = keep_prob > 0 ? 1.f / static_cast<float>(keep_prob) : 0.f;
  hyper.keep_threshold = keep_threshold(keep_prob);
  hyper.tau = static_cast<float>(tau);
  hyper.score_ema = static_cast<float>(score_ema);
  hyper.seed = static_cast<uint64_t>(seed);
  hyper.grad_scale = grad_scale ? grad_scale->data_ptr<float>() : nullptr;
  hyper.found_inf = found_inf ? found_inf->data_ptr<float>() : nullptr;

  float* const list_sums = split_sums ? block_sums->data_ptr<float>() : nullptr;
  const auto float_options = params[0].options().dtype(at::kFloat);
  auto launch_one_pass_step = [&](const TensorArgs& args) {
    launch_one_pass(types, mask_id, args, hyper, stream);
  };
  auto launch_two_pass = [&](const TensorArgs& args) {
    const int64_t items = args.work_start[args.count];
    const int64_t blocks = args.block_start[args.count];
    switch (phase) {
      case Phase::kWhole: {
        const at::Tensor item_sums = at::empty({3 * items}, float_options);
        const at::Tensor launch_sums = at::empty({3 * blocks}, float_options);
        const at::Tensor block_scale = at::empty({blocks}, float_options);
        launch_moments_sums(types, args, hyper, item_sums.data_ptr<float>(), stream);
        launch_finalize(args, hyper, item_sums.data_ptr<float>(), launch_sums.data_ptr<float>(),
                        block_scale.data_ptr<float>(), stream);
        launch_apply(types, args, hyper, block_scale.data_ptr<float>(), stream);
        break;
      }
      case Phase::kMomentsPartials: {
        const at::Tensor item_sums = at::empty({3 * items}, float_options);
        launch_moments_sums(types, args, hyper, item_sums.data_ptr<float>(), stream);
        launch_finalize(args, hyper, item_sums.data_ptr<float>(), list_sums, nullptr, stream);
        break;
      }
      case Phase::kFinalizeApply: {
        const at::Tensor block_scale = at::empty({blocks}, float_options);
        launch_finalize(args, hyper, nullptr, list_sums, block_scale.data_ptr<float>(), stream);
        launch_apply(types, args, hyper, block_scale.data_ptr<float>(), stream);
        break;
      }
    }
  };

  Packer one_pass(in, LLONG_MAX, Rows::kOfList);
  Packer two_pass(in, two_pass_batch_elems(), phase == Phase::kWhole ? Rows::kOfLaunch : Rows::kOfList);
  std::vector<Packer> single_pass(kNumBlockConfigs, Packer(in, LLONG_MAX, Rows::kOfList));
  auto launch_single_pass = [&](int config) {
    return [&, config](const TensorArgs& args) {
      launch_block(types, static_cast<BlockConfigId>(config), args, hyper, list_sums, stream);
    };
  };
  int64_t next_row = 0;  // row of block_sums of piece i's first block
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    const Piece piece = make_piece(numel, block_sizes[i], offsets[i]);
    const int64_t sum_row = next_row;
    next_row += num_blocks(piece);
    if (numel == 0) continue;
    if (mask_id == kNone) {  // blocks do not matter: one block per tensor gives the largest items
      const Piece whole{numel, numel, numel};
      one_pass.add(op, i, whole, num_items(whole), sum_row, launch_one_pass_step);
      continue;
    }
    if (mask_id == kSkip) {
      one_pass.add(op, i, piece, num_items(piece), sum_row, launch_one_pass_step);
      continue;
    }
    const int config = single_pass_config(in, i);
    if (config < 0) {
      two_pass.add(op, i, piece, num_items(piece), sum_row, launch_two_pass);
    } else if (phase != Phase::kFinalizeApply) {  // finalize_apply: moments_partials did it all
      single_pass[config].add(op, i, piece, num_blocks(piece), sum_row, launch_single_pass(config));
    }
  }
  one_pass.finish(launch_one_pass_step);
  two_pass.finish(launch_two_pass);
  for (int config = 0; config < kNumBlockConfigs; ++config) {
    single_pass[config].finish(launch_single_pass(config));
  }
}

}  // namespace

void fused_step(MAGMA_EXT_STEP_PARAMS) {
  run("magma_ext.fused_step", Phase::kWhole, nullptr, MAGMA_EXT_STEP_ARGS);
}

void moments_partials(MAGMA_EXT_STEP_PARAMS, const at::Tensor& block_sums) {
  run("magma_ext.moments_partials", Phase::kMomentsPartials, &block_sums, MAGMA_EXT_STEP_ARGS);
}

void finalize_apply(MAGMA_EXT_STEP_PARAMS, const at::Tensor& block_sums) {
  run("magma_ext.finalize_apply", Phase::kFinalizeApply, &block_sums, MAGMA_EXT_STEP_ARGS);
}

}  // namespace magma
