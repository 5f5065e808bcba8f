"""Type stub for sgengine.kernels._cpu, the compiled pooling head (kernels/cpu/gem.cpp).

Called by sgengine.kernels.gem_cpu.gem_pool_cpu_native, which widens float16/bfloat16 to float32,
passes a contiguous NCHW map or a channels-last one as its [B, h, w, C] view, and the head's
constants from sgengine.head.
"""
import numpy as np
import numpy.typing as npt

threading: str
"""'openmp' or 'std::thread': how the planes are spread over threads."""

def gem_pool(x: npt.NDArray[np.float32], channels_last: bool, rgem_p: float, rgem_size: int, rgem_mix: float,
             gemp_p: float, gemp_eps: float, threads: int = 1, isa: str = "auto") -> npt.NDArray[np.float32]:
    """R-GeM + GeM+ of a float32 C-contiguous map x, [B, C, h, w] or (channels_last) [B, h, w, C],
    -> float32 [B, C]. rgem_p = 2.5 runs F^2.5 as F*F*sqrt(F); other p a log2/exp2 path; the window
    must be 5 (rgem_size), 0 < rgem_mix < 1. isa: "auto", "avx512", "avx2" or "baseline".
    ValueError, naming the argument, for another dtype (no conversion), a non-contiguous array,
    another number of dimensions, h or w < 3, an unsupported constant, threads < 1 or an isa this
    CPU lacks; TypeError for anything but a numpy array. Releases the GIL while it runs."""

def isas() -> list[str]:
    """The compiled variants this CPU can run, best first ("auto" picks the first)."""
