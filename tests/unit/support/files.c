// SPDX-License-Identifier: MIT
#include <check.h>
#include <endian.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "files.h"

void tu_sh(const char *fmt, ...)
{
	char cmd[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	ck_assert_msg(system(cmd) == 0, "failed: %s", cmd);
}

uint8_t *tu_slurp(const char *path, size_t *len)
{
	struct stat st;
	uint8_t *buf;
	int fd = open(path, O_RDONLY);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(fstat(fd, &st), 0);
	buf = malloc(st.st_size ? st.st_size : 1);
	ck_assert_ptr_nonnull(buf);
	ck_assert_int_eq(pread(fd, buf, st.st_size, 0), st.st_size);
	close(fd);
	*len = st.st_size;
	return buf;
}

void tu_verify_image(struct qcow2 *img, const uint8_t *mirror, uint64_t size)
{
	const uint64_t chunk = 1 << 20;
	uint8_t *buf;
	uint64_t off;

	ck_assert_int_eq(posix_memalign((void **)&buf, 4096, chunk), 0);
	for (off = 0; off < size; off += chunk) {
		uint64_t n = size - off < chunk ? size - off : chunk;

		ck_assert_int_eq(qcow2_pread(img, buf, n, off), 0);
		if (memcmp(buf, mirror + off, n)) {
			uint64_t i = 0;

			while (buf[i] == mirror[off + i])
				i++;
			ck_abort_msg("mismatch at guest offset %llu", (unsigned long long)(off + i));
		}
	}
	free(buf);
}

uint64_t tu_pread_be64(const char *path, uint64_t off)
{
	uint64_t be;
	int fd = open(path, O_RDONLY);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, &be, 8, off), 8);
	close(fd);
	return be64toh(be);
}

void tu_image_fill(const char *path, uint64_t disk, uint32_t cs, unsigned int mul,
		   unsigned int salt, bool compressed, const char *snap)
{
	struct qcow2_io *io = qcow2_uring_new(32);
	uint8_t *buf = malloc(cs);
	struct qcow2 *img;
	char err[256];
	uint64_t off, i;

	ck_assert_ptr_nonnull(io);
	ck_assert_ptr_nonnull(buf);
	ck_assert_msg(qcow2_open(&img, path, NULL, io, err, sizeof(err)) == 0, "%s", err);
	for (off = 0; off < disk; off += cs) {
		if ((off / cs) % 4 == 3)
			continue;
		for (i = 0; i < cs; i++)
			buf[i] = (uint8_t)(((off + i) >> 7) * mul + salt);
		if (compressed)
			ck_assert_int_ge(qcow2_pwrite_compressed(img, buf, cs, off), 0);
		else
			ck_assert_int_eq(qcow2_pwrite(img, buf, cs, off), 0);
	}
	if (compressed)
		ck_assert_int_eq(qcow2_pwrite_compressed(img, NULL, 0, 0), 0);
	if (snap)
		ck_assert_msg(qcow2_snapshot_create(img, snap) == 0, "%s", qcow2_errmsg(img));
	ck_assert_int_eq(qcow2_close(img), 0);
	free(buf);
	qcow2_uring_free(io);
}
