# The module links the shared C++ runtime (libstdc++.so.6) and the shared unwinder
# (libgcc_s.so.1), the ones torch and every other library in the process use: a private copy
# of either inside the module breaks every error an op raises (docs/building.md, "How the module
# links the C++ runtime").
#
#   soslora_strip_static_runtime_flags(<var>...)   removes the flags that embed them
#   soslora_check_cxx_runtime(<target>)            refuses, after the link, a module that has them

# The flags that put a static C++ runtime or unwinder into a shared object, alone or as passed
# through nvcc (-Xcompiler=) or to the linker (-Wl,).
set(SOSLORA_STATIC_RUNTIME_FLAGS -static -static-libstdc++ -static-libgcc -static-pie --static)

# Removes SOSLORA_STATIC_RUNTIME_FLAGS from the named flag variables (normal variables of the
# caller's scope, which shadow the cache entries CFLAGS/CXXFLAGS/LDFLAGS/CMAKE_ARGS set) and
# warns once per variable about what it removed.
function(soslora_strip_static_runtime_flags)
  foreach(_var IN LISTS ARGN)
    if(NOT DEFINED ${_var})
      continue()
    endif()
    set(_value " ${${_var}} ")
    set(_removed "")
    foreach(_flag IN LISTS SOSLORA_STATIC_RUNTIME_FLAGS)
      string(REPLACE "+" "\\+" _flag_re "${_flag}")
      set(_re "[ \t](-Xcompiler[= ]|--compiler-options[= ]|-Wl,)?${_flag_re}[ \t]")
      while(_value MATCHES "${_re}")  # one occurrence at a time, each named in the warning
        set(_match "${CMAKE_MATCH_0}")
        string(FIND "${_value}" "${_match}" _at)
        string(LENGTH "${_match}" _length)
        math(EXPR _after "${_at} + ${_length}")
        string(SUBSTRING "${_value}" 0 ${_at} _head)
        string(SUBSTRING "${_value}" ${_after} -1 _tail)
        set(_value "${_head} ${_tail}")
        string(STRIP "${_match}" _match)
        list(APPEND _removed "${_match}")
      endwhile()
    endforeach()
    if(_removed)
      string(REGEX REPLACE "[ \t]+" " " _value "${_value}")
      string(STRIP "${_value}" _value)
      list(JOIN _removed " " _removed)
      message(WARNING "soslora_ext: removed `${_removed}` from ${_var}: the module links the "
                      "shared C++ runtime and unwinder (a private copy makes op errors crash)")
      set(${_var} "${_value}" PARENT_SCOPE)
    endif()
  endforeach()
endfunction()

# The flag variables of the enabled languages and of every link kind, for every configuration.
function(soslora_runtime_flag_variables out)
  set(_configs "" _DEBUG _RELEASE _RELWITHDEBINFO _MINSIZEREL)
  if(CMAKE_BUILD_TYPE)
    string(TOUPPER "_${CMAKE_BUILD_TYPE}" _bt)
    list(APPEND _configs "${_bt}")
    list(REMOVE_DUPLICATES _configs)
  endif()
  get_property(_languages GLOBAL PROPERTY ENABLED_LANGUAGES)
  set(_vars "")
  foreach(_config IN LISTS _configs)
    foreach(_lang IN LISTS _languages)
      list(APPEND _vars "CMAKE_${_lang}_FLAGS${_config}")
    endforeach()
    foreach(_kind SHARED MODULE EXE)
      list(APPEND _vars "CMAKE_${_kind}_LINKER_FLAGS${_config}")
    endforeach()
  endforeach()
  set(${out} "${_vars}" PARENT_SCOPE)
endfunction()

macro(soslora_use_shared_cxx_runtime)
  soslora_runtime_flag_variables(_soslora_flag_vars)
  soslora_strip_static_runtime_flags(${_soslora_flag_vars})
endmacro()

# After <target> links (on ELF platforms): cmake/CheckCxxRuntime.cmake reads its dynamic
# section and symbol table, and deletes it and fails the build when it breaks the rule.
function(soslora_check_cxx_runtime target)
  if(NOT CMAKE_SYSTEM_NAME STREQUAL "Linux")
    return()
  endif()
  if(NOT CMAKE_READELF OR NOT CMAKE_NM)
    message(FATAL_ERROR "soslora_ext: readelf and nm (binutils) are needed to check that the "
                        "module links the shared C++ runtime; install binutils")
  endif()
  # POST_BUILD commands run in the order they are added: this one after pybind11's strip.
  add_custom_command(TARGET ${target} POST_BUILD
    COMMAND "${CMAKE_COMMAND}" "-DMODULE=$<TARGET_FILE:${target}>"
            "-DREADELF=${CMAKE_READELF}" "-DNM=${CMAKE_NM}"
            -P "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/CheckCxxRuntime.cmake"
    COMMENT "soslora_ext: checking that $<TARGET_FILE_NAME:${target}> links the shared C++ runtime"
    VERBATIM)
endfunction()
