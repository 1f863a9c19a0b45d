"""The kernels as torch operators (one file per primitive; fusedrl.ops.library says how they are
registered) and the normalization of the kernel paths (fusedrl.ops.normalizers)."""
