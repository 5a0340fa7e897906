// MomentLaunchers for exp_avg stored as float and exp_avg_sq as __nv_bfloat16 (launch.h).
#include "launch_moments.cuh"

template struct magma::MomentLaunchers<float, __nv_bfloat16>;
