// SPDX-License-Identifier: MIT
/*
 * Blocking building blocks for the offline operations (compressed writes,
 * resize): running parked engine steps to completion, file writes that keep
 * img->file_end right, and L2 table creation outside the request machine.
 * They assume no request is in flight on the image.
 */
#include <stdlib.h>

#include "internal.h"

static void sync_wake(struct qcow2_wait *w, int res)
{
	struct qcow2_sync *s = (struct qcow2_sync *)w;

	s->woken = true;
	s->res = res;
}

void qcow2_sync_init(struct qcow2_sync *s)
{
	s->w.next = NULL;
	s->w.fn = sync_wake;
	s->woken = false;
	s->res = 0;
}

/**
 * qcow2_sync_wait - run the I/O backend until @s is woken
 *
 * Returns 0 (retry the step), the negative errno the waker passed, or -EIO
 * when nothing is in flight that could ever wake it.
 */
int qcow2_sync_wait(struct qcow2 *img, struct qcow2_sync *s)
{
	while (!s->woken) {
		int ret = img->io->wait(img->io);

		if (ret == -EAGAIN)
			return qcow2_error(img, -EIO, "engine stalled waiting for metadata");
		if (ret < 0)
			return ret;
	}
	return s->res;
}

/**
 * qcow2_sync_pwrite - write @len bytes at host @off and wait for them
 *
 * Clusters past img->file_end are known to read as zeros; a write here
 * moves that mark like every request write does. Returns 0 or -errno with
 * img->errmsg set.
 */
int qcow2_sync_pwrite(struct qcow2 *img, const void *buf, size_t len, uint64_t off)
{
	return qcow2_sync_pwrite_ol(img, 0, buf, len, off);
}

/* The same for a write meant to update the metadata named by @ign (QCOW2_OL_*). */
int qcow2_sync_pwrite_ol(struct qcow2 *img, unsigned int ign, const void *buf, size_t len,
			 uint64_t off)
{
	int ret = qcow2_overlap_check(img, ign, off, len);

	if (ret < 0)
		return ret;
	ret = qcow2_io_pwrite(img->io, img->fd, buf, len, off);
	if (off + len > img->file_end)
		img->file_end = off + len;
	if (ret < 0)
		return qcow2_error(img, ret, "cannot write at 0x%llx: %s",
				   (unsigned long long)off, strerror(-ret));
	return 0;
}

/*
 * Write @table (a cluster) to a new cluster and point L1 entry @i at it,
 * in that order. 0 with its offset in *@l2_off, or -errno (nothing kept).
 */
static int l2_table_place(struct qcow2 *img, uint64_t i, const void *table, uint64_t *l2_off)
{
	uint64_t host, got;
	struct qcow2_sync s;
	int ret;

	qcow2_sync_init(&s);
	ret = QCOW2_SYNC(img, &s, qcow2_alloc_clusters(img, 1, &s.w, &host, &got));
	if (ret < 0)
		return ret;
	ret = qcow2_sync_pwrite(img, table, img->cluster_size, host);
	if (!ret)
		ret = qcow2_table_set(&img->l1, i, host | QCOW2_OFLAG_COPIED);
	if (ret < 0) {
		qcow2_free_clusters(img, host, 1);
		return ret;
	}
	qcow2_l1_note(img, i);
	qcow2_pieces_mark(&img->l1_pieces, &img->l1_dirty, i);
	*l2_off = host;
	return 0;
}

/*
 * Point L1 entry @i at a copy of the shared L2 table *@l2_off (then the
 * copy's); the old table loses this reference unless its refcount @rc is
 * already 0 (a corrupt image: freeing it would underflow; QEMU's free fails
 * there and is ignored).
 */
static int l2_table_copy(struct qcow2 *img, uint64_t i, uint64_t *l2_off, uint64_t rc)
{
	uint64_t old = *l2_off;
	void *buf;
	int ret;

	if (posix_memalign(&buf, 4096, img->cluster_size))
		return qcow2_error(img, -ENOMEM, "out of memory");
	/* The caches were flushed, and a shared table is never dirty in them. */
	ret = qcow2_io_pread(img->io, img->fd, buf, img->cluster_size, old);
	if (ret < 0) {
		qcow2_error(img, ret, "cannot read the L2 table at 0x%llx: %s",
			    (unsigned long long)old, strerror(-ret));
		goto out;
	}
	ret = l2_table_place(img, i, buf, l2_off);
	if (!ret && rc)
		ret = qcow2_free_clusters(img, old, 1);
out:
	free(buf);
	return ret;
}

/**
 * qcow2_l2_table_sync - make the L2 table of guest offset @off writable
 *
 * A missing table is allocated and zeroed on disk before the L1 entry
 * points at it (the refcount reaches disk first: flush.c). Returns 0 with
 * the table's host offset in *@l2_off, or -errno. A table shared with a
 * snapshot is copied first, as QEMU's l2_allocate does: the copy is
 * written before the L1 entry points at it, and the old table loses this
 * reference only at the next flush (qcow2_free_clusters), after the L1
 * entry. The data clusters keep their counts: both tables reach them.
 */
int qcow2_l2_table_sync(struct qcow2 *img, uint64_t off, uint64_t *l2_off)
{
	uint64_t i = qcow2_l1_index(img, off), l1e, rc;
	struct qcow2_sync s;
	int ret;

	qcow2_sync_init(&s);
	ret = qcow2_l1_lookup(img, off, l2_off, &l1e);
	if (ret < 0)
		return ret;
	if (*l2_off && (l1e & QCOW2_OFLAG_COPIED))
		return 0;
	if (*l2_off) {
		ret = QCOW2_SYNC(img, &s, qcow2_refcount_get(img, *l2_off >> img->h.cluster_bits,
							   &s.w, &rc));
		if (ret < 0)
			return ret;
		if (rc != 1)
			return l2_table_copy(img, i, l2_off, rc);
		ret = qcow2_table_set(&img->l1, i, l1e | QCOW2_OFLAG_COPIED);
		if (ret < 0)
			return ret;
		qcow2_pieces_mark(&img->l1_pieces, &img->l1_dirty, i);
		return 0;
	}
	return l2_table_place(img, i, img->zero_buf, l2_off);
}
