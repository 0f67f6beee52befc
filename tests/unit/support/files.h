/* SPDX-License-Identifier: MIT */
/* Small helpers the unit tests share: shell commands and whole files. */
#ifndef UQ_TEST_FILES_H
#define UQ_TEST_FILES_H

#include <stddef.h>
#include <stdint.h>

/* Run a shell command (printf-style); the test fails unless it exits 0. */
void tu_sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* The whole file at @path, malloc'd; its length in *@len. */
uint8_t *tu_slurp(const char *path, size_t *len);

#endif
