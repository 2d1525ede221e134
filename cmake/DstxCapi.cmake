# The C ABI (include/dstx/dstx.h, engine/capi*.cpp): libdstx.so.1 and libdstx.a, and what `cmake --install`
# puts beside them: the header, dstx.pc for pkg-config, and the CMake package for find_package(dstx).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(DSTX_ABI_VERSION 1)  # the SONAME's number; must match DSTX_ABI_VERSION in dstx.h
set(DSTX_VERSION_SCRIPT ${PROJECT_SOURCE_DIR}/packaging/libdstx.map)

# Nothing but the C ABI may be visible: the layers linked into libdstx are built with hidden symbols too
# (the version script would hide them from the dynamic table anyway; this also lets the compiler bind calls
# locally). Static linking, as the tests and the CLI do, is unaffected.
set_target_properties(dstx_compress dstx_io dstx_engine PROPERTIES
  CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON)

# Compiled once, linked into both libraries.
add_library(dstx_capi OBJECT
  engine/capi.cpp
  engine/capi_endpoints.cpp
  engine/capi_transfer.cpp)
target_include_directories(dstx_capi PUBLIC $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/include>)
target_link_libraries(dstx_capi PRIVATE dstx_engine)
target_compile_definitions(dstx_capi PRIVATE DSTX_LIBRARY_VERSION="${PROJECT_VERSION}")
# -g whatever the build type: abidw reads the public types from the debug information (tests/capi/abi).
target_compile_options(dstx_capi PRIVATE -g)
set_target_properties(dstx_capi PROPERTIES CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON)

add_library(dstx_shared SHARED $<TARGET_OBJECTS:dstx_capi>)
target_link_libraries(dstx_shared PRIVATE dstx_engine)
target_link_options(dstx_shared PRIVATE
  "LINKER:--version-script=${DSTX_VERSION_SCRIPT}"
  "LINKER:-z,defs"      # every symbol resolved at link time: no hidden dependency on the host program
  "LINKER:--as-needed")
target_include_directories(dstx_shared INTERFACE
  $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/include> $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
set_target_properties(dstx_shared PROPERTIES
  OUTPUT_NAME dstx
  SOVERSION ${DSTX_ABI_VERSION}
  VERSION ${DSTX_ABI_VERSION}.0.0
  LINK_DEPENDS ${DSTX_VERSION_SCRIPT}
  EXPORT_NAME dstx)

# The static library carries the objects of every library of ours that libdstx is made of, found by walking
# the layers' link dependencies; the same walk collects the system libraries a static consumer must link
# (for the CMake package and for dstx.pc's Libs.private). A dependency a layer adds later is picked up here
# without an edit; tests/capi (capi_c_static, capi_external_cmake) link a program against libdstx.a to prove it.
set_property(GLOBAL PROPERTY DSTX_WALK_SEEN "")
set_property(GLOBAL PROPERTY DSTX_WALK_OURS "")
set_property(GLOBAL PROPERTY DSTX_WALK_SYSTEM "")
function(dstx_walk_links item)
  if(item MATCHES "^\\$<LINK_ONLY:(.+)>$")
    set(item "${CMAKE_MATCH_1}")
  elseif(item MATCHES "^\\$<")
    message(WARNING "libdstx.a: cannot follow the link item ${item}; static consumers may miss a library")
    return()
  endif()
  get_property(seen GLOBAL PROPERTY DSTX_WALK_SEEN)
  if(item IN_LIST seen)
    return()
  endif()
  set_property(GLOBAL APPEND PROPERTY DSTX_WALK_SEEN "${item}")
  if(NOT TARGET ${item} AND item MATCHES "^([A-Za-z0-9_]+)::")
    # An imported target made by a find_package() in a layer's directory is not visible up here: find the
    # package here too.
    find_package(${CMAKE_MATCH_1} QUIET)
    if(NOT TARGET ${item})
      message(WARNING "libdstx.a: cannot resolve the link item ${item}; static consumers may miss a library")
      return()
    endif()
  endif()
  if(NOT TARGET ${item})
    set_property(GLOBAL APPEND PROPERTY DSTX_WALK_SYSTEM "${item}")  # a path, a name or a flag
    return()
  endif()
  get_target_property(imported ${item} IMPORTED)
  get_target_property(type ${item} TYPE)
  if(item STREQUAL "Threads::Threads")
    set_property(GLOBAL APPEND PROPERTY DSTX_WALK_SYSTEM "-pthread")
    return()
  endif()
  set(next "")
  if(NOT imported)
    if(type STREQUAL "STATIC_LIBRARY" OR type STREQUAL "OBJECT_LIBRARY")
      set_property(GLOBAL APPEND PROPERTY DSTX_WALK_OURS ${item})
    endif()
    if(type STREQUAL "INTERFACE_LIBRARY")
      get_target_property(next ${item} INTERFACE_LINK_LIBRARIES)
    else()
      get_target_property(next ${item} LINK_LIBRARIES)
    endif()
  else()
    foreach(prop IMPORTED_LOCATION IMPORTED_LOCATION_RELEASE IMPORTED_LOCATION_RELWITHDEBINFO
                 IMPORTED_LOCATION_NOCONFIG IMPORTED_LOCATION_DEBUG)
      get_target_property(location ${item} ${prop})
      if(location)
        set_property(GLOBAL APPEND PROPERTY DSTX_WALK_SYSTEM "${location}")
        break()
      endif()
    endforeach()
    get_target_property(next ${item} INTERFACE_LINK_LIBRARIES)
  endif()
  if(next)
    foreach(n IN LISTS next)
      dstx_walk_links("${n}")
    endforeach()
  endif()
endfunction()
dstx_walk_links(dstx_engine)
get_property(DSTX_STATIC_OURS GLOBAL PROPERTY DSTX_WALK_OURS)
get_property(dstx_system GLOBAL PROPERTY DSTX_WALK_SYSTEM)

# System libraries as link flags (dstx.pc) and as CMake link items (the installed package): by name when they
# live on the compiler's default search path, by directory and name otherwise.
set(DSTX_STATIC_PC_LIBS "")
set(DSTX_STATIC_CMAKE_LIBS "")
foreach(lib IN LISTS dstx_system)
  if(lib STREQUAL "-pthread")
    continue()  # added once, last
  elseif(lib MATCHES "^(.*)/lib([^/]+)\\.(so|a)(\\.[0-9.]+)?$")
    set(dir "${CMAKE_MATCH_1}")
    set(name "${CMAKE_MATCH_2}")
    if(dir IN_LIST CMAKE_C_IMPLICIT_LINK_DIRECTORIES OR dir IN_LIST CMAKE_CXX_IMPLICIT_LINK_DIRECTORIES)
      list(APPEND DSTX_STATIC_PC_LIBS "-l${name}")
      list(APPEND DSTX_STATIC_CMAKE_LIBS "${name}")
    else()
      list(APPEND DSTX_STATIC_PC_LIBS "-L${dir}" "-l${name}")
      list(APPEND DSTX_STATIC_CMAKE_LIBS "${lib}")
    endif()
  elseif(lib MATCHES "^-l(.+)$")
    list(APPEND DSTX_STATIC_PC_LIBS "${lib}")
    list(APPEND DSTX_STATIC_CMAKE_LIBS "${CMAKE_MATCH_1}")
  elseif(lib MATCHES "^-")
    list(APPEND DSTX_STATIC_PC_LIBS "${lib}")
    list(APPEND DSTX_STATIC_CMAKE_LIBS "${lib}")
  else()
    list(APPEND DSTX_STATIC_PC_LIBS "-l${lib}")
    list(APPEND DSTX_STATIC_CMAKE_LIBS "${lib}")
  endif()
endforeach()
# The C++ runtime, which a C program's link line lacks, and the threads.
list(APPEND DSTX_STATIC_PC_LIBS -lstdc++ -lm -pthread)
list(APPEND DSTX_STATIC_CMAKE_LIBS stdc++ m)
list(REMOVE_DUPLICATES DSTX_STATIC_PC_LIBS)
list(REMOVE_DUPLICATES DSTX_STATIC_CMAKE_LIBS)
list(JOIN DSTX_STATIC_PC_LIBS " " DSTX_PC_LIBS_PRIVATE)
message(STATUS "libdstx.a bundles ${DSTX_STATIC_OURS}; static consumers link: ${DSTX_PC_LIBS_PRIVATE}")

set(dstx_static_objects $<TARGET_OBJECTS:dstx_capi>)
foreach(t IN LISTS DSTX_STATIC_OURS)
  list(APPEND dstx_static_objects $<TARGET_OBJECTS:${t}>)
endforeach()
add_library(dstx_static STATIC ${dstx_static_objects})
add_dependencies(dstx_static ${DSTX_STATIC_OURS})
target_include_directories(dstx_static INTERFACE
  $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/include> $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
target_link_libraries(dstx_static INTERFACE
  "$<BUILD_INTERFACE:${dstx_system}>"
  "$<INSTALL_INTERFACE:${DSTX_STATIC_CMAKE_LIBS}>"
  Threads::Threads)
set_target_properties(dstx_static PROPERTIES OUTPUT_NAME dstx EXPORT_NAME dstx_static)

install(TARGETS dstx_shared dstx_static EXPORT dstxTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(FILES ${PROJECT_SOURCE_DIR}/include/dstx/dstx.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/dstx)

# dstx.pc is written at install time so that its prefix is the one installed to (cmake --install --prefix).
install(CODE "
  set(PROJECT_VERSION \"${PROJECT_VERSION}\")
  set(CMAKE_INSTALL_LIBDIR \"${CMAKE_INSTALL_LIBDIR}\")
  set(CMAKE_INSTALL_INCLUDEDIR \"${CMAKE_INSTALL_INCLUDEDIR}\")
  set(DSTX_PC_PREFIX \"\${CMAKE_INSTALL_PREFIX}\")
  set(DSTX_PC_LIBS_PRIVATE \"${DSTX_PC_LIBS_PRIVATE}\")
  configure_file(\"${PROJECT_SOURCE_DIR}/packaging/dstx.pc.in\" \"${PROJECT_BINARY_DIR}/packaging/dstx.pc\" @ONLY)
")
install(FILES ${PROJECT_BINARY_DIR}/packaging/dstx.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)

set(DSTX_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/dstx)
install(EXPORT dstxTargets NAMESPACE dstx:: DESTINATION ${DSTX_CMAKE_DIR})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/dstxConfig.cmake.in
  ${PROJECT_BINARY_DIR}/packaging/dstxConfig.cmake INSTALL_DESTINATION ${DSTX_CMAKE_DIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/packaging/dstxConfigVersion.cmake
  COMPATIBILITY SameMajorVersion)
install(FILES ${PROJECT_BINARY_DIR}/packaging/dstxConfig.cmake ${PROJECT_BINARY_DIR}/packaging/dstxConfigVersion.cmake
  DESTINATION ${DSTX_CMAKE_DIR})
