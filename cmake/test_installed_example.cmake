# Run by ctest: install the library into BUILD_DIR/install, configure and build examples/cpp
# against that installed package, run the example. Fails on the first step that fails.
set(PREFIX "${BUILD_DIR}/install")
set(EXAMPLE_BUILD "${BUILD_DIR}/example-build")

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "failed (${rc}): ${cmd}")
  endif()
endfunction()

run(${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${PREFIX}")
set(ARGS -S "${SOURCE_DIR}/examples/cpp" -B "${EXAMPLE_BUILD}" -G "${GENERATOR}"
    "-DCMAKE_PREFIX_PATH=${PREFIX}" "-DTorch_DIR=${TORCH_PREFIX}/Torch")
if(MAKE_PROGRAM)
  list(APPEND ARGS "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(CUDA_ROOT)  # torch's CMake config on a CUDA build wants the toolkit
  list(APPEND ARGS "-DCUDA_TOOLKIT_ROOT_DIR=${CUDA_ROOT}" "-DCMAKE_CUDA_COMPILER=${CUDA_ROOT}/bin/nvcc"
       "-DCUDAToolkit_ROOT=${CUDA_ROOT}")
endif()
run(${CMAKE_COMMAND} ${ARGS})
run(${CMAKE_COMMAND} --build "${EXAMPLE_BUILD}")
run("${EXAMPLE_BUILD}/dsnt_example")
