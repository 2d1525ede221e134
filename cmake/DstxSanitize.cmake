# Sanitizer and fuzzing builds. Included from the top-level CMakeLists.txt before any target is defined, so the
# flags reach every layer, test and tool alike.
#
#   -DDSTX_SANITIZE=address,undefined   ASan + UBSan (gcc or clang); any UB report is fatal
#   -DDSTX_SANITIZE=thread              TSan
#   -DDSTX_FUZZ=ON                      libFuzzer targets in tests/fuzz (clang only); combine with address,undefined
#
# The whole suite is sanitized with gcc: clang links its sanitizer runtimes into executables only, so libdstx.so
# (linked -z defs) does not link under clang sanitizers. A clang build builds just the fuzz targets.
#
# scripts/sanitize.sh drives the three CI stages; tests/fuzz/README.md says how to fuzz by hand.
set(DSTX_SANITIZE "" CACHE STRING "Comma-separated -fsanitize= list for every target (address,undefined | thread)")
option(DSTX_FUZZ "Build the libFuzzer targets in tests/fuzz (needs clang)" OFF)

if(DSTX_SANITIZE)
  if(DSTX_SANITIZE MATCHES "thread" AND DSTX_SANITIZE MATCHES "address")
    message(FATAL_ERROR "DSTX_SANITIZE=${DSTX_SANITIZE}: ThreadSanitizer cannot be combined with AddressSanitizer")
  endif()
  # -fno-sanitize-recover: a UBSan finding stops the program, so a test that hits one fails instead of printing a
  # line nobody reads. Frame pointers keep the reports' stacks complete at -O2.
  add_compile_options(-fsanitize=${DSTX_SANITIZE} -fno-sanitize-recover=all -fno-omit-frame-pointer)
  add_link_options(-fsanitize=${DSTX_SANITIZE})
  # Lets tests skip what a sanitizer makes meaningless (peak-RSS bounds under ASan's shadow memory and
  # quarantine, wall-clock rates under TSan).
  add_compile_definitions(DSTX_SANITIZED=1)
endif()

if(DSTX_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "DSTX_FUZZ needs clang (libFuzzer): configure with -DCMAKE_CXX_COMPILER=clang++ "
                        "-DCMAKE_C_COMPILER=clang")
  endif()
  # Coverage feedback for everything the targets reach; tests/fuzz links the fuzz_* executables with
  # -fsanitize=fuzzer, which brings libFuzzer's main().
  add_compile_options(-fsanitize=fuzzer-no-link)
endif()
