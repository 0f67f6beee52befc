/* SPDX-License-Identifier: MIT */
/*
 * Shared by the libFuzzer targets: the input becomes an in-memory file
 * (memfd) the engine opens by path, through one io_uring kept for the
 * whole run. Harness code: it may abort() on a broken invariant, the
 * engine it drives may not.
 */
#ifndef UQ_FUZZ_H
#define UQ_FUZZ_H

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "qcow2.h"

/* Virtual bytes a target reads or writes at most, whatever the image claims. */
#define FUZZ_IO_MAX	(256u << 10)

static inline struct qcow2_io *fuzz_io(void)
{
	static struct qcow2_io *io;

	if (!io) {
		io = qcow2_uring_new(64);
		if (!io) {
			perror("fuzz: io_uring");
			abort();
		}
	}
	return io;
}

/* The input as a file: its fd (close it), its path in @path. -1 on failure. */
static inline int fuzz_file(const uint8_t *data, size_t size, char *path, size_t pathlen)
{
	int fd = memfd_create("uq-fuzz", MFD_CLOEXEC);
	size_t done = 0;

	if (fd < 0)
		return -1;
	while (done < size) {
		ssize_t n = write(fd, data + done, size - done);

		if (n <= 0) {
			close(fd);
			return -1;
		}
		done += n;
	}
	snprintf(path, pathlen, "/proc/self/fd/%d", fd);
	return fd;
}

/* Open the input as qcow2 (read-only unless @writable), no backing file, no key. */
static inline struct qcow2 *fuzz_open(const char *path, bool writable, const char *snapshot)
{
	struct qcow2_opts opts = {
		.read_only = !writable,
		.format = "qcow2",
		.no_backing = true,
		.no_key = true,
		.snapshot = snapshot,
		/* Small caches: eviction paths get exercised, and a run is not
		 * spent setting up 32 MiB of cache for each input. */
		.l2_cache_bytes = 256 << 10,
		.refcount_cache_bytes = 64 << 10,
	};
	struct qcow2 *img;
	char err[256];

	if (qcow2_open(&img, path, &opts, fuzz_io(), err, sizeof(err)) < 0)
		return NULL;
	return img;
}

/* Read [@off, @off + @len) clamped to the disk and FUZZ_IO_MAX; results ignored. */
static inline void fuzz_read(struct qcow2 *img, uint64_t off, uint64_t len)
{
	static uint8_t buf[FUZZ_IO_MAX];
	struct qcow2_info info;

	qcow2_get_info(img, &info);
	if (off >= info.virtual_size)
		return;
	if (len > info.virtual_size - off)
		len = info.virtual_size - off;
	if (len > sizeof(buf))
		len = sizeof(buf);
	qcow2_pread(img, buf, len & ~511ull, off & ~511ull);
}

#endif
