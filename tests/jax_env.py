"""XLA settings of the test processes (and of the subprocesses tests start)."""

# LLVM optimisation of CPU code costs more compile time than the tiny test models ever save.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
