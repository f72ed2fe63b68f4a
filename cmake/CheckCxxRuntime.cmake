# cmake -DMODULE=<shared object> [-DREADELF=readelf] [-DNM=nm] -P CheckCxxRuntime.cmake
#
# Refuses a module that carries its own C++ runtime or unwinder. It passes only when
#   - its NEEDED entries list libstdc++.so.6 and libgcc_s.so.1,
#   - its dynamic symbol table defines no __cxa_*, __gxx_personality_* or _Unwind_* symbol
#     (those are only imported), and
#   - it imports _Unwind_Resume, which every C++ cleanup calls (a static libgcc resolves it
#     inside the module and leaves no trace in the dynamic symbol table).
# Otherwise it deletes MODULE (so that nothing installs it) and fails with the reasons.
# Run by the build after linking; tests/system/test_build.py runs it on broken objects.
cmake_minimum_required(VERSION 3.26)

if(NOT MODULE OR NOT EXISTS "${MODULE}")
  message(FATAL_ERROR "CheckCxxRuntime.cmake: MODULE='${MODULE}' does not exist")
endif()
if(NOT READELF)
  set(READELF readelf)
endif()
if(NOT NM)
  set(NM nm)
endif()

execute_process(COMMAND "${READELF}" -d -W "${MODULE}" OUTPUT_VARIABLE _dynamic
                RESULT_VARIABLE _rc ERROR_VARIABLE _err)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "CheckCxxRuntime.cmake: ${READELF} -d ${MODULE} failed: ${_err}")
endif()
execute_process(COMMAND "${NM}" -D --defined-only "${MODULE}" OUTPUT_VARIABLE _defined
                RESULT_VARIABLE _rc ERROR_VARIABLE _err)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "CheckCxxRuntime.cmake: ${NM} -D --defined-only ${MODULE} failed: ${_err}")
endif()
execute_process(COMMAND "${NM}" -D --undefined-only "${MODULE}" OUTPUT_VARIABLE _undefined
                RESULT_VARIABLE _rc ERROR_VARIABLE _err)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "CheckCxxRuntime.cmake: ${NM} -D --undefined-only ${MODULE} failed: ${_err}")
endif()

set(_problems "")
string(REGEX MATCHALL "\\(NEEDED\\)[^\n]*\\[[^]\n]+\\]" _needed_lines "${_dynamic}")
set(_needed "")
foreach(_line IN LISTS _needed_lines)
  string(REGEX REPLACE ".*\\[([^]]+)\\]$" "\\1" _lib "${_line}")
  list(APPEND _needed "${_lib}")
endforeach()
if(NOT "libstdc++.so.6" IN_LIST _needed)
  list(APPEND _problems "NEEDED lacks libstdc++.so.6: libstdc++ is linked in statically \
(-static-libstdc++ or -static)")
endif()
if(NOT "libgcc_s.so.1" IN_LIST _needed)
  list(APPEND _problems "NEEDED lacks libgcc_s.so.1: the unwinder (libgcc_eh) is linked in \
statically (-static-libgcc or -static)")
endif()

# nm lines: "<address> <type> <name>[@[@]<version>]"
set(_runtime_re "^(__cxa_|__gxx_personality_|_Unwind_)")
set(_own "")
string(REPLACE "\n" ";" _lines "${_defined}")
foreach(_line IN LISTS _lines)
  if(_line MATCHES "^[0-9a-fA-F]* *[A-Za-z] ([^ @]+)")
    set(_name "${CMAKE_MATCH_1}")
    if(_name MATCHES "${_runtime_re}")
      list(APPEND _own "${_name}")
    endif()
  endif()
endforeach()
if(_own)
  list(LENGTH _own _n)
  list(SUBLIST _own 0 6 _shown)
  list(JOIN _shown ", " _shown)
  list(APPEND _problems "defines ${_n} C++ runtime symbols (${_shown}...): a private copy \
of the C++ runtime")
endif()
if(NOT _undefined MATCHES "(^|\n) *U _Unwind_Resume(@|\n|$)")
  list(APPEND _problems "does not import _Unwind_Resume: the unwinder is linked in \
statically (-static-libgcc or -static)")
endif()

if(_problems)
  file(REMOVE "${MODULE}")
  list(JOIN _problems "\n  - " _text)
  message(FATAL_ERROR
    "soslora_ext: refusing ${MODULE}: it carries its own C++ runtime or unwinder, and then every "
    "error an op raises crashes the process or loses its numbers:\n  - ${_text}\n"
    "The build removes these flags from CMAKE_*_FLAGS (CFLAGS, CXXFLAGS, LDFLAGS, CMAKE_ARGS); "
    "look for them elsewhere (the compiler command, its specs, a toolchain file). "
    "See docs/building.md, \"How the module links the C++ runtime\".")
endif()
message(STATUS "soslora_ext: ${MODULE} links libstdc++.so.6 and libgcc_s.so.1 and defines no "
               "C++ runtime symbol")
