# SPDX-License-Identifier: MIT
# Write a linker version script exporting every function qcow2.h declares
# (a line starting at column 0 that names qcow2_xxx followed by '('), so the
# shared libqcow2 exports the public API and nothing of the engine's insides.
#   cmake -DHEADER=qcow2.h -DOUT=libqcow2.map -P symbols.cmake
file(STRINGS ${HEADER} lines REGEX "^[a-z].*qcow2_[a-z0-9_]+\\(")
set(syms "")
foreach(line IN LISTS lines)
	string(REGEX MATCH "qcow2_[a-z0-9_]+\\(" m "${line}")
	string(REPLACE "(" "" m "${m}")
	list(APPEND syms "${m}")
endforeach()
list(REMOVE_DUPLICATES syms)
list(LENGTH syms n)
if(n EQUAL 0)
	message(FATAL_ERROR "${HEADER}: no qcow2_ functions found")
endif()
set(text "QCOW2_0 {\n\tglobal:\n")
foreach(s IN LISTS syms)
	string(APPEND text "\t\t${s};\n")
endforeach()
string(APPEND text "\tlocal:\n\t\t*;\n};\n")
file(WRITE ${OUT}.tmp "${text}")
file(RENAME ${OUT}.tmp ${OUT})
