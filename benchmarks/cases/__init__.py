"""Benchmark cases. Each module defines CASE (name), configs(quick) and IMPLS.

configs(quick) -> list of dicts (JSON-serializable) describing one shape/dtype each.
IMPLS: {impl name: make(config) -> step}, where make() allocates the inputs and returns a
zero-argument function running one forward+backward; `impl` names include "fusedrl" and "floor".
floor_note: what the floor measures.
"""

from benchmarks.cases import advantages, gae, linear, logprobs, policy, train_step, value

CASES = {
    logprobs.CASE: logprobs,
    advantages.CASE: advantages,
    gae.CASE: gae,
    linear.CASE: linear,
    linear.memory.CASE: linear.memory,
    policy.CASE: policy,
    train_step.CASE: train_step,
    value.CASE: value,
}
