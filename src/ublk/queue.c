// SPDX-License-Identifier: MIT
/*
 * The data plane: one thread and one io_uring per ublk queue. The ring
 * carries the queue's IO commands (FETCH_REQ, NEED_GET_DATA,
 * COMMIT_AND_FETCH_REQ), the target's own I/O and an eventfd read that
 * lets other threads wake the queue. A queue thread ends when no command is
 * left with the driver (all aborted by STOP_DEV), the target holds no
 * request and no target I/O is in flight.
 *
 * Tag life:  FETCH ─► request ─(WRITE)─► NEED_GET_DATA ─► target ─► COMMIT_AND_FETCH ─► ...
 *                        └─(others)────────────────────────┘
 * A target with prep_write takes a WRITE before its data: it maps and
 * allocates, then sends NEED_GET_DATA itself (ublk_queue_get_data) with the
 * address where the data must land, and hears back through data_ready().
 *
 * Data buffers come from the queue's pool when a READ or WRITE arrives (a
 * request waits in UBLK_TAG_BUFWAIT while the pool is short), so the memory
 * a queue touches is the pool's, not depth x the largest request. A WRITE's
 * buffer is free once the target finishes; a READ's once the kernel copied
 * it, which it does while io_uring_submit() issues the COMMIT_AND_FETCH_REQ
 * (the pages wait in q->release until the ring has submitted everything).
 *
 * With UBLK_F_USER_COPY (6.4+) the kernel copies nothing: a WRITE arrives
 * like any request and its data is read from the char device where the
 * target wants it (QUEUE_COPY_IN instead of NEED_GET_DATA); a READ's data is
 * written to the char device (QUEUE_COPY_OUT) before its commit.
 *
 * With zero copy (UBLK_F_AUTO_BUF_REG on top of USER_COPY, 6.16+, for a
 * target that can use it) nothing is copied at all: the driver registers
 * each READ/WRITE request's pages in the ring's buffer table at index = tag
 * before it hands the request over (the index rides in the FETCH/COMMIT
 * SQE's addr) and drops them at the commit; the target's file I/O uses them
 * with READ_FIXED/WRITE_FIXED, and such requests get no pool buffer. A
 * target that needs some request's bytes in memory sends it back
 * (ublk_queue_copy): it then gets a buffer and is served as with USER_COPY.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"

static __thread struct ublk_queue *queue_self;

/* Pseudo commands for USER_COPY, queued like IO commands when SQEs run out. */
enum { QUEUE_COPY_IN = 0xf0, QUEUE_COPY_OUT = 0xf1 };

static size_t page_round(size_t n)
{
	size_t pg = (size_t)sysconf(_SC_PAGESIZE);

	return (n + pg - 1) / pg * pg;
}

/**
 * ublk_queue_setup - map queue @q_id's io descriptors and allocate its buffers
 *
 * Returns 0 or -errno. The ring is made later, by the queue's own thread.
 */
int ublk_queue_setup(struct ublk_queue *q, struct ublk_dev *dev, unsigned int q_id)
{
	size_t stride = page_round(UBLK_MAX_QUEUE_DEPTH * sizeof(struct ublksrv_io_desc));
	size_t pool_bytes;
	void *p;
	int ret;

	q->dev = dev;
	q->tgt = dev->tgt;
	q->q_id = q_id;
	q->depth = dev->info.queue_depth;
	q->wake_fd = -1;
	q->iods_len = page_round(q->depth * sizeof(struct ublksrv_io_desc));
	q->buf_bytes = dev->info.max_io_buf_bytes;

	/* Each queue's descriptors sit at a stride sized for the maximum depth. */
	p = mmap(NULL, q->iods_len, PROT_READ, MAP_SHARED | MAP_POPULATE, dev->char_fd,
		 UBLKSRV_CMD_BUF_OFFSET + (off_t)q_id * stride);
	if (p == MAP_FAILED)
		return -errno;
	q->iods = p;

	/* Room for the largest request, and for depth of them if that is less. */
	pool_bytes = q->buf_bytes > UBLK_POOL_BYTES ? q->buf_bytes : UBLK_POOL_BYTES;
	if (pool_bytes > (size_t)q->depth * q->buf_bytes)
		pool_bytes = (size_t)q->depth * q->buf_bytes;
	ret = ublk_pool_init(&q->pool, pool_bytes);
	if (ret)
		goto err_iods;

	q->tags = calloc(q->depth, sizeof(*q->tags));
	q->pending = calloc(q->depth, sizeof(*q->pending));
	q->bufwait = calloc(q->depth, sizeof(*q->bufwait));
	q->release = calloc(q->pool.pages, sizeof(*q->release));
	if (!q->tags || !q->pending || !q->bufwait || !q->release) {
		ret = -ENOMEM;
		goto err_tags;
	}
	q->wake_fd = eventfd(0, EFD_CLOEXEC);
	if (q->wake_fd < 0) {
		ret = -errno;
		goto err_tags;
	}
	return 0;

err_tags:
	free(q->release);
	free(q->bufwait);
	free(q->pending);
	free(q->tags);
	q->release = NULL;
	q->bufwait = q->pending = NULL;
	q->tags = NULL;
	ublk_pool_fini(&q->pool);
err_iods:
	munmap(q->iods, q->iods_len);
	q->iods = NULL;
	return ret;
}

/**
 * ublk_queue_teardown - undo ublk_queue_setup() once the thread has ended
 */
void ublk_queue_teardown(struct ublk_queue *q)
{
	if (q->iods)
		munmap(q->iods, q->iods_len);
	ublk_pool_fini(&q->pool);
	if (q->wake_fd >= 0)
		close(q->wake_fd);
	free(q->release);
	free(q->bufwait);
	free(q->pending);
	free(q->tags);
	q->iods = NULL;
	q->wake_fd = -1;
	q->release = NULL;
	q->bufwait = q->pending = NULL;
	q->tags = NULL;
}

/* ---- Accessors for targets ------------------------------------------------ */

struct ublk_tgt *ublk_queue_tgt(const struct ublk_queue *q)
{
	return q->tgt;
}

unsigned int ublk_queue_id(const struct ublk_queue *q)
{
	return q->q_id;
}

unsigned int ublk_queue_depth(const struct ublk_queue *q)
{
	return q->depth;
}

const struct ublksrv_io_desc *ublk_queue_iod(const struct ublk_queue *q, unsigned int tag)
{
	return &q->iods[tag];
}

void *ublk_queue_buf(const struct ublk_queue *q, unsigned int tag)
{
	return q->pool.base + (size_t)q->tags[tag].buf_first * UBLK_POOL_PAGE;
}

bool ublk_queue_zero_copy(const struct ublk_queue *q)
{
	return q->dev->zero_copy;
}

bool ublk_queue_tag_zero_copy(const struct ublk_queue *q, unsigned int tag)
{
	return q->dev->zero_copy && !q->tags[tag].copy;
}

/* ---- Buffers ------------------------------------------------------------- */

/* Give @tag the buffer its request needs, if any. false: the pool is short. */
static bool buf_get(struct ublk_queue *q, unsigned int tag)
{
	const struct ublksrv_io_desc *iod = &q->iods[tag];
	struct ublk_tag *t = &q->tags[tag];
	uint64_t len = (uint64_t)iod->nr_sectors << 9;
	unsigned int op = ublksrv_get_op(iod), pages;
	int first;

	t->buf_pages = 0;
	/* Zero copy: the data stays in the request's pages. */
	if ((op != UBLK_IO_OP_READ && op != UBLK_IO_OP_WRITE) || ublk_queue_tag_zero_copy(q, tag))
		return true;
	/* The driver never sends more than max_io_buf_bytes, the pool's floor. */
	if (len > q->buf_bytes)
		len = q->buf_bytes;
	if (len == 0)
		len = 1;
	pages = (unsigned int)((len + UBLK_POOL_PAGE - 1) / UBLK_POOL_PAGE);
	first = ublk_pool_alloc(&q->pool, pages);
	if (first < 0)
		return false;
	t->buf_first = (uint32_t)first;
	t->buf_pages = pages;
	return true;
}

static void buf_put(struct ublk_queue *q, unsigned int tag)
{
	struct ublk_tag *t = &q->tags[tag];

	if (t->buf_pages)
		ublk_pool_free(&q->pool, t->buf_first, t->buf_pages);
	t->buf_pages = 0;
}

/* Everything queued on the ring was submitted: the READ copies are done. */
static void buf_release(struct ublk_queue *q)
{
	if (!q->nr_release || io_uring_sq_ready(&q->ring))
		return;
	while (q->nr_release) {
		struct ublk_buf_run *b = &q->release[--q->nr_release];

		ublk_pool_free(&q->pool, b->first, b->pages);
	}
}

struct ublk_queue *ublk_queue_self(void)
{
	return queue_self;
}

void ublk_queue_wake(struct ublk_queue *q)
{
	/* Only fails on counter overflow, which still leaves it readable. */
	(void)eventfd_write(q->wake_fd, 1);
}

/* ---- SQEs ---------------------------------------------------------------- */

struct io_uring_sqe *ublk_queue_sqe(struct ublk_queue *q)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&q->ring);

	if (sqe)
		return sqe;
	/* Full: hand what is queued to the kernel, which frees the SQ. */
	io_uring_submit(&q->ring);
	return io_uring_get_sqe(&q->ring);
}

void ublk_queue_sqe_tgt(struct ublk_queue *q, struct io_uring_sqe *sqe, uint64_t data)
{
	io_uring_sqe_set_data64(sqe, UBLK_UD_TGT | (data & UBLK_UD_DATA_MASK));
	q->nr_tgt_io++;
}

static uint32_t io_opcode(const struct ublk_queue *q, unsigned int cmd)
{
	if (!q->dev->io_ioctl)
		return cmd;
	switch (cmd) {
	case UBLK_IO_FETCH_REQ:
		return UBLK_U_IO_FETCH_REQ;
	case UBLK_IO_COMMIT_AND_FETCH_REQ:
		return UBLK_U_IO_COMMIT_AND_FETCH_REQ;
	default:
		return UBLK_U_IO_NEED_GET_DATA;
	}
}

/* The char device offset of @tag's data (USER_COPY). */
static uint64_t copy_pos(const struct ublk_queue *q, unsigned int tag)
{
	return UBLKSRV_IO_BUF_OFFSET + ((uint64_t)q->q_id << UBLK_QID_OFF) +
	       ((uint64_t)tag << UBLK_TAG_OFF);
}

int ublk_queue_zero_data(struct ublk_queue *q, unsigned int tag, uint32_t off, uint32_t len)
{
	static const uint8_t zeros[4096];

	if (!ublk_queue_tag_zero_copy(q, tag)) {
		memset((uint8_t *)ublk_queue_buf(q, tag) + off, 0, len);
		return 0;
	}
	/* The pages are the request's: USER_COPY writes reach them (rare: a file that shrank). */
	while (len) {
		size_t n = len < sizeof(zeros) ? len : sizeof(zeros);
		ssize_t w = pwrite(q->dev->char_fd, zeros, n, (off_t)(copy_pos(q, tag) + off));

		if (w < 0)
			return -errno;
		if (w == 0)
			return -EIO;
		off += (uint32_t)w;
		len -= (uint32_t)w;
	}
	return 0;
}

static void queue_prep_copy(struct ublk_queue *q, struct io_uring_sqe *sqe, unsigned int tag,
			    unsigned int cmd)
{
	struct ublk_tag *t = &q->tags[tag];

	if (cmd == QUEUE_COPY_IN)
		io_uring_prep_read(sqe, q->dev->char_fd, t->addr ? t->addr : ublk_queue_buf(q, tag),
				   q->iods[tag].nr_sectors << 9, copy_pos(q, tag));
	else
		io_uring_prep_write(sqe, q->dev->char_fd, ublk_queue_buf(q, tag),
				    (unsigned int)t->res, copy_pos(q, tag));
	io_uring_sqe_set_data64(sqe, UBLK_UD_COPY | tag);
	t->state = UBLK_TAG_KERNEL;
	q->nr_copies++;
}

/* Send IO command @cmd for @tag, or queue it until an SQE frees up. */
static void queue_issue(struct ublk_queue *q, unsigned int tag, unsigned int cmd)
{
	struct ublk_tag *t = &q->tags[tag];
	struct io_uring_sqe *sqe = ublk_queue_sqe(q);
	struct ublksrv_io_cmd *io;

	if (!sqe) {
		t->state = UBLK_TAG_PENDING;
		t->next_cmd = cmd;
		q->pending[(q->pending_head + q->nr_pending) % q->depth] = tag;
		q->nr_pending++;
		return;
	}
	if (cmd == QUEUE_COPY_IN || cmd == QUEUE_COPY_OUT) {
		queue_prep_copy(q, sqe, tag, cmd);
		return;
	}
	io_uring_prep_rw(IORING_OP_URING_CMD, sqe, q->dev->char_fd, NULL, 0, 0);
	sqe->cmd_op = io_opcode(q, cmd);
	/* The command overlays addr3: write it after the prep cleared that. */
	io = (struct ublksrv_io_cmd *)sqe->cmd;
	io->q_id = q->q_id;
	io->tag = tag;
	io->result = cmd == UBLK_IO_COMMIT_AND_FETCH_REQ ? t->res : 0;
	/* USER_COPY kernels refuse any address. */
	io->addr = q->dev->user_copy ? 0 :
		   (uint64_t)(uintptr_t)(cmd == UBLK_IO_NEED_GET_DATA && t->addr ?
					 t->addr : ublk_queue_buf(q, tag));
	/*
	 * Zero copy: where the driver registers the next request's pages, in
	 * the SQE's own addr (struct ublk_auto_buf_reg: index in bits 0-15, no
	 * flags: a failed registration fails the request).
	 */
	if (q->dev->zero_copy)
		sqe->addr = tag;
	io_uring_sqe_set_data64(sqe, tag);
	t->state = UBLK_TAG_KERNEL;
	q->nr_cmds++;
	if (cmd == UBLK_IO_COMMIT_AND_FETCH_REQ && t->buf_pages) {
		/* The buffer now belongs to the commit: the tag may get another first. */
		q->release[q->nr_release++] = (struct ublk_buf_run){ t->buf_first, t->buf_pages };
		t->buf_pages = 0;
	}
}

static void queue_issue_pending(struct ublk_queue *q)
{
	unsigned int n = q->nr_pending;

	/* Each retry either sends or re-queues at the tail: one pass each. */
	while (n--) {
		unsigned int tag = q->pending[q->pending_head];

		q->pending_head = (q->pending_head + 1) % q->depth;
		q->nr_pending--;
		queue_issue(q, tag, q->tags[tag].next_cmd);
	}
}

void ublk_queue_complete(struct ublk_queue *q, unsigned int tag, int res)
{
	struct ublk_tag *t = &q->tags[tag];

	q->nr_target--;
	if (t->state == UBLK_TAG_DEAD) {
		buf_put(q, tag);
		t->state = UBLK_TAG_DONE;
		return;
	}
	t->res = res;
	if (q->dev->user_copy) {
		/* No NEED_GET_DATA to owe; a READ's data goes out before its commit. */
		t->owes_data = false;
		if (ublksrv_get_op(&q->iods[tag]) == UBLK_IO_OP_READ && res > 0 &&
		    !ublk_queue_tag_zero_copy(q, tag)) {
			queue_issue(q, tag, QUEUE_COPY_OUT);
			return;
		}
	} else if (t->owes_data) {
		/*
		 * A WRITE that failed before it asked for its data: the driver
		 * refuses any command but NEED_GET_DATA until it had one.
		 */
		t->owes_data = false;
		t->commit_after = true;
		t->addr = NULL;
		queue_issue(q, tag, UBLK_IO_NEED_GET_DATA);
		return;
	}
	/* Only a READ's commit reads the buffer. */
	if (ublksrv_get_op(&q->iods[tag]) != UBLK_IO_OP_READ)
		buf_put(q, tag);
	queue_issue(q, tag, UBLK_IO_COMMIT_AND_FETCH_REQ);
}

void ublk_queue_get_data(struct ublk_queue *q, unsigned int tag, void *dst)
{
	struct ublk_tag *t = &q->tags[tag];

	q->nr_target--;
	t->get_data = true;
	t->owes_data = false;
	t->addr = dst;
	queue_issue(q, tag, q->dev->user_copy ? QUEUE_COPY_IN : UBLK_IO_NEED_GET_DATA);
}

static void queue_arm_wake(struct ublk_queue *q)
{
	struct io_uring_sqe *sqe;

	if (q->wake_armed || !q->tgt->ops->wake)
		return;
	/* Without an SQE now, the loop tries again before it sleeps. */
	sqe = ublk_queue_sqe(q);
	if (!sqe)
		return;
	io_uring_prep_read(sqe, q->wake_fd, &q->wake_val, sizeof(q->wake_val), 0);
	io_uring_sqe_set_data64(sqe, UBLK_UD_WAKE);
	q->wake_armed = true;
}

/* ---- Completions --------------------------------------------------------- */

static void queue_dispatch(struct ublk_queue *q, unsigned int tag, int res);

/* Back of the buffer queue: the loop's queue_bufwait_retry() dispatches it. */
static void queue_bufwait_add(struct ublk_queue *q, unsigned int tag, int res)
{
	struct ublk_tag *t = &q->tags[tag];

	t->state = UBLK_TAG_BUFWAIT;
	t->res = res;
	q->bufwait[(q->bufwait_head + q->nr_bufwait) % q->depth] = (uint16_t)tag;
	q->nr_bufwait++;
}

void ublk_queue_copy(struct ublk_queue *q, unsigned int tag)
{
	q->nr_target--;
	q->tags[tag].copy = true;
	queue_bufwait_add(q, tag, UBLK_IO_RES_OK);
}

static void queue_cmd_done(struct ublk_queue *q, unsigned int tag, int res)
{
	struct ublk_tag *t = &q->tags[tag];

	q->nr_cmds--;
	if (t->commit_after) {
		t->commit_after = false;
		buf_put(q, tag);
		if (res == UBLK_IO_RES_OK)
			queue_issue(q, tag, UBLK_IO_COMMIT_AND_FETCH_REQ);
		else
			t->state = UBLK_TAG_DONE;
		return;
	}
	if (t->get_data && q->tgt->ops->prep_write) {
		/* The target's NEED_GET_DATA: it holds the tag whatever came back. */
		t->get_data = false;
		t->addr = NULL;
		t->state = res == UBLK_IO_RES_OK ? UBLK_TAG_TARGET : UBLK_TAG_DEAD;
		q->nr_target++;
		q->tgt->ops->data_ready(q, tag, res == UBLK_IO_RES_OK ? 0 : -EIO);
		return;
	}
	if (t->get_data) {
		/* Ours, for a target without prep_write: the data is in the tag's buffer. */
		t->get_data = false;
		if (res == UBLK_IO_RES_OK) {
			queue_dispatch(q, tag, res);
			return;
		}
		buf_put(q, tag);
	} else if (res == UBLK_IO_RES_NEED_GET_DATA || res == UBLK_IO_RES_OK) {
		t->copy = false;
		if (!buf_get(q, tag)) {
			queue_bufwait_add(q, tag, res);
			return;
		}
		queue_dispatch(q, tag, res);
		return;
	}
	/* ABORT (STOP_DEV, or the driver gave up on us): never re-fetch. */
	if (res != UBLK_IO_RES_ABORT)
		ublk_log("queue %u tag %u: IO command failed: %s", q->q_id, tag, strerror(-res));
	t->state = UBLK_TAG_DONE;
}

/* Requests that waited for buffers, in arrival order, while the pool has room. */
static void queue_bufwait_retry(struct ublk_queue *q)
{
	while (q->nr_bufwait) {
		unsigned int tag = q->bufwait[q->bufwait_head];

		if (!buf_get(q, tag))
			return;
		q->bufwait_head = (q->bufwait_head + 1) % q->depth;
		q->nr_bufwait--;
		queue_dispatch(q, tag, q->tags[tag].res);
	}
}

/* A request with its buffer: hand it to the target. */
static void queue_dispatch(struct ublk_queue *q, unsigned int tag, int res)
{
	struct ublk_tag *t = &q->tags[tag];

	if (res == UBLK_IO_RES_NEED_GET_DATA ||
	    (q->dev->user_copy && !ublk_queue_tag_zero_copy(q, tag) &&
	     ublksrv_get_op(&q->iods[tag]) == UBLK_IO_OP_WRITE)) {
		t->state = UBLK_TAG_TARGET;
		q->nr_target++;
		if (q->tgt->ops->prep_write) {
			t->owes_data = true;
			q->tgt->ops->prep_write(q, tag);
			return;
		}
		/* Have the driver copy the data into the tag's buffer, then serve. */
		ublk_queue_get_data(q, tag, NULL);
		return;
	}
	t->state = UBLK_TAG_TARGET;
	q->nr_target++;
	q->tgt->ops->queue_io(q, tag);
}

/* A USER_COPY read (a WRITE's data in) or write (a READ's data out) finished. */
static void queue_copy_done(struct ublk_queue *q, unsigned int tag, int res)
{
	struct ublk_tag *t = &q->tags[tag];
	bool ok;

	q->nr_copies--;
	if (ublksrv_get_op(&q->iods[tag]) == UBLK_IO_OP_READ) {
		buf_put(q, tag);
		if (res != t->res)
			t->res = res < 0 ? res : -EIO;
		queue_issue(q, tag, UBLK_IO_COMMIT_AND_FETCH_REQ);
		return;
	}
	ok = res >= 0 && (uint64_t)res == (uint64_t)q->iods[tag].nr_sectors << 9;
	t->get_data = false;
	t->addr = NULL;
	t->state = UBLK_TAG_TARGET;
	q->nr_target++;
	if (q->tgt->ops->prep_write)
		q->tgt->ops->data_ready(q, tag, ok ? 0 : -EIO);
	else if (ok)
		q->tgt->ops->queue_io(q, tag);
	else
		ublk_queue_complete(q, tag, -EIO);
}

static void queue_reap(struct ublk_queue *q)
{
	struct io_uring_cqe *cqe;

	while (io_uring_peek_cqe(&q->ring, &cqe) == 0) {
		uint64_t ud = cqe->user_data;
		int res = cqe->res;

		/* Consume first: the handlers below may need the CQ space. */
		io_uring_cqe_seen(&q->ring, cqe);
		if (ud & UBLK_UD_TGT) {
			q->nr_tgt_io--;
			q->tgt->ops->tgt_io_done(q, ud & UBLK_UD_DATA_MASK, res);
		} else if (ud & UBLK_UD_COPY) {
			queue_copy_done(q, (unsigned int)(ud & ~UBLK_UD_COPY), res);
		} else if (ud & UBLK_UD_WAKE) {
			q->wake_armed = false;
			if (q->tgt->ops->wake)
				q->tgt->ops->wake(q);
		} else {
			queue_cmd_done(q, (unsigned int)ud, res);
		}
	}
}

static int queue_ring_init(struct ublk_queue *q)
{
	unsigned int sq = 2 * q->depth < 64 ? 64 : 2 * q->depth;
	struct io_uring_params p;
	int ret;

	/* A roomy CQ: target I/O is not bounded by the depth. */
	memset(&p, 0, sizeof(p));
	p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_COOP_TASKRUN |
		  IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
	p.cq_entries = 4 * sq;
	ret = io_uring_queue_init_params(sq, &q->ring, &p);
	if (ret == -EINVAL) {
		/* Kernels before 6.1 lack the task-run flags. */
		memset(&p, 0, sizeof(p));
		p.flags = IORING_SETUP_CQSIZE;
		p.cq_entries = 4 * sq;
		ret = io_uring_queue_init_params(sq, &q->ring, &p);
	}
	return ret;
}

static bool queue_busy(const struct ublk_queue *q)
{
	return q->nr_cmds || q->nr_target || q->nr_tgt_io || q->nr_pending || q->nr_bufwait ||
	       q->nr_copies;
}

/**
 * ublk_queue_thread - the body of a queue thread (a pthread start routine)
 * @arg: the struct ublk_queue
 *
 * Reports ring setup through dev->ready, fetches every tag and serves until
 * the queue drains. Posts dev->exit_fd when it ends.
 */
void *ublk_queue_thread(void *arg)
{
	struct ublk_queue *q = arg;
	struct ublk_dev *dev = q->dev;
	unsigned int tag;
	int ret;

	queue_self = q;
	/* Pinning is a hint: run anywhere rather than not at all. */
	if (q->pin)
		(void)pthread_setaffinity_np(pthread_self(), sizeof(q->cpus), &q->cpus);
	ret = queue_ring_init(q);
	/* Zero copy: a slot per tag for the driver to put requests' pages in. */
	if (!ret && dev->zero_copy) {
		ret = io_uring_register_buffers_sparse(&q->ring, q->depth);
		if (ret) {
			ublk_log("queue %u: io_uring buffer table: %s", q->q_id, strerror(-ret));
			io_uring_queue_exit(&q->ring);
		}
	}
	q->err = ret;
	sem_post(&dev->ready);
	if (ret)
		goto out;

	for (tag = 0; tag < q->depth; tag++)
		queue_issue(q, tag, UBLK_IO_FETCH_REQ);
	while (queue_busy(q)) {
		queue_issue_pending(q);
		queue_arm_wake(q);
		if (q->nr_bufwait && q->nr_release) {
			/* Waiters may be all that is left: free READ buffers before sleeping. */
			io_uring_submit(&q->ring);
			buf_release(q);
			if (!q->nr_release) {
				queue_bufwait_retry(q);
				continue;
			}
		}
		ret = io_uring_submit_and_wait(&q->ring, 1);
		if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
			ublk_log("queue %u: io_uring: %s", q->q_id, strerror(-ret));
			q->err = ret;
			break;
		}
		buf_release(q);
		queue_reap(q);
		queue_bufwait_retry(q);
	}
	io_uring_queue_exit(&q->ring);
out:
	queue_self = NULL;
	(void)eventfd_write(dev->exit_fd, 1);
	return NULL;
}
