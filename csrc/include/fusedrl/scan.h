// Masked scans along T (GAE, discounted returns, prefix sums) and the whitening statistics: the
// per-step math, shared by the C++ CPU kernel (csrc/cpu/scan.cpp) and the CUDA kernel
// (csrc/cuda/scan.cu). The Triton kernel (python/fusedrl/kernels/scan.py) mirrors these functions.
//
// The spec is python/fusedrl/reference/advantages.py (reverse_scan, next_valid, gae,
// discounted_returns, whiten, prefix_sum). For one row, walking t = T-1 .. 0 with the carries
// c (the scanned value at the next valid token) and vn (the value at the next valid token, the
// bootstrap b past the last one):
//   valid t:    delta = (r_t + gamma vn) - v_t,  A_t = delta + (gamma lam) c,  ret_t = A_t + v_t,
//               c = A_t, vn = v_t
//   masked t:   A_t = ret_t = 0, carries unchanged (skipped, not discounted; r_t, v_t unread).
// Discounted returns are the same scan with delta = r_t and decay gamma. The prefix sum walks
// t = 0 .. T-1: s = s + x_t at valid t (out_t = s), out_t = 0 at masked t.
// Whitening (verl masked_whiten): (A - mean) / sqrt(var + eps) with the mean and the unbiased
// variance over every valid token of the batch. Each row yields (n, row mean, row M2) in double
// (moments_from_shifted_sums), the rows are merged in row order (Chan et al.), so the result is
// independent of the thread split.
#pragma once

#include "fusedrl/common.h"
#include "fusedrl/moments.h"

namespace fusedrl {

// GAE's TD error at a valid token: (r + gamma * V_next) - V.
template <typename acc_t> FUSEDRL_HD acc_t gae_delta(acc_t r, acc_t v, acc_t v_next, acc_t gamma) {
  return (r + gamma * v_next) - v;
}

// One step of the reverse linear scan at a valid token: x + decay * carry.
template <typename acc_t> FUSEDRL_HD acc_t scan_step(acc_t x, acc_t carry, acc_t decay) {
  return x + decay * carry;
}

template <typename acc_t> FUSEDRL_HD acc_t whiten_value(acc_t x, acc_t mean, acc_t scale) {
  return (x - mean) * scale;
}

}  // namespace fusedrl
