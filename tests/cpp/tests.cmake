# ctest suite of the C++ API. One fixture step exports the default model and indexes a handful of
# photos with the Python package (the slow part, done once per ctest run); every other test
# compares what a C++ program prints with sgengine's Python API on the same input.
enable_testing()

add_executable(sgengine_embed_check ${PROJECT_SOURCE_DIR}/tests/cpp/embed_check.cpp)
target_link_libraries(sgengine_embed_check PRIVATE sgengine::embed)

set(_fixture ${PROJECT_BINARY_DIR}/cpp_fixture)
set(_check ${SGENGINE_PYTHON} ${PROJECT_SOURCE_DIR}/tests/cpp/check.py)

add_test(NAME sgengine_fixture
         COMMAND ${SGENGINE_PYTHON} ${PROJECT_SOURCE_DIR}/tests/cpp/make_fixture.py ${_fixture})
set_tests_properties(sgengine_fixture PROPERTIES FIXTURES_SETUP sgengine_fixture TIMEOUT 300)

add_test(NAME sgengine_example_matches_python
         COMMAND ${_check} example --exe $<TARGET_FILE:sgengine_search> --fixture ${_fixture} -k 5)
add_test(NAME sgengine_api_matches_python
         COMMAND ${_check} api --exe $<TARGET_FILE:sgengine_embed_check> --fixture ${_fixture} -k 5
                 --python ${SGENGINE_PYTHON})
add_test(NAME sgengine_find_package
         COMMAND ${_check} consumer --mode install --build-dir ${PROJECT_BINARY_DIR}
                 --source ${PROJECT_SOURCE_DIR} --fixture ${_fixture} -k 5 --generator ${CMAKE_GENERATOR})
add_test(NAME sgengine_add_subdirectory
         COMMAND ${_check} consumer --mode subdir --build-dir ${PROJECT_BINARY_DIR}
                 --source ${PROJECT_SOURCE_DIR} --fixture ${_fixture} -k 5 --generator ${CMAKE_GENERATOR})
set_tests_properties(sgengine_example_matches_python sgengine_api_matches_python sgengine_find_package
                     sgengine_add_subdirectory
                     PROPERTIES FIXTURES_REQUIRED sgengine_fixture TIMEOUT 300
                                FAIL_REGULAR_EXPRESSION "FAIL")
# Installs into a temporary prefix: keep it after the in-tree build is complete, and alone.
set_tests_properties(sgengine_find_package sgengine_add_subdirectory PROPERTIES RUN_SERIAL ON)
