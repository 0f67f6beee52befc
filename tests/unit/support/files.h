/* SPDX-License-Identifier: MIT */
/* Small helpers the unit tests share: shell commands and whole files. */
#ifndef UQ_TEST_FILES_H
#define UQ_TEST_FILES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qcow2.h"

/* Run a shell command (printf-style); the test fails unless it exits 0. */
void tu_sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* The whole file at @path, malloc'd; its length in *@len. */
uint8_t *tu_slurp(const char *path, size_t *len);

/* Fail unless the first @size bytes of @img read back as @mirror (names the
 * first differing guest offset). */
void tu_verify_image(struct qcow2 *img, const uint8_t *mirror, uint64_t size);

/*
 * Write the first @disk bytes of the image at @path through the engine,
 * cluster (@cs bytes) by cluster, all but every fourth (a mix of allocated
 * and unallocated): compressible bytes, (guest offset >> 7) * @mul + @salt,
 * compressed if @compressed; then take the internal snapshot @snap unless
 * it is NULL.
 */
void tu_image_fill(const char *path, uint64_t disk, uint32_t cs, unsigned int mul,
		   unsigned int salt, bool compressed, const char *snap);

/* The big-endian 64-bit number at byte @off of the file at @path. */
uint64_t tu_pread_be64(const char *path, uint64_t off);

#endif
