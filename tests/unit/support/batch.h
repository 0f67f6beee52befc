/* SPDX-License-Identifier: MIT */
/*
 * Batches of requests in flight at once through the async engine, the part
 * the batch tests (concurrency, defer, opaque) share: each test's request
 * struct begins with a struct tu_op, and the helpers walk an array of those
 * structs by its element size. What a test draws and checks stays its own.
 */
#ifndef UQ_TEST_BATCH_H
#define UQ_TEST_BATCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qcow2.h"

/* The first member of a batch test's request struct. */
struct tu_op {
	struct qcow2_req *req;
	uint64_t off, len;
	uint8_t *buf;		/* MAX_LEN bytes of the test's own */
	int res;
	bool done;
};

/* The next xorshift64 number of the sequence in *@state (reproducible runs). */
uint64_t tu_rnd(uint64_t *state);

/* Completion callback of a request whose priv is its struct tu_op. */
void tu_op_done(struct qcow2_req *req, int res, void *priv);

/*
 * @ops: @nr structs of @stride bytes, each beginning with a struct tu_op.
 * Give each a request on @img and a @buf_len buffer (aligned to @align, or
 * malloc's own with @align 0); free them again.
 */
void tu_ops_alloc(struct qcow2 *img, void *ops, size_t stride, unsigned int nr,
		  size_t buf_len, size_t align);
void tu_ops_free(void *ops, size_t stride, unsigned int nr);

/* Whether [@off, +@len) meets the range of one of the first @nr of @ops. */
bool tu_ops_overlap(const void *ops, size_t stride, unsigned int nr, uint64_t off, uint64_t len);

/* Whether all of the first @nr of @ops are done. */
bool tu_ops_done(const void *ops, size_t stride, unsigned int nr);

/*
 * Close @img, reopen @path with @opts on @io, fail unless it reads as the
 * first @size bytes of @mirror, close it and let qemu-img check judge it.
 */
void tu_reopen_verify(struct qcow2 *img, const char *path, const struct qcow2_opts *opts,
		      struct qcow2_io *io, const uint8_t *mirror, uint64_t size);

#endif
