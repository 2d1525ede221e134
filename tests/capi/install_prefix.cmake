# CTest fixture: installs the build tree into a fresh prefix inside the build directory.
#   cmake -DBUILD_DIR=... -DPREFIX=... -DWORK=... -P install_prefix.cmake
# WORK (the C and external-project builds) is emptied too, so that every run starts from scratch.
file(REMOVE_RECURSE "${PREFIX}" "${WORK}")
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}"
  RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install failed (${rc}): build every target first (cmake --build)")
endif()
foreach(f include/dstx/dstx.h)
  if(NOT EXISTS "${PREFIX}/${f}")
    message(FATAL_ERROR "${PREFIX}/${f} was not installed")
  endif()
endforeach()
