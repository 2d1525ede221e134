#!/bin/sh
# Builds tests/capi/test_capi.c the way a VMM's build would: against the INSTALLED header only, flags from
# `pkg-config dstx`, with -std=c11 -Wall -Werror; then runs it.
#   usage: run_c_test.sh PREFIX LIBDIR SOURCE-DIR WORK-DIR shared|static|header [DOCS.md]
#   shared: links libdstx.so.1 (pkg-config --libs); static: libdstx.a (pkg-config --static --libs);
#   header: compiles dstx.h alone under strict C and C++ settings, and the C examples of DOCS.md.
set -eu
prefix=$1 libdir=$2 src=$3 work=$4 mode=$5
docs=${6:-}
cc=${CC:-cc}
cxx=${CXX:-c++}
extra=${CAPI_CFLAGS:-}  # sanitized builds: the same -fsanitize flags as libdstx

export PKG_CONFIG_PATH="$prefix/$libdir/pkgconfig"
unset PKG_CONFIG_LIBDIR || true
if ! pkg-config --exists dstx; then
  echo "pkg-config finds no dstx in $PKG_CONFIG_PATH (did the capi_install fixture run?)" >&2
  exit 1
fi
cflags=$(pkg-config --cflags dstx)
case "$cflags" in
  *"-I$prefix/"*) ;;
  *) echo "pkg-config --cflags dstx is '$cflags', not the installed prefix $prefix" >&2; exit 1 ;;
esac
mkdir -p "$work"

case $mode in
  header)
    printf '#include <dstx/dstx.h>\nint main(void) { dstx_send_config c = DSTX_SEND_CONFIG_INIT; return (int)c.size == 0; }\n' \
      >"$work/header_c.c"
    for std in c99 c11 c17; do
      # shellcheck disable=SC2086
      "$cc" -std=$std -Wall -Wextra -Wpedantic -Werror $cflags -c "$work/header_c.c" -o "$work/header_c.o"
    done
    printf '#include <dstx/dstx.h>\nint main() { dstx_stats s{}; s.size = sizeof s; return dstx_version() == nullptr; }\n' \
      >"$work/header_cxx.cpp"
    for std in c++11 c++17 c++20; do
      # shellcheck disable=SC2086
      "$cxx" -std=$std -Wall -Wextra -Wpedantic -Werror $cflags -c "$work/header_cxx.cpp" -o "$work/header_cxx.o"
    done
    echo "dstx.h compiles alone as C99/C11/C17 and C++11/17/20 with -Wall -Wextra -Wpedantic -Werror"
    if [ -n "$docs" ]; then
      # Every ```c block of the page, in order, as one translation unit: the examples must not rot.
      awk '/^```c$/ {on = 1; next} /^```/ {on = 0} on' "$docs" >"$work/doc_examples.c"
      if [ ! -s "$work/doc_examples.c" ]; then
        echo "no C examples found in $docs"
        exit 1
      fi
      # shellcheck disable=SC2086
      "$cc" -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror -Wno-unused-function $cflags \
        -c "$work/doc_examples.c" -o "$work/doc_examples.o"
      echo "the C examples of $(basename "$docs") compile"
    fi
    echo "1 passed, 0 failed"
    exit 0
    ;;
  shared)
    libs="$(pkg-config --libs dstx) -Wl,-rpath,$(pkg-config --variable=libdir dstx)"
    ;;
  static)
    # -l:libdstx.a picks the archive even though libdstx.so sits beside it.
    libs=$(pkg-config --static --libs dstx | sed 's/-ldstx\b/-l:libdstx.a/')
    ;;
  *)
    echo "unknown mode $mode" >&2
    exit 2
    ;;
esac

exe="$work/test_capi_$mode"
# shellcheck disable=SC2086
"$cc" -std=c11 -Wall -Werror $extra $cflags "$src/test_capi.c" -o "$exe" $libs -pthread
if [ "$mode" = shared ]; then
  # The program must load the installed library, not one from the build tree.
  loaded=$(ldd "$exe" | awk '/libdstx\.so/ {print $3}')
  case "$loaded" in
    "$prefix/"*) ;;
    *) echo "test program loads libdstx from '$loaded', not from $prefix" >&2; exit 1 ;;
  esac
else
  if ldd "$exe" | grep -q libdstx; then
    echo "the static test program still needs libdstx.so" >&2
    exit 1
  fi
fi
exec "$exe"
