"""What a figure was measured on: the CPU, its vector units, TensorFlow's
kernel library and the core count, as one line for every benchmark to print
beside its figures (CPUs of our kind differ: AVX-512 with VNNI/AMX, where
TensorFlow runs oneDNN's kernels, or AVX2 only, where it runs Eigen's)."""

import os
import platform


def cpu_flags():
    """The CPU's feature flags (Linux), or an empty set."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model():
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def vector_units(flags=None):
    """"AVX-512 + AMX", "AVX-512 + VNNI", "AVX-512", "AVX2 only", or
    "below AVX2"."""
    flags = cpu_flags() if flags is None else flags
    if "avx512f" in flags:
        if "amx_tile" in flags:
            return "AVX-512 + AMX"
        if "avx512_vnni" in flags:
            return "AVX-512 + VNNI"
        return "AVX-512"
    return "AVX2 only" if "avx2" in flags else "below AVX2"


def describe(onednn=None):
    """One line: CPU model, vector units, cores and, when known, whether
    TensorFlow's CPU kernels are oneDNN's (`trainer.onednn_kernels_enabled`
    of the process that measured)."""
    parts = [cpu_model(), vector_units(), f"{os.cpu_count()} cores"]
    if onednn is not None:
        parts.append("TensorFlow kernels: " + ("oneDNN" if onednn else "Eigen"))
    override = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if override is not None:
        parts.append(f"TF_ENABLE_ONEDNN_OPTS={override}")
    return "CPU: " + ", ".join(parts)
