# The C++ embedding API (target sgengine::embed), its example and benchmark programs, the install
# and package-config rules, and the ctest suite. Included from the top-level CMakeLists.txt in
# plain CMake builds only: the Python wheel (scikit-build-core) does not ship it.
include(GNUInstallDirs)

# One version for the wheel and the C++ package: pyproject.toml's.
file(STRINGS ${PROJECT_SOURCE_DIR}/pyproject.toml _sgengine_version_line REGEX "^version *= *\"[0-9.]+\"")
string(REGEX REPLACE "^version *= *\"([0-9.]+)\".*" "\\1" SGENGINE_VERSION "${_sgengine_version_line}")
string(REGEX MATCH "^[0-9]+" SGENGINE_VERSION_MAJOR "${SGENGINE_VERSION}")
include(CMakePackageConfigHelpers)

if(NOT TARGET Python::Python)
  message(WARNING "sgengine: Python's embedding library (Development.Embed) was not found for "
                  "${Python_EXECUTABLE}; the C++ API (sgengine::embed) is not built. A Python built with "
                  "--enable-shared (python3-dev / the pyenv or conda default) provides it.")
  return()
endif()

# The python whose environment the embedded interpreter starts in. CMake may have found a wrapper
# (a pyenv shim, a symlink farm); the interpreter's own sys.executable is what Python's getpath
# needs to find its prefix and a virtual environment's pyvenv.cfg. Not resolved further on
# purpose: a venv's bin/python is a symlink whose location is what marks the venv.
execute_process(COMMAND "${Python_EXECUTABLE}" -c "import sys; print(sys.executable)"
                OUTPUT_VARIABLE _sgengine_python OUTPUT_STRIP_TRAILING_WHITESPACE
                RESULT_VARIABLE _sgengine_rc)
if(NOT _sgengine_rc EQUAL 0 OR _sgengine_python STREQUAL "")
  set(_sgengine_python "${Python_EXECUTABLE}")
endif()
set(SGENGINE_PYTHON "${_sgengine_python}" CACHE FILEPATH
    "python of the environment the embedded interpreter starts from (run-time override: env SGENGINE_PYTHON)")
message(STATUS "sgengine: C++ API embeds ${SGENGINE_PYTHON} (Python ${Python_VERSION})")

# Shared, with pybind11 and Python linked privately: programs using it need neither's headers and
# no Python-specific CMake, only this library (which carries libpython as a dependency and an
# RPATH to it).
add_library(sgengine_embed SHARED ${PROJECT_SOURCE_DIR}/src/cpp/engine.cpp)
add_library(sgengine::embed ALIAS sgengine_embed)
target_compile_features(sgengine_embed PUBLIC cxx_std_17)
target_include_directories(sgengine_embed PUBLIC
  $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/include>
  $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
target_link_libraries(sgengine_embed PRIVATE pybind11::embed)
target_compile_definitions(sgengine_embed PRIVATE SGENGINE_EMBED_BUILDING
                           "SGENGINE_DEFAULT_PYTHON=\"${SGENGINE_PYTHON}\"")
set_target_properties(sgengine_embed PROPERTIES
  EXPORT_NAME embed
  OUTPUT_NAME sgengine_embed
  VERSION ${SGENGINE_VERSION}
  SOVERSION ${SGENGINE_VERSION_MAJOR}
  # pybind11's internals must not be visible to (or clash with) other pybind11 code in the process.
  CXX_VISIBILITY_PRESET hidden
  VISIBILITY_INLINES_HIDDEN ON
  INSTALL_RPATH_USE_LINK_PATH ON)

add_executable(sgengine_search ${PROJECT_SOURCE_DIR}/examples/cpp/search.cpp)
target_link_libraries(sgengine_search PRIVATE sgengine::embed)
set_target_properties(sgengine_search PROPERTIES OUTPUT_NAME sgengine-search
                      INSTALL_RPATH "$ORIGIN/../${CMAKE_INSTALL_LIBDIR}")

add_executable(sgengine_bench_overhead ${PROJECT_SOURCE_DIR}/examples/cpp/bench_overhead.cpp)
target_link_libraries(sgengine_bench_overhead PRIVATE sgengine::embed)

install(TARGETS sgengine_embed sgengine_search EXPORT sgengineTargets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/sgengine DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT sgengineTargets NAMESPACE sgengine:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/sgengine)
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/sgengineConfig.cmake.in
  ${PROJECT_BINARY_DIR}/sgengineConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/sgengine)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/sgengineConfigVersion.cmake
  VERSION ${SGENGINE_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/sgengineConfig.cmake ${PROJECT_BINARY_DIR}/sgengineConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/sgengine)

# Tests: only when sgengine is the top-level project (not when a consumer add_subdirectory()s it).
if(CMAKE_SOURCE_DIR STREQUAL PROJECT_SOURCE_DIR)
  option(SGENGINE_BUILD_TESTS "ctest suite of the C++ API (needs sgengine installed for ${SGENGINE_PYTHON})" ON)
endif()
if(SGENGINE_BUILD_TESTS)
  include(${PROJECT_SOURCE_DIR}/tests/cpp/tests.cmake)
endif()
