# Native CPU kernels: the Python extensions sgengine.kernels._cpu (kernels/cpu/gem.cpp, pooling head),
# sgengine.kernels._rerank_cpu (kernels/cpu/rerank_select.cpp, the certified bfloat16 rerank) and
# sgengine.kernels._search_cpu (kernels/cpu/search_f16.cpp, the exact first-stage scan).
# Included from the top-level CMakeLists.txt in wheel/editable builds and plain CMake builds alike
# (a plain build compiles it as a check and installs it nowhere useful; it is harmless there).
#
# Flags, and why:
# - -O3: the inner loops rely on GCC's vectorizer (-O2 before GCC 12 does not vectorize).
# - -fno-math-errno: lets sqrt compile to one instruction instead of a libm call for errno's
#   sake, which blocks vectorization. It changes no value: NaN and inf still propagate.
# - -fno-trapping-math: lets the vectorizer if-convert the clamps and selects. Results are
#   unchanged; only FP exception flags (which nothing reads) may differ.
# - no -ffast-math (it would let the compiler assume NaN never occurs and drop the checks that
#   route NaN planes to the exact path) and no -march: the kernel is built for the x86-64
#   baseline, AVX2+FMA and AVX-512 from the same source and picked at run time
#   (__builtin_cpu_supports), so one wheel runs on any x86-64 CPU.
# - OpenMP when found: the extension then shares the OpenMP runtime torch already loaded
#   (libgomp.so.1 by soname), so the two thread pools do not fight; else std::thread.
pybind11_add_module(_cpu MODULE ${CMAKE_CURRENT_LIST_DIR}/gem.cpp)
pybind11_add_module(_rerank_cpu MODULE ${CMAKE_CURRENT_LIST_DIR}/rerank_select.cpp)
pybind11_add_module(_search_cpu MODULE ${CMAKE_CURRENT_LIST_DIR}/search_f16.cpp)
find_package(OpenMP COMPONENTS CXX)
if(NOT OpenMP_CXX_FOUND)
  find_package(Threads REQUIRED)
endif()
foreach(_sg_kernel _cpu _rerank_cpu _search_cpu)
  target_compile_features(${_sg_kernel} PRIVATE cxx_std_17)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${_sg_kernel} PRIVATE -O3 -fno-math-errno -fno-trapping-math)
  elseif(MSVC)
    target_compile_options(${_sg_kernel} PRIVATE /O2)
  endif()
  if(OpenMP_CXX_FOUND)
    target_link_libraries(${_sg_kernel} PRIVATE OpenMP::OpenMP_CXX)
  else()
    target_link_libraries(${_sg_kernel} PRIVATE Threads::Threads)
  endif()
  if(SKBUILD)
    install(TARGETS ${_sg_kernel} LIBRARY DESTINATION sgengine/kernels)
  endif()
endforeach()
if(OpenMP_CXX_FOUND)
  message(STATUS "sgengine: native kernels with OpenMP ${OpenMP_CXX_VERSION}")
else()
  message(STATUS "sgengine: native kernels with std::thread (OpenMP not found)")
endif()
