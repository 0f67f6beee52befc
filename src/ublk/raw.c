// SPDX-License-Identifier: MIT
/*
 * The raw target (-f raw): a loop device whose file I/O rides the queue's
 * io_uring. Short transfers are resumed where they stopped; reads past the
 * end of a file that shrank return zeros. FUA writes use RWF_DSYNC.
 * With zero copy the file I/O reads and writes the request's own pages
 * (READ_FIXED/WRITE_FIXED on the buffer the driver registered at the tag).
 * A probed image (ublk_raw_opts.probed) keeps its first sector from
 * becoming a qcow2 header, as QEMU's raw driver does.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/magic.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "internal.h"

struct raw_tag {
	uint32_t done;			/* bytes transferred so far */
	bool punch;			/* write-zeroes by punching a hole */
};

struct raw {
	int fd;
	bool probed;			/* ublk_raw_opts.probed */
	unsigned int depth;
	struct raw_tag *tags;		/* nr_queues * depth */
};

static int raw_open(const char *path, bool read_only)
{
	int flags = (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
	int fd = open(path, flags | O_DIRECT);
	struct statfs sf;
	int fl;

	/* Some file systems (tmpfs before 6.6) refuse O_DIRECT. */
	if (fd < 0 && errno == EINVAL)
		fd = open(path, flags);
	if (fd < 0)
		return -errno;
	/* tmpfs lacks FMODE_NOWAIT: without this io_uring punts all its I/O to workers. */
	fl = fcntl(fd, F_GETFL);
	if (fstatfs(fd, &sf) == 0 && sf.f_type == TMPFS_MAGIC && fl >= 0)
		(void)fcntl(fd, F_SETFL, fl | O_NONBLOCK);
	return fd;
}

static int raw_init(struct ublk_tgt *t, const struct ublk_dev_cfg *cfg)
{
	const struct ublk_raw_opts *opts = t->opts;
	struct raw *r;
	struct stat st;
	uint64_t size;
	int ret;

	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	r->fd = raw_open(t->path, cfg->read_only);
	if (r->fd < 0) {
		ret = r->fd;
		snprintf(t->err, sizeof(t->err), "%s: %s", t->path, strerror(-ret));
		goto err_free;
	}
	if (fstat(r->fd, &st)) {
		ret = -errno;
		goto err_msg;
	}
	size = (uint64_t)st.st_size;
	if (S_ISBLK(st.st_mode) && ioctl(r->fd, BLKGETSIZE64, &size)) {
		ret = -errno;
		goto err_msg;
	}
	if (size < 512) {
		ret = -EINVAL;
		snprintf(t->err, sizeof(t->err), "%s: image smaller than 512 bytes", t->path);
		goto err_close;
	}
	r->probed = opts && opts->probed;
	r->depth = cfg->depth;
	r->tags = calloc((size_t)cfg->nr_queues * cfg->depth, sizeof(*r->tags));
	if (!r->tags) {
		ret = -ENOMEM;
		goto err_msg;
	}
	t->priv = r;
	t->dev_size = size & ~511ULL;
	t->volatile_cache = true;
	t->discard_granularity = 4096;
	t->zero_copy = true;
	return 0;

err_msg:
	snprintf(t->err, sizeof(t->err), "%s: %s", t->path, strerror(-ret));
err_close:
	close(r->fd);
err_free:
	free(r);
	return ret;
}

/* Queue the file operation for (the rest of) @tag's request. */
static void raw_submit(struct ublk_queue *q, unsigned int tag)
{
	struct raw *r = ublk_queue_tgt(q)->priv;
	struct raw_tag *rt = &r->tags[ublk_queue_id(q) * r->depth + tag];
	const struct ublksrv_io_desc *iod = ublk_queue_iod(q, tag);
	uint64_t off = (iod->start_sector << 9) + rt->done;
	uint32_t len = (iod->nr_sectors << 9) - rt->done;
	uint8_t *buf = (uint8_t *)ublk_queue_buf(q, tag) + rt->done;
	struct io_uring_sqe *sqe = ublk_queue_sqe(q);

	if (!sqe) {
		ublk_queue_complete(q, tag, -EBUSY);
		return;
	}
	switch (ublksrv_get_op(iod)) {
	case UBLK_IO_OP_READ:
		if (ublk_queue_tag_zero_copy(q, tag))
			/* The address is the offset in the registered request. */
			io_uring_prep_read_fixed(sqe, r->fd, (void *)(uintptr_t)rt->done, len, off,
						 (int)tag);
		else
			io_uring_prep_read(sqe, r->fd, buf, len, off);
		break;
	case UBLK_IO_OP_WRITE:
		if (ublk_queue_tag_zero_copy(q, tag))
			io_uring_prep_write_fixed(sqe, r->fd, (const void *)(uintptr_t)rt->done, len,
						  off, (int)tag);
		else
			io_uring_prep_write(sqe, r->fd, buf, len, off);
		if (ublksrv_get_flags(iod) & (UBLK_IO_F_FUA >> 8))
			sqe->rw_flags = RWF_DSYNC;
		break;
	case UBLK_IO_OP_FLUSH:
		io_uring_prep_fsync(sqe, r->fd, IORING_FSYNC_DATASYNC);
		break;
	case UBLK_IO_OP_DISCARD:
		io_uring_prep_fallocate(sqe, r->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
					off, len);
		break;
	default:	/* UBLK_IO_OP_WRITE_ZEROES */
		io_uring_prep_fallocate(sqe, r->fd, FALLOC_FL_KEEP_SIZE |
					(rt->punch ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE),
					off, len);
		break;
	}
	ublk_queue_sqe_tgt(q, sqe, tag);
}

/* Does @tag's data (a WRITE at sector 0) start with the qcow2 magic? */
static bool raw_qcow2_header(struct ublk_queue *q, unsigned int tag)
{
	static const uint8_t qcow2_magic[4] = { 'Q', 'F', 'I', 0xfb };

	return !memcmp(ublk_queue_buf(q, tag), qcow2_magic, sizeof(qcow2_magic));
}

static void raw_queue_io(struct ublk_queue *q, unsigned int tag)
{
	struct raw *r = ublk_queue_tgt(q)->priv;
	struct raw_tag *rt = &r->tags[ublk_queue_id(q) * r->depth + tag];
	const struct ublksrv_io_desc *iod = ublk_queue_iod(q, tag);

	switch (ublksrv_get_op(iod)) {
	case UBLK_IO_OP_WRITE:
		if (r->probed && iod->start_sector == 0) {
			/* The bytes are needed in memory to look at them. */
			if (ublk_queue_tag_zero_copy(q, tag)) {
				ublk_queue_copy(q, tag);
				return;
			}
			if (raw_qcow2_header(q, tag)) {
				ublk_queue_complete(q, tag, -EPERM);
				return;
			}
		}
		break;
	case UBLK_IO_OP_READ:
	case UBLK_IO_OP_FLUSH:
	case UBLK_IO_OP_DISCARD:
		break;
	case UBLK_IO_OP_WRITE_ZEROES:
		/* Unmapping is allowed unless NOUNMAP: a hole reads as zeros. */
		rt->punch = !(ublksrv_get_flags(iod) & (UBLK_IO_F_NOUNMAP >> 8));
		break;
	default:
		ublk_queue_complete(q, tag, -EOPNOTSUPP);
		return;
	}
	rt->done = 0;
	raw_submit(q, tag);
}

static void raw_io_done(struct ublk_queue *q, uint64_t data, int res)
{
	struct raw *r = ublk_queue_tgt(q)->priv;
	unsigned int tag = (unsigned int)data;
	struct raw_tag *rt = &r->tags[ublk_queue_id(q) * r->depth + tag];
	const struct ublksrv_io_desc *iod = ublk_queue_iod(q, tag);
	unsigned int op = ublksrv_get_op(iod);
	uint32_t len = iod->nr_sectors << 9;

	if (res == -EOPNOTSUPP && op == UBLK_IO_OP_WRITE_ZEROES && !rt->punch) {
		/* No ZERO_RANGE here (tmpfs): punching still reads back zeros. */
		rt->punch = true;
		raw_submit(q, tag);
		return;
	}
	if (res < 0 || (op != UBLK_IO_OP_READ && op != UBLK_IO_OP_WRITE)) {
		ublk_queue_complete(q, tag, res < 0 ? res : 0);
		return;
	}
	if (res == 0) {
		if (op == UBLK_IO_OP_WRITE) {
			/* A file write that makes no progress: the file system is full. */
			ublk_queue_complete(q, tag, -ENOSPC);
			return;
		}
		/* Past the end of the file: the rest reads as zeros. */
		res = ublk_queue_zero_data(q, tag, rt->done, len - rt->done);
		if (res < 0) {
			ublk_queue_complete(q, tag, res);
			return;
		}
		res = (int)(len - rt->done);
	}
	rt->done += res;
	if (rt->done < len)
		raw_submit(q, tag);
	else
		ublk_queue_complete(q, tag, (int)len);
}

static int raw_deinit(struct ublk_tgt *t)
{
	struct raw *r = t->priv;
	int ret = 0;

	if (!r)
		return 0;
	if (fdatasync(r->fd))
		ret = -errno;
	close(r->fd);
	free(r->tags);
	free(r);
	t->priv = NULL;
	return ret;
}

const struct ublk_tgt_ops ublk_raw_ops = {
	.name = "raw",
	.init = raw_init,
	.queue_io = raw_queue_io,
	.tgt_io_done = raw_io_done,
	.deinit = raw_deinit,
};
