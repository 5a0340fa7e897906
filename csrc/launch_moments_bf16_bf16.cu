// MomentLaunchers for exp_avg stored as __nv_bfloat16 and exp_avg_sq as __nv_bfloat16 (launch.h).
#include "launch_moments.cuh"

template struct magma::MomentLaunchers<__nv_bfloat16, __nv_bfloat16>;
