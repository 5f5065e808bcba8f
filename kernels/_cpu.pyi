"""Type stub for sgengine.kernels._cpu, the compiled CPU kernels (kernels/cpu/gem.cpp).

Call it through sgengine.kernels.gem_cpu.gem_pool_native, which validates the map, widens
float16/bfloat16 to float32, allocates the output and keeps both tensors alive.
"""

threading: str
"""'openmp' or 'std::thread': how the planes are spread over threads."""

def gem_pool(data_ptr: int, sizes: list[int], strides: list[int], out_ptr: int,
             threads: int = 1, isa: str = "auto") -> None:
    """R-GeM + GeM+ of the float32 [B, C, h, w] map at data_ptr into the contiguous float32 [B, C]
    buffer at out_ptr. strides are in elements; unit stride along w (NCHW) or C (channels-last).
    isa: "auto", "avx512", "avx2" or "baseline". Raises ValueError for other layouts, h or w < 3,
    or an isa this CPU lacks. Releases the GIL while it runs."""

def isas() -> list[str]:
    """The compiled variants this CPU can run, best first ("auto" picks the first)."""
