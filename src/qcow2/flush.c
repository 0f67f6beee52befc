// SPDX-License-Identifier: MIT
/*
 * Flush: write dirty metadata back in dependency order and make it durable.
 *
 *   SNAPSHOT ─► REFCOUNTS ─► sync ─► REFTABLE ─► sync ─► HEADER ─► sync ─►
 *               L2 ─► sync ─► L1 ─► sync ─► FREES
 *
 * What is dirty is taken at one instant (SNAPSHOT) and written as it was
 * then, whatever requests do meanwhile, so what is written is mutually
 * consistent: every cluster a written L2 slice points at has its refcount
 * raised in the written refcount slices. Slices are written from the cache
 * itself, not copied (a cache full of dirty slices would otherwise be held
 * twice): from SNAPSHOT until its write completes a slice is "flushing", and
 * a request that means to change it parks in qcow2_cache_get until then
 * (QCOW2_CACHE_MODIFY). A slice pinned at SNAPSHOT (the flush started inside
 * a step holding it, which may still change it) is copied instead. Tables
 * and the header are copied: of the L1 and refcount tables only the 512-byte
 * pieces changed since the last flush, unless a table was replaced whole.
 * Refcounts (and the table that locates them, and the header that locates
 * the table) are durable before any L2 entry that needs them; L2 tables
 * before the L1 entries that point at them. A new refcount block is durable
 * before the table entry that points at it: the block holds its own
 * refcount, and a table entry reaching disk first would name a block of
 * zeros, a referenced cluster with refcount 0 (as QEMU, which writes the
 * block and flushes before it links it). Data writes completed before the
 * snapshot are covered by the first sync. Frees queued before the snapshot
 * are applied to the cache last, once the L2 entries that dropped them are
 * durable. One flush runs at a time; a flush asked for while one runs gets
 * the next one. Every write passes the overlap check (overlap.c) first; once
 * the image is corrupt a flush writes the header alone, for its corrupt bit.
 */
#include <stdlib.h>

#include "internal.h"

enum flush_phase {
	PH_IDLE,
	PH_REFCOUNTS,
	PH_REFTABLE,
	PH_HEADER,
	PH_L2,
	PH_L1,
	PH_FREES,
};

struct flush_item {
	struct qcow2_aio aio;
	struct iovec iov;
	struct qcow2_flush_job *job;
	struct qcow2_slice *slice;	/* NULL for tables and the header */
	enum flush_phase phase;
	void *buf;			/* the slice's own data, img->zero_buf, or a copy we free */
};

struct qcow2_flush_job {
	struct qcow2 *img;
	enum flush_phase phase;
	bool syncing;			/* this phase's writes are out: sync next */
	bool had_reftable, had_header, had_l1;
	unsigned int pending;
	int err;
	struct flush_item *items;
	size_t nr_items, items_alloc;
	struct qcow2_aio sync_aio;
	struct qcow2_aio data_sync_aio;	/* the external data file's */
	struct qcow2_wait wait;
	struct qcow2_waitq cur, next;
};

static void flush_step(struct qcow2_flush_job *j);
static void flush_run(struct qcow2_flush_job *j);

static void item_release(struct flush_item *it, bool failed)
{
	struct qcow2_slice *s = it->slice;

	if (s) {
		/* A phase never reached: its slices' modifiers go on too. */
		qcow2_cache_write_done(s);
		s->writing = false;
		if (failed)
			qcow2_cache_mark_dirty(s);
	}
	if ((!s || it->buf != s->data) && it->buf != it->job->img->zero_buf)
		free(it->buf);
	it->buf = NULL;
}

static void release_items(struct qcow2_flush_job *j, bool failed)
{
	size_t i;

	for (i = 0; i < j->nr_items; i++)
		item_release(&j->items[i], failed);
	j->nr_items = 0;
	qcow2_waitq_wake(&j->img->l2_cache.full_waiters, 0);
	qcow2_waitq_wake(&j->img->rc_cache.full_waiters, 0);
}

/* A write of @len bytes at @off from @buf, or from a buffer of its own if NULL. */
static struct flush_item *add_item(struct qcow2_flush_job *j, enum flush_phase phase,
				   uint64_t off, size_t len, void *buf)
{
	struct flush_item *it;

	if (j->nr_items == j->items_alloc) {
		size_t n = j->items_alloc ? 2 * j->items_alloc : 64;
		struct flush_item *ni = realloc(j->items, n * sizeof(*ni));

		if (!ni)
			return NULL;
		j->items = ni;
		j->items_alloc = n;
	}
	if (!buf && posix_memalign(&buf, 4096, len))
		return NULL;
	it = &j->items[j->nr_items++];
	memset(it, 0, sizeof(*it));
	it->job = j;
	it->phase = phase;
	it->buf = buf;
	it->iov = (struct iovec){ .iov_base = buf, .iov_len = len };
	it->aio.op = QCOW2_AIO_WRITE;
	it->aio.fd = j->img->fd;
	it->aio.off = off;
	it->aio.iovcnt = 1;
	return it;
}

static int snap_cache(struct qcow2_flush_job *j, struct qcow2_cache *c, enum flush_phase phase)
{
	unsigned int i;

	for (i = 0; i < c->nr && c->nr_dirty; i++) {
		struct qcow2_slice *s = &c->slices[i];
		struct flush_item *it;

		if (!s->dirty)
			continue;
		it = add_item(j, phase, s->off, c->slice_bytes, s->ref ? NULL : s->data);
		if (!it)
			return -ENOMEM;
		it->slice = s;
		if (s->ref)
			memcpy(it->buf, s->data, c->slice_bytes);
		else
			s->flushing = true;
		s->writing = true;
		s->dirty = false;
		c->nr_dirty--;
	}
	return 0;
}

/* Is entry @i of @t zero as far as its chunk tells (past the end: yes)? */
static bool in_hole(const struct qcow2_table *t, uint64_t i)
{
	return i >= t->nr || qcow2_table_hole(t, i);
}

/*
 * A whole table of @bytes (a multiple of 512) as big-endian copies of its
 * chunks in use; runs of absent chunks and what lies past the table's end
 * written from the zero buffer, so that a 16 MiB L1 table of a fresh 4 TiB
 * image is not copied whole.
 */
static int snap_table(struct qcow2_flush_job *j, enum flush_phase phase, uint64_t off,
		      const struct qcow2_table *t, uint64_t bytes)
{
	uint64_t n = bytes / 8, zmax = (1ull << QCOW2_MAX_CLUSTER_BITS) / 8, i, end;
	struct flush_item *it;
	bool hole;

	for (i = 0; i < n; i = end) {
		hole = in_hole(t, i);
		end = (i | (QCOW2_TABLE_CHUNK - 1)) + 1;
		while (end < n && in_hole(t, end) == hole && (!hole || end - i < zmax))
			end += QCOW2_TABLE_CHUNK;
		if (end > n)
			end = n;
		it = add_item(j, phase, off + i * 8, (end - i) * 8, hole ? j->img->zero_buf : NULL);
		if (!it)
			return -ENOMEM;
		if (!hole)
			qcow2_table_read_be(t, i, end - i, it->buf);
	}
	return 0;
}

static int snap_header(struct qcow2_flush_job *j)
{
	struct qcow2 *img = j->img;
	struct flush_item *it = add_item(j, PH_HEADER, 0, img->cluster_size, NULL);
	int ret;

	if (!it)
		return -ENOMEM;
	memset(it->buf, 0, img->cluster_size);
	ret = qcow2_header_serialize(img, it->buf, img->cluster_size);
	if (ret < 0)
		return qcow2_error(img, ret, "header does not fit in its cluster");
	it->iov.iov_len = (ret + 511) & ~511;
	img->header_dirty = false;
	return 0;
}

/*
 * The pieces of a table marked in @p, as big-endian copies: one write per
 * run of marked pieces, entries at or past @entries written as zeros. The
 * marks are cleared.
 */
static bool piece_set(const struct qcow2_pieces *p, uint64_t k)
{
	return p->bits[k / 64] & (1ull << (k % 64));
}

static int snap_pieces(struct qcow2_flush_job *j, enum flush_phase phase, uint64_t off,
		       const struct qcow2_table *t, struct qcow2_pieces *p)
{
	uint64_t k = 0, end;
	struct flush_item *it;

	while (p->nr_dirty) {
		while (!piece_set(p, k))
			k++;
		for (end = k + 1; end < p->nr && piece_set(p, end); end++)
			;
		it = add_item(j, phase, off + k * QCOW2_PIECE_ENTRIES * 8,
			      (end - k) * QCOW2_PIECE_ENTRIES * 8, NULL);
		if (!it)
			return -ENOMEM;
		qcow2_table_read_be(t, k * QCOW2_PIECE_ENTRIES, (end - k) * QCOW2_PIECE_ENTRIES,
				    it->buf);
		p->nr_dirty -= end - k;
		for (; k < end; k++)
			p->bits[k / 64] &= ~(1ull << (k % 64));
	}
	return 0;
}

/* Metadata changes a flush of a corrupt image leaves unwritten. */
static bool held_back(const struct qcow2 *img)
{
	return img->rc_cache.nr_dirty || img->l2_cache.nr_dirty || img->l1_dirty ||
	       img->reftable_dirty || img->l1_pieces.nr_dirty || img->rt_pieces.nr_dirty ||
	       img->nr_frees;
}

/* Forget the marked pieces of a table written whole. */
static void pieces_clear(struct qcow2_pieces *p)
{
	if (p->nr_dirty)
		memset(p->bits, 0, (p->nr + 63) / 64 * 8);
	p->nr_dirty = 0;
}

/* Copy everything dirty, at one instant. */
static int snapshot(struct qcow2_flush_job *j)
{
	struct qcow2 *img = j->img;
	uint64_t cs = img->cluster_size;
	int ret;

	if (img->corrupt) {
		/*
		 * Metadata was found corrupt: only the header, with its corrupt
		 * bit, goes out. Writing the rest could spread the damage (QEMU
		 * stops all I/O to such an image); it stays dirty, unwritten.
		 */
		img->nr_frees_sealed = 0;
		j->had_reftable = j->had_l1 = false;
		j->had_header = img->header_dirty;
		return img->header_dirty ? snap_header(j) : 0;
	}
	img->nr_frees_sealed = img->nr_frees;
	/* A failed flush marks a table whole dirty again, whatever it wrote of it. */
	j->had_reftable = img->reftable_dirty || img->rt_pieces.nr_dirty;
	j->had_header = img->header_dirty;
	j->had_l1 = img->l1_dirty || img->l1_pieces.nr_dirty;
	ret = snap_cache(j, &img->rc_cache, PH_REFCOUNTS);
	if (!ret && img->reftable_dirty) {
		ret = snap_table(j, PH_REFTABLE, img->h.refcount_table_offset, &img->reftable,
				 (uint64_t)img->h.refcount_table_clusters * cs);
		img->reftable_dirty = false;
		pieces_clear(&img->rt_pieces);
	} else if (!ret) {
		ret = snap_pieces(j, PH_REFTABLE, img->h.refcount_table_offset, &img->reftable,
				  &img->rt_pieces);
	}
	if (!ret && img->header_dirty)
		ret = snap_header(j);
	if (!ret)
		ret = snap_cache(j, &img->l2_cache, PH_L2);
	if (!ret && img->l1_dirty) {
		ret = snap_table(j, PH_L1, img->h.l1_table_offset, &img->l1,
				 ((uint64_t)img->h.l1_size * 8 + 511) & ~511ull);
		img->l1_dirty = false;
		pieces_clear(&img->l1_pieces);
	} else if (!ret) {
		ret = snap_pieces(j, PH_L1, img->h.l1_table_offset, &img->l1, &img->l1_pieces);
	}
	return ret;
}

static void flush_done(struct qcow2_flush_job *j, int res)
{
	struct qcow2 *img = j->img;

	release_items(j, res < 0);
	if (res < 0) {
		/* What was not written stays dirty; nothing is freed early. */
		img->reftable_dirty |= j->had_reftable;
		img->header_dirty |= j->had_header;
		img->l1_dirty |= j->had_l1;
		img->nr_frees_sealed = 0;
	}
	j->phase = PH_IDLE;
	qcow2_waitq_wake(&j->cur, res);
	if (j->next.head && j->phase == PH_IDLE)
		flush_run(j);
}

/* Start a flush for everyone waiting on @j->next. */
static void flush_run(struct qcow2_flush_job *j)
{
	j->cur = j->next;
	j->next.head = j->next.tail = NULL;
	j->phase = PH_REFCOUNTS;
	j->syncing = false;
	j->pending = 0;
	j->err = snapshot(j);
	flush_step(j);
}

static void io_done(struct qcow2_aio *aio, int res)
{
	struct qcow2_flush_job *j;

	if (aio->op == QCOW2_AIO_FSYNC && aio->done == io_done) {
		j = (struct qcow2_flush_job *)((char *)aio - offsetof(struct qcow2_flush_job, sync_aio));
	} else if (aio->op == QCOW2_AIO_FSYNC) {
		j = (struct qcow2_flush_job *)((char *)aio -
					       offsetof(struct qcow2_flush_job, data_sync_aio));
	} else {
		struct flush_item *it = (struct flush_item *)aio;

		j = it->job;
		/* A short write: the file system is full (as QEMU reads it). */
		if (res >= 0 && (size_t)res != it->iov.iov_len)
			res = -ENOSPC;
		/*
		 * Its write is over: the slice may change again. If it failed
		 * the flush fails and marks the slice dirty again at its end.
		 */
		if (it->slice)
			qcow2_cache_write_done(it->slice);
	}
	if (res < 0 && !j->err) {
		j->err = res;
		qcow2_error(j->img, res, "metadata write failed: %s", strerror(-res));
	}
	if (--j->pending == 0)
		flush_step(j);
}

static void data_sync_done(struct qcow2_aio *aio, int res)
{
	io_done(aio, res);
}

/* The metadata @it is meant to update: the overlap check ignores it. */
static unsigned int item_ol(const struct flush_item *it)
{
	switch (it->phase) {
	case PH_REFCOUNTS:
		return QCOW2_OL_REFCOUNT_BLOCK;
	case PH_REFTABLE:
		return QCOW2_OL_REFCOUNT_TABLE;
	case PH_HEADER:
		return QCOW2_OL_HEADER;
	case PH_L2:
		return QCOW2_OL_ACTIVE_L2;
	default:
		return QCOW2_OL_ACTIVE_L1;
	}
}

/* Submit the writes of the current phase, or the sync that closes it. */
static int submit_phase(struct qcow2_flush_job *j)
{
	struct qcow2 *img = j->img;
	size_t i;
	int ret;

	for (i = 0; i < j->nr_items; i++) {
		struct flush_item *it = &j->items[i];

		if (it->phase != j->phase)
			continue;
		ret = qcow2_overlap_check(img, item_ol(it), it->aio.off, it->iov.iov_len);
		if (ret < 0)
			return ret;
		it->aio.iov = &it->iov;
		it->aio.done = io_done;
		j->pending++;
		ret = qcow2_submit(img, &it->aio);
		if (ret < 0) {
			j->pending--;
			return ret;
		}
	}
	return 0;
}

static bool phase_has_items(struct qcow2_flush_job *j)
{
	size_t i;

	for (i = 0; i < j->nr_items; i++)
		if (j->items[i].phase == j->phase)
			return true;
	return false;
}

static int submit_sync(struct qcow2_flush_job *j)
{
	int ret;

	j->sync_aio = (struct qcow2_aio){ .op = QCOW2_AIO_FSYNC, .fd = j->img->fd,
					  .done = io_done };
	j->pending++;
	ret = qcow2_submit(j->img, &j->sync_aio);
	if (ret < 0) {
		j->pending--;
		return ret;
	}
	if (j->img->data_fd < 0)
		return 0;
	/* Data in an external file must be as durable as the metadata naming it. */
	j->data_sync_aio = (struct qcow2_aio){ .op = QCOW2_AIO_FSYNC, .fd = j->img->data_fd,
					       .done = data_sync_done };
	j->pending++;
	ret = qcow2_submit(j->img, &j->data_sync_aio);
	if (ret < 0)
		j->pending--;
	return ret;
}

static void frees_wake(struct qcow2_wait *w, int res)
{
	struct qcow2_flush_job *j = (struct qcow2_flush_job *)((char *)w -
				     offsetof(struct qcow2_flush_job, wait));

	if (res < 0 && !j->err)
		j->err = res;
	flush_step(j);
}

/*
 * Advance the flush. Each phase: submit its writes (if any), wait, sync,
 * wait, next phase. Phases without writes skip their sync, except the first:
 * data must be durable even when no metadata is dirty.
 */
static void flush_step(struct qcow2_flush_job *j)
{
	int ret;

	for (;;) {
		if (j->pending)
			return;
		if (j->err) {
			flush_done(j, j->err);
			return;
		}
		if (j->phase == PH_FREES) {
			/* Everything is written and synced: the slices may go. */
			if (j->nr_items)
				release_items(j, false);
			if (j->img->corrupt) {
				flush_done(j, held_back(j->img) ?
					   qcow2_error(j->img, -EIO, "image is corrupt: "
						       "metadata changes left unwritten") : 0);
				return;
			}
			ret = qcow2_apply_frees(j->img, &j->wait);
			if (ret != -EAGAIN)
				flush_done(j, ret);
			return;
		}
		if (!j->syncing) {
			j->syncing = true;
			if (phase_has_items(j)) {
				ret = submit_phase(j);
				if (ret < 0)
					j->err = ret;
			} else if (j->phase != PH_REFCOUNTS) {
				j->syncing = false;
				j->phase++;
			}
			continue;
		}
		j->syncing = false;
		ret = submit_sync(j);
		if (ret < 0)
			j->err = ret;
		j->phase++;
	}
}

int qcow2_flush_start(struct qcow2 *img, struct qcow2_wait *w)
{
	struct qcow2_flush_job *j = img->flush;

	if (img->read_only)
		return -EROFS;
	if (!j) {
		j = calloc(1, sizeof(*j));
		if (!j)
			return -ENOMEM;
		j->img = img;
		j->wait.fn = frees_wake;
		img->flush = j;
	}
	if (j->phase != PH_IDLE) {
		qcow2_waitq_add(&j->next, w);
		return -EAGAIN;
	}
	qcow2_waitq_add(&j->next, w);
	flush_run(j);
	return -EAGAIN;
}

bool qcow2_flush_busy(const struct qcow2 *img)
{
	return img->flush && img->flush->phase != PH_IDLE;
}

void qcow2_flush_free(struct qcow2 *img)
{
	struct qcow2_flush_job *j = img->flush;

	if (!j)
		return;
	release_items(j, false);
	free(j->items);
	free(j);
	img->flush = NULL;
}
