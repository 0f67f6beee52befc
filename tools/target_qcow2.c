// SPDX-License-Identifier: MIT
/*
 * The glue between the ublk data plane and the qcow2 engine: an engine I/O
 * backend (struct qcow2_io) that puts image I/O on the calling queue
 * thread's io_uring, and the target ops that turn ublk requests into engine
 * requests. The only file that knows both ublk.h and qcow2.h.
 *
 * Threads: the engine is not thread-safe, so every entry into it (request
 * submission, I/O completion callbacks) holds img_lock. A request of queue A
 * may finish on queue B's thread (its parked continuation ran there); since
 * only A's thread may send A's IO commands, B posts it in A's mailbox and
 * wakes A, which commits it (or sends its NEED_GET_DATA).
 *
 * Writes are two-phase (prep_write): the engine maps, allocates and reads
 * what copy-on-write needs first, then asks for the data at the address
 * where it must land (tq_fetch), which becomes the tag's NEED_GET_DATA.
 *
 * Zero copy (the device has it, the image is not encrypted): READs and
 * WRITEs go to the engine with an opaque buffer, the tag's slice of a
 * PROT_NONE reservation (tokens) that stands for the request's registered
 * pages; tq_io_submit turns I/O on it into READ_FIXED/WRITE_FIXED at buffer
 * index = tag. Where the engine needs the bytes in memory (holes, zeros,
 * backing files, compressed clusters; for writes, new clusters that need
 * zeros or old bytes around the request's) it ends the request with -EXDEV
 * and the tag goes back to the queue (ublk_queue_copy), which serves it
 * again the copying way with a pool buffer (a WRITE then through
 * prep_write).
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "qcow2.h"
#include "target_qcow2.h"
#include "util.h"

struct tq_tag {
	struct qcow2_req *req;
	struct ublk_queue *q;		/* owner: the queue the request came from */
	unsigned int tag;
	int res;			/* committed result */
	bool fua;			/* a FLUSH must follow the WRITE */
	bool fetch;			/* mailbox: send NEED_GET_DATA to dst, not commit */
	bool copy;			/* mailbox: hand back for copying (ublk_queue_copy) */
	bool opaque;			/* the engine has the tag's token, not a buffer */
	void *dst;
	struct tq_tag *next;		/* mailbox link */
};

struct tq_mailbox {
	pthread_mutex_t lock;
	struct tq_tag *head, *tail;
};

#define TQ_MAX_ERRORS_LOGGED	20

struct tq {
	struct qcow2_io io;		/* the backend the engine sees */
	const char *path;
	struct qcow2_io *boot_io;	/* outside queue threads: open, close */
	struct qcow2 *img;
	pthread_mutex_t img_lock;
	unsigned int nr_queues, depth;
	struct tq_mailbox *boxes;	/* one per queue */
	struct tq_tag *tags;		/* nr_queues * depth */
	unsigned int nr_errors;		/* failed requests logged so far */
	bool write_through;		/* flush after every change (uq_qcow2_opts) */
	/* Zero copy: tag i of queue q stands at tokens + (q * depth + i) * tok_stride. */
	uint8_t *tokens;		/* PROT_NONE, never touched; NULL: no zero copy */
	size_t tok_stride;		/* the largest request */
	size_t tok_len;
};

static void *tq_token(const struct tq *t, const struct ublk_queue *q, unsigned int tag)
{
	return t->tokens + ((size_t)ublk_queue_id(q) * t->depth + tag) * t->tok_stride;
}

/*
 * @aio moves a token's bytes: READ_FIXED/WRITE_FIXED on the registered
 * request, which only the tag's own queue ring has. -EXDEV (the engine then
 * ends the request for copying) where that cannot be: another queue's
 * thread runs the engine (a woken continuation), or more than one iovec.
 */
static int tq_io_fixed(struct tq *t, struct ublk_queue *q, struct qcow2_aio *aio)
{
	size_t rel = (size_t)((uint8_t *)aio->iov[0].iov_base - t->tokens);
	size_t slot = rel / t->tok_stride;
	struct io_uring_sqe *sqe;

	if (!q || aio->iovcnt != 1 || slot / t->depth != ublk_queue_id(q))
		return -EXDEV;
	sqe = ublk_queue_sqe(q);
	if (!sqe)
		return -EBUSY;
	/* The address is the byte offset in the request, the index its tag. */
	if (aio->op == QCOW2_AIO_READ)
		io_uring_prep_read_fixed(sqe, aio->fd, (void *)(uintptr_t)(rel % t->tok_stride),
					 (unsigned int)aio->iov[0].iov_len, aio->off,
					 (int)(slot % t->depth));
	else
		io_uring_prep_write_fixed(sqe, aio->fd,
					  (const void *)(uintptr_t)(rel % t->tok_stride),
					  (unsigned int)aio->iov[0].iov_len, aio->off,
					  (int)(slot % t->depth));
	ublk_queue_sqe_tgt(q, sqe, (uint64_t)(uintptr_t)aio);
	return 0;
}

/* ---- The engine's I/O backend -------------------------------------------- */

static int tq_io_submit(struct qcow2_io *io, struct qcow2_aio *aio)
{
	struct tq *t = (struct tq *)io;
	struct ublk_queue *q = ublk_queue_self();
	struct io_uring_sqe *sqe;

	if (t->tokens && aio->op != QCOW2_AIO_FSYNC &&
	    (uintptr_t)aio->iov[0].iov_base - (uintptr_t)t->tokens < t->tok_len)
		return tq_io_fixed(t, q, aio);
	if (!q)
		return t->boot_io->submit(t->boot_io, aio);
	sqe = ublk_queue_sqe(q);
	if (!sqe)
		return -EBUSY;
	switch (aio->op) {
	case QCOW2_AIO_READ:
		if (aio->iovcnt == 1)
			io_uring_prep_read(sqe, aio->fd, aio->iov[0].iov_base,
					   aio->iov[0].iov_len, aio->off);
		else
			io_uring_prep_readv(sqe, aio->fd, aio->iov, aio->iovcnt, aio->off);
		break;
	case QCOW2_AIO_WRITE:
		if (aio->iovcnt == 1)
			io_uring_prep_write(sqe, aio->fd, aio->iov[0].iov_base,
					    aio->iov[0].iov_len, aio->off);
		else
			io_uring_prep_writev(sqe, aio->fd, aio->iov, aio->iovcnt, aio->off);
		break;
	case QCOW2_AIO_FSYNC:
		io_uring_prep_fsync(sqe, aio->fd, IORING_FSYNC_DATASYNC);
		break;
	}
	ublk_queue_sqe_tgt(q, sqe, (uint64_t)(uintptr_t)aio);
	return 0;
}

static int tq_io_wait(struct qcow2_io *io)
{
	struct tq *t = (struct tq *)io;

	/* Queue threads never block in the engine: their loop reaps for it. */
	if (ublk_queue_self())
		return -EDEADLK;
	return t->boot_io->wait(t->boot_io);
}

/* ---- Completing requests on their own queue -------------------------------- */

static int tq_result(struct ublk_queue *q, unsigned int tag, int res)
{
	unsigned int op = ublksrv_get_op(ublk_queue_iod(q, tag));

	if (res < 0)
		return res;
	if (op == UBLK_IO_OP_READ || op == UBLK_IO_OP_WRITE)
		return (int)(ublk_queue_iod(q, tag)->nr_sectors << 9);
	return 0;
}

/* Hand @tt to its own queue's thread. */
static void tq_post(struct tq *t, struct tq_tag *tt)
{
	struct tq_mailbox *box = &t->boxes[ublk_queue_id(tt->q)];

	pthread_mutex_lock(&box->lock);
	tt->next = NULL;
	if (box->tail)
		box->tail->next = tt;
	else
		box->head = tt;
	box->tail = tt;
	pthread_mutex_unlock(&box->lock);
	ublk_queue_wake(tt->q);
}

/* Engine callback: a deferred WRITE is ready for its data at @dst. */
static void tq_fetch(struct qcow2_req *req, void *dst, void *priv)
{
	struct tq_tag *tt = priv;

	(void)req;
	if (tt->q == ublk_queue_self()) {
		ublk_queue_get_data(tt->q, tt->tag, dst);
		return;
	}
	tt->fetch = true;
	tt->dst = dst;
	tq_post(ublk_queue_tgt(tt->q)->priv, tt);
}

/* Engine callback, img_lock held, on whichever queue thread ran the engine. */
static void tq_req_done(struct qcow2_req *req, int res, void *priv)
{
	struct tq_tag *tt = priv;
	struct tq *t = ublk_queue_tgt(tt->q)->priv;

	if (res == -EXDEV && tt->opaque) {
		/* The bytes must pass through memory: serve it the copying way. */
		tt->opaque = false;
		if (tt->q == ublk_queue_self()) {
			ublk_queue_copy(tt->q, tt->tag);
			return;
		}
		tt->copy = true;
		tq_post(t, tt);
		return;
	}
	if (res == 0 && tt->fua) {
		tt->fua = false;
		tt->opaque = false;
		qcow2_req_submit(req, QCOW2_OP_FLUSH, 0, 0, NULL, tq_req_done, tt);
		return;
	}
	if (res < 0 && t->nr_errors < TQ_MAX_ERRORS_LOGGED) {
		/* The daemon's log; a failing disk must not flood it. */
		t->nr_errors++;
		if (qcow2_errmsg(t->img)[0])
			uq_err("%s", qcow2_errmsg(t->img));
		else
			uq_err("%s: %s", t->path, strerror(-res));
	}
	tt->res = tq_result(tt->q, tt->tag, res);
	if (tt->q == ublk_queue_self()) {
		ublk_queue_complete(tt->q, tt->tag, tt->res);
		return;
	}
	tq_post(t, tt);
}

static void tq_wake(struct ublk_queue *q)
{
	struct tq *t = ublk_queue_tgt(q)->priv;
	struct tq_mailbox *box = &t->boxes[ublk_queue_id(q)];
	struct tq_tag *tt;

	pthread_mutex_lock(&box->lock);
	tt = box->head;
	box->head = box->tail = NULL;
	pthread_mutex_unlock(&box->lock);
	while (tt) {
		struct tq_tag *next = tt->next;

		if (tt->fetch) {
			tt->fetch = false;
			ublk_queue_get_data(q, tt->tag, tt->dst);
		} else if (tt->copy) {
			tt->copy = false;
			ublk_queue_copy(q, tt->tag);
		} else {
			ublk_queue_complete(q, tt->tag, tt->res);
		}
		tt = next;
	}
}

/* ---- Target ops -------------------------------------------------------------- */

static void tq_start(struct ublk_queue *q, unsigned int tag, bool deferred)
{
	struct tq *t = ublk_queue_tgt(q)->priv;
	struct tq_tag *tt = &t->tags[ublk_queue_id(q) * t->depth + tag];
	const struct ublksrv_io_desc *iod = ublk_queue_iod(q, tag);
	uint64_t off = iod->start_sector << 9;
	uint64_t len = (uint64_t)iod->nr_sectors << 9;
	bool zc = ublk_queue_tag_zero_copy(q, tag);
	enum qcow2_op op;

	tt->q = q;
	tt->tag = tag;
	tt->fua = false;
	tt->fetch = false;
	tt->copy = false;
	tt->opaque = false;
	switch (ublksrv_get_op(iod)) {
	case UBLK_IO_OP_READ:
		op = QCOW2_OP_READ;
		tt->opaque = zc;
		break;
	case UBLK_IO_OP_WRITE:
		op = QCOW2_OP_WRITE;
		tt->opaque = zc;
		tt->fua = t->write_through || (ublksrv_get_flags(iod) & (UBLK_IO_F_FUA >> 8));
		break;
	case UBLK_IO_OP_FLUSH:
		op = QCOW2_OP_FLUSH;
		off = len = 0;
		break;
	case UBLK_IO_OP_DISCARD:
		op = QCOW2_OP_DISCARD;
		tt->fua = t->write_through;
		break;
	case UBLK_IO_OP_WRITE_ZEROES:
		op = ublksrv_get_flags(iod) & (UBLK_IO_F_NOUNMAP >> 8) ?
			     QCOW2_OP_WRITE_ZEROES_NOUNMAP : QCOW2_OP_WRITE_ZEROES;
		tt->fua = t->write_through;
		break;
	default:
		ublk_queue_complete(q, tag, -EOPNOTSUPP);
		return;
	}
	pthread_mutex_lock(&t->img_lock);
	if (deferred)
		qcow2_req_defer_data(tt->req, tq_fetch);
	if (tt->opaque)
		qcow2_req_opaque(tt->req);
	qcow2_req_submit(tt->req, op, off, len,
			 tt->opaque ? tq_token(t, q, tag) : ublk_queue_buf(q, tag), tq_req_done, tt);
	pthread_mutex_unlock(&t->img_lock);
}

static void tq_queue_io(struct ublk_queue *q, unsigned int tag)
{
	tq_start(q, tag, false);
}

static void tq_prep_write(struct ublk_queue *q, unsigned int tag)
{
	tq_start(q, tag, true);
}

static void tq_data_ready(struct ublk_queue *q, unsigned int tag, int res)
{
	struct tq *t = ublk_queue_tgt(q)->priv;
	struct tq_tag *tt = &t->tags[ublk_queue_id(q) * t->depth + tag];

	pthread_mutex_lock(&t->img_lock);
	qcow2_req_data_ready(tt->req, res);
	pthread_mutex_unlock(&t->img_lock);
}

static void tq_io_done(struct ublk_queue *q, uint64_t data, int res)
{
	struct tq *t = ublk_queue_tgt(q)->priv;
	struct qcow2_aio *aio = (struct qcow2_aio *)(uintptr_t)data;

	pthread_mutex_lock(&t->img_lock);
	aio->done(aio, res);
	pthread_mutex_unlock(&t->img_lock);
}

static void tq_free(struct tq *t)
{
	unsigned int i;

	if (t->tags)
		for (i = 0; i < t->nr_queues * t->depth; i++)
			qcow2_req_free(t->tags[i].req);
	if (t->boxes)
		for (i = 0; i < t->nr_queues; i++)
			pthread_mutex_destroy(&t->boxes[i].lock);
	free(t->tags);
	free(t->boxes);
	if (t->tokens)
		munmap(t->tokens, t->tok_len);
	pthread_mutex_destroy(&t->img_lock);
	qcow2_uring_free(t->boot_io);
	free(t);
}

static int tq_open(struct tq *t, struct ublk_tgt *tgt, const struct ublk_dev_cfg *cfg)
{
	const struct uq_qcow2_opts *o = tgt->opts;
	struct qcow2_opts opts = {
		.read_only = cfg->read_only,
		.direct = true,
		.l2_cache_bytes = o ? o->cache_bytes : 0,
		.snapshot = o ? o->snapshot : NULL,
		.keys = o ? o->keys : NULL,
		.nr_keys = o ? o->nr_keys : 0,
		.max_backing = o ? o->max_backing : 0,
	};
	int ret;

	ret = qcow2_open(&t->img, tgt->path, &opts, &t->io, tgt->err, sizeof(tgt->err));
	if (ret == -EINVAL) {
		/* The file system may refuse O_DIRECT: buffered I/O then. */
		opts.direct = false;
		ret = qcow2_open(&t->img, tgt->path, &opts, &t->io, tgt->err, sizeof(tgt->err));
	}
	return ret;
}

static int tq_init(struct ublk_tgt *tgt, const struct ublk_dev_cfg *cfg)
{
	struct qcow2_info info;
	struct tq *t;
	unsigned int i;
	int ret;

	t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	pthread_mutex_init(&t->img_lock, NULL);
	t->io.submit = tq_io_submit;
	t->io.wait = tq_io_wait;
	t->path = tgt->path;
	t->nr_queues = cfg->nr_queues;
	t->depth = cfg->depth;
	t->write_through = tgt->opts && ((const struct uq_qcow2_opts *)tgt->opts)->write_through;
	t->boot_io = qcow2_uring_new(64);
	if (!t->boot_io) {
		ret = -errno;
		snprintf(tgt->err, sizeof(tgt->err), "io_uring: %s", strerror(errno));
		goto err_free;
	}
	ret = tq_open(t, tgt, cfg);
	if (ret)
		goto err_free;

	ret = -ENOMEM;
	t->boxes = calloc(t->nr_queues, sizeof(*t->boxes));
	t->tags = calloc((size_t)t->nr_queues * t->depth, sizeof(*t->tags));
	if (!t->boxes || !t->tags)
		goto err_close;
	for (i = 0; i < t->nr_queues; i++)
		pthread_mutex_init(&t->boxes[i].lock, NULL);
	for (i = 0; i < t->nr_queues * t->depth; i++) {
		t->tags[i].req = qcow2_req_new(t->img);
		if (!t->tags[i].req)
			goto err_close;
	}

	qcow2_get_info(t->img, &info);
	if (!info.encrypted) {
		/* Address space only; without it the device simply copies. */
		t->tok_stride = cfg->max_io_bytes;
		t->tok_len = (size_t)t->nr_queues * t->depth * t->tok_stride;
		t->tokens = mmap(NULL, t->tok_len, PROT_NONE,
				 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (t->tokens == MAP_FAILED)
			t->tokens = NULL;
	}
	tgt->priv = t;
	tgt->dev_size = info.virtual_size;
	tgt->volatile_cache = true;
	tgt->discard_granularity = 1u << info.cluster_bits;
	tgt->zero_copy = t->tokens != NULL;
	return 0;

err_close:
	snprintf(tgt->err, sizeof(tgt->err), "%s: %s", tgt->path, strerror(-ret));
	qcow2_close(t->img);
err_free:
	tq_free(t);
	return ret;
}

static int tq_deinit(struct ublk_tgt *tgt)
{
	struct tq *t = tgt->priv;
	int ret, ret2;

	if (!t)
		return 0;
	/* Every queue has drained; what is left is the final flush. */
	ret = qcow2_drain(t->img);
	ret2 = qcow2_close(t->img);
	if (ret2 && !ret)
		ret = ret2;
	tq_free(t);
	tgt->priv = NULL;
	return ret;
}

const struct ublk_tgt_ops uq_qcow2_ops = {
	.name = "qcow2",
	.init = tq_init,
	.queue_io = tq_queue_io,
	.prep_write = tq_prep_write,
	.data_ready = tq_data_ready,
	.tgt_io_done = tq_io_done,
	.wake = tq_wake,
	.deinit = tq_deinit,
};
