// SPDX-License-Identifier: MIT
/* The batch tests' shared request handling and main() (batch.h). */
#include <check.h>
#include <stdlib.h>

#include "batch.h"
#include "files.h"

static struct tu_op *op_at(const void *ops, size_t stride, unsigned int i)
{
	return (struct tu_op *)((uintptr_t)ops + i * stride);
}

uint64_t tu_rnd(uint64_t *state)
{
	*state ^= *state << 13;
	*state ^= *state >> 7;
	*state ^= *state << 17;
	return *state;
}

void tu_op_done(struct qcow2_req *req, int res, void *priv)
{
	struct tu_op *o = priv;

	(void)req;
	o->res = res;
	o->done = true;
}

void tu_ops_alloc(struct qcow2 *img, void *ops, size_t stride, unsigned int nr,
		  size_t buf_len, size_t align)
{
	unsigned int i;

	for (i = 0; i < nr; i++) {
		struct tu_op *o = op_at(ops, stride, i);

		o->req = qcow2_req_new(img);
		ck_assert_ptr_nonnull(o->req);
		if (align)
			ck_assert_int_eq(posix_memalign((void **)&o->buf, align, buf_len), 0);
		else
			o->buf = malloc(buf_len);
		ck_assert_ptr_nonnull(o->buf);
	}
}

void tu_ops_free(void *ops, size_t stride, unsigned int nr)
{
	unsigned int i;

	for (i = 0; i < nr; i++) {
		struct tu_op *o = op_at(ops, stride, i);

		qcow2_req_free(o->req);
		free(o->buf);
	}
}

bool tu_ops_overlap(const void *ops, size_t stride, unsigned int nr, uint64_t off, uint64_t len)
{
	unsigned int i;

	for (i = 0; i < nr; i++) {
		const struct tu_op *o = op_at(ops, stride, i);

		if (off < o->off + o->len && o->off < off + len)
			return true;
	}
	return false;
}

bool tu_ops_done(const void *ops, size_t stride, unsigned int nr)
{
	unsigned int i;

	for (i = 0; i < nr; i++)
		if (!op_at(ops, stride, i)->done)
			return false;
	return true;
}

void tu_reopen_verify(struct qcow2 *img, const char *path, const struct qcow2_opts *opts,
		      struct qcow2_io *io, const uint8_t *mirror, uint64_t size)
{
	char err[256];

	ck_assert_int_eq(qcow2_close(img), 0);
	ck_assert_msg(qcow2_open(&img, path, opts, io, err, sizeof(err)) == 0, "%s", err);
	tu_verify_image(img, mirror, size);
	ck_assert_int_eq(qcow2_close(img), 0);
	tu_sh("qemu-img check -q %s", path);
}
