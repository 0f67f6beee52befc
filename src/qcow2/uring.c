// SPDX-License-Identifier: MIT
/*
 * The default I/O backend: one io_uring owned by the calling thread. The host
 * tools use it; the ublk queue loop supplies its own backend on its ring.
 * Operations beyond the ring's free SQEs wait in a FIFO until space frees up.
 */
#include <liburing.h>
#include <stdlib.h>

#include "internal.h"

struct uring_io {
	struct qcow2_io io;
	struct io_uring ring;
	unsigned int inflight;
	struct qcow2_aio **backlog;	/* ring-full overflow, FIFO */
	unsigned int backlog_head, backlog_len, backlog_cap;
};

static bool uring_prep(struct uring_io *u, struct qcow2_aio *aio)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);

	if (!sqe)
		return false;
	switch (aio->op) {
	case QCOW2_AIO_READ:
		io_uring_prep_readv(sqe, aio->fd, aio->iov, aio->iovcnt, aio->off);
		break;
	case QCOW2_AIO_WRITE:
		io_uring_prep_writev(sqe, aio->fd, aio->iov, aio->iovcnt, aio->off);
		break;
	case QCOW2_AIO_FSYNC:
		io_uring_prep_fsync(sqe, aio->fd, IORING_FSYNC_DATASYNC);
		break;
	}
	io_uring_sqe_set_data(sqe, aio);
	u->inflight++;
	return true;
}

static int uring_submit(struct qcow2_io *io, struct qcow2_aio *aio)
{
	struct uring_io *u = (struct uring_io *)io;

	if (!u->backlog_len && uring_prep(u, aio))
		return 0;
	if (u->backlog_len == u->backlog_cap) {
		unsigned int cap = u->backlog_cap ? 2 * u->backlog_cap : 64;
		struct qcow2_aio **nb = malloc(cap * sizeof(*nb));
		unsigned int i;

		if (!nb)
			return -ENOMEM;
		for (i = 0; i < u->backlog_len; i++)
			nb[i] = u->backlog[(u->backlog_head + i) % u->backlog_cap];
		free(u->backlog);
		u->backlog = nb;
		u->backlog_head = 0;
		u->backlog_cap = cap;
	}
	u->backlog[(u->backlog_head + u->backlog_len) % u->backlog_cap] = aio;
	u->backlog_len++;
	return 0;
}

static void uring_refill(struct uring_io *u)
{
	while (u->backlog_len) {
		struct qcow2_aio *aio = u->backlog[u->backlog_head];

		if (!uring_prep(u, aio))
			return;
		u->backlog_head = (u->backlog_head + 1) % u->backlog_cap;
		u->backlog_len--;
	}
}

static int uring_wait(struct qcow2_io *io)
{
	struct uring_io *u = (struct uring_io *)io;
	struct io_uring_cqe *cqe;
	unsigned int n;
	int ret;

	uring_refill(u);
	if (!u->inflight)
		return -EAGAIN;
	do {
		ret = io_uring_submit_and_wait(&u->ring, 1);
	} while (ret == -EINTR);
	if (ret < 0)
		return ret;
	for (n = 0; n < 256 && io_uring_peek_cqe(&u->ring, &cqe) == 0; n++) {
		struct qcow2_aio *aio = io_uring_cqe_get_data(cqe);
		int res = cqe->res;

		/* Consume the CQE before the callback: it may submit more. */
		io_uring_cqe_seen(&u->ring, cqe);
		u->inflight--;
		aio->done(aio, res);
	}
	uring_refill(u);
	return 0;
}

/**
 * qcow2_uring_new - an io_uring backend with @depth submission entries
 *
 * Returns the backend, or NULL (errno set) if the ring cannot be set up.
 */
struct qcow2_io *qcow2_uring_new(unsigned int depth)
{
	struct uring_io *u = calloc(1, sizeof(*u));
	int ret;

	if (!u)
		return NULL;
	ret = io_uring_queue_init(depth, &u->ring, 0);
	if (ret < 0) {
		free(u);
		errno = -ret;
		return NULL;
	}
	u->io.submit = uring_submit;
	u->io.wait = uring_wait;
	return &u->io;
}

void qcow2_uring_free(struct qcow2_io *io)
{
	struct uring_io *u = (struct uring_io *)io;

	if (!u)
		return;
	io_uring_queue_exit(&u->ring);
	free(u->backlog);
	free(u);
}
