// MomentLaunchers for exp_avg stored as float and exp_avg_sq as float (launch.h).
#include "launch_moments.cuh"

template struct magma::MomentLaunchers<float, float>;
