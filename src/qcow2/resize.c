// SPDX-License-Identifier: MIT
/*
 * Resizing an image's virtual disk, offline, as QEMU's qcow2_co_truncate
 * does it. Growing: the L1 table grows (in place when its clusters have
 * room, else into new clusters written before the header points at them;
 * the old ones are freed after). Shrinking: every cluster past the new end
 * is released, the L1 entries past it are cleared (the table keeps its
 * size, as in QEMU) and the file is cut after the last used cluster.
 */
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

/* Flush until the queued frees are applied and written (as qcow2_close). */
static int flush_all(struct qcow2 *img)
{
	int i, ret = 0;

	for (i = 0; i < 1000 && !ret; i++) {
		ret = qcow2_flush(img);
		if (!img->rc_cache.nr_dirty && !img->nr_frees && !img->header_dirty &&
		    !img->l1_dirty && !img->l2_cache.nr_dirty && !img->reftable_dirty)
			break;
	}
	return ret;
}

/*
 * @n contiguous free clusters (refcounts raised), @n below the clusters one
 * refcount block covers: the allocator puts each new refcount block at the
 * start of the range it covers, so longer runs never come out of it.
 * 0 with *@out, or -errno.
 */
int qcow2_alloc_contig(struct qcow2 *img, uint64_t n, uint64_t *out)
{
	uint64_t start = 0, have = 0, host = 0, got = 0;
	struct qcow2_sync s;
	int ret;

	qcow2_sync_init(&s);
	while (have < n) {
		ret = QCOW2_SYNC(img, &s, qcow2_alloc_clusters(img, n - have, &s.w, &host, &got));
		if (ret < 0)
			goto fail;
		/* A run that does not continue the last one: start over from it. */
		if (have && host != start + (have << img->h.cluster_bits)) {
			qcow2_free_clusters(img, start, have);
			have = 0;
		}
		if (!have)
			start = host;
		have += got;
	}
	*out = start;
	return 0;
fail:
	if (have)
		qcow2_free_clusters(img, start, have);
	return ret;
}

/* Refcount blocks needed for clusters [@first, @end): ranges without one. */
static uint64_t missing_blocks(struct qcow2 *img, uint64_t first, uint64_t end)
{
	uint64_t k, m = 0;

	for (k = first >> img->rb_bits; k <= (end - 1) >> img->rb_bits; k++)
		if (k >= img->reftable.nr || !qcow2_table_get(&img->reftable, k))
			m++;
	return m;
}

/*
 * @n contiguous clusters for a table longer than one refcount block's
 * range: the refcount blocks of the ranges it covers go right before it
 * (blocks may lie anywhere; only the allocator keeps them in place), all
 * of them zeroed on disk before the refcount table points at them.
 * 0 with *@out, or -errno.
 */
static int alloc_long(struct qcow2 *img, uint64_t n, uint64_t *out)
{
	uint64_t q = img->free_hint, m = 0, prev, c, k, rc, j;
	struct qcow2_sync s;
	int ret;

	qcow2_sync_init(&s);
	for (;;) {
		/* The blocks count themselves: iterate to a fixed point. */
		do {
			prev = m;
			m = missing_blocks(img, q, q + m + n);
		} while (m != prev);
		for (c = q; c < q + m + n; c++) {
			ret = QCOW2_SYNC(img, &s, qcow2_refcount_get(img, c, &s.w, &rc));
			if (ret < 0)
				return ret;
			if (rc)
				break;
		}
		if (c < q + m + n) {
			q = c + 1;
			continue;
		}
		k = (q + m + n - 1) >> img->rb_bits;
		if (k < img->reftable.nr)
			break;
		/*
		 * The table cannot point at every block: grow it first, placed
		 * past this free range and durable on its own (as the allocator
		 * would), then take the range.
		 */
		ret = QCOW2_SYNC(img, &s, qcow2_reftable_reserve(img, k, &s.w));
		if (!ret)
			ret = flush_all(img);
		if (ret < 0)
			return ret;
	}
	for (j = 0; j < m; j++) {
		ret = qcow2_sync_pwrite(img, img->zero_buf, img->cluster_size,
					(q + j) << img->h.cluster_bits);
		if (ret < 0)
			return ret;
	}
	ret = qcow2_io_fsync(img->io, img->fd);
	if (ret < 0)
		return qcow2_error(img, ret, "cannot sync: %s", strerror(-ret));
	ret = qcow2_table_reserve(&img->reftable, q >> img->rb_bits,
				  ((q + m + n - 1) >> img->rb_bits) - (q >> img->rb_bits) + 1);
	if (ret < 0)
		return ret;
	j = 0;
	for (k = q >> img->rb_bits; k <= (q + m + n - 1) >> img->rb_bits; k++) {
		if (!qcow2_table_get(&img->reftable, k)) {
			ret = qcow2_table_set(&img->reftable, k, (q + j++) << img->h.cluster_bits);
			if (ret < 0)
				return ret;
			qcow2_reftable_note(img, k);
			img->reftable_dirty = true;
		}
	}
	for (c = q; c < q + m + n; c++) {
		ret = QCOW2_SYNC(img, &s, qcow2_refcount_add(img, c, 1, &s.w));
		if (ret < 0)
			return ret;
	}
	*out = (q + m) << img->h.cluster_bits;
	return 0;
}

static uint64_t l1_clusters(const struct qcow2 *img, uint64_t entries)
{
	return (entries * 8 + img->cluster_size - 1) >> img->h.cluster_bits;
}

/*
 * Resize the L1 table in memory to @entries and set what the header says of
 * it. 0, or -ENOMEM with nothing changed.
 */
static int set_l1(struct qcow2 *img, uint64_t entries, uint64_t off, uint64_t size)
{
	int ret = qcow2_table_resize(&img->l1, entries);

	if (ret < 0)
		return ret;
	img->h.l1_size = entries;
	img->h.l1_table_offset = off;
	img->h.size = size;
	return 0;
}

/*
 * Grow the L1 table to @new_l1 entries and set the virtual size to @size,
 * the table durable before the header that counts it.
 */
static int grow(struct qcow2 *img, uint64_t new_l1, uint64_t size)
{
	uint64_t old_clusters = l1_clusters(img, img->h.l1_size);
	uint64_t nr = l1_clusters(img, new_l1), bytes = nr << img->h.cluster_bits;
	uint64_t old_off = img->h.l1_table_offset, off = old_off, *be;
	uint64_t old_l1 = img->h.l1_size, old_size = img->h.size;
	bool moved = !old_off || nr > old_clusters;
	int ret;

	if (new_l1 <= img->h.l1_size) {
		img->h.size = size;
		return qcow2_header_write(img);
	}
	if (posix_memalign((void **)&be, 4096, bytes))
		return -ENOMEM;
	qcow2_table_read_be(&img->l1, 0, bytes / 8, be);
	if (moved) {
		if (nr < (1ull << img->rb_bits))
			ret = qcow2_alloc_contig(img, nr, &off);
		else
			ret = alloc_long(img, nr, &off);
		if (ret < 0)
			goto out;
		/* The new table's refcounts are durable before anything points at it. */
		ret = flush_all(img);
		if (ret < 0) {
			qcow2_free_clusters(img, off, nr);
			goto out;
		}
	}
	/* The new entries are zeros on disk before the header counts them. */
	ret = qcow2_sync_pwrite_ol(img, moved ? 0 : QCOW2_OL_ACTIVE_L1, be,
				   (new_l1 * 8 + 511) & ~511ull, off);
	if (!ret)
		ret = qcow2_io_fsync(img->io, img->fd);
	if (ret < 0) {
		if (moved)
			qcow2_free_clusters(img, off, nr);
		goto out;
	}
	/* The header and the table in memory change together (the overlap check reads both). */
	ret = set_l1(img, new_l1, off, size);
	if (ret < 0) {
		if (moved)
			qcow2_free_clusters(img, off, nr);
		goto out;
	}
	ret = qcow2_header_write(img);
	if (ret < 0) {
		set_l1(img, old_l1, old_off, old_size);
		goto out;
	}
	if (moved && old_off)
		ret = qcow2_free_clusters(img, old_off, old_clusters);
out:
	free(be);
	return ret;
}

/* Release every reference L2 table @l2_off holds, then the table itself. */
static int drop_table(struct qcow2 *img, uint64_t l2_off)
{
	uint32_t slice = img->l2_cache.slice_bytes;
	uint64_t per_slice = slice / img->l2_entry_bytes, so, i;
	struct qcow2_slice *s = NULL;
	struct qcow2_sync sync;
	int ret;

	qcow2_sync_init(&sync);
	for (so = l2_off; so < l2_off + img->cluster_size; so += slice) {
		ret = QCOW2_SYNC(img, &sync, qcow2_cache_get(&img->l2_cache, so, 0, &sync.w, &s));
		if (ret < 0)
			return ret;
		for (i = 0; i < per_slice && !ret; i++)
			ret = qcow2_free_entry(img, qcow2_l2_get(s, i));
		qcow2_cache_put(s);
		if (ret < 0)
			return ret;
	}
	return qcow2_free_clusters(img, l2_off, 1);
}

/*
 * Drop the refcount blocks that describe nothing but free clusters (and
 * perhaps themselves), as QEMU's qcow2_shrink_reftable does, so that the
 * file can end after the last cluster in use.
 */
static int drop_unused_blocks(struct qcow2 *img)
{
	uint64_t k, c, first, rc, blk, own;
	struct qcow2_sync s;
	int ret;

	qcow2_sync_init(&s);
	for (k = 0; k < img->reftable.nr; k++) {
		if (qcow2_table_hole(&img->reftable, k)) {
			k |= QCOW2_TABLE_CHUNK - 1;
			continue;
		}
		blk = qcow2_table_get(&img->reftable, k);
		if (!blk)
			continue;
		first = k << img->rb_bits;
		own = blk >> img->h.cluster_bits;
		for (c = first; c < first + (1ull << img->rb_bits); c++) {
			ret = QCOW2_SYNC(img, &s, qcow2_refcount_get(img, c, &s.w, &rc));
			if (ret < 0)
				return ret;
			if (rc && !(c == own && rc == 1))
				break;
		}
		if (c < first + (1ull << img->rb_bits))
			continue;
		/* A nonzero entry: its chunk exists, clearing it cannot fail. */
		ret = qcow2_table_set(&img->reftable, k, 0);
		if (ret < 0)
			return ret;
		img->reftable_dirty = true;
		/* A block inside its own range goes with its reference. */
		if ((own >> img->rb_bits) != k) {
			ret = qcow2_free_clusters(img, blk, 1);
			if (ret < 0)
				return ret;
		}
	}
	ret = flush_all(img);
	/* Dropped blocks may be reused: no stale copy may stay cached. */
	if (!ret)
		qcow2_cache_drop(&img->rc_cache);
	return ret;
}

/* The last host cluster with a nonzero refcount, below the file end. */
static int last_used(struct qcow2 *img, uint64_t *last)
{
	uint64_t c = (img->file_end + img->cluster_size - 1) >> img->h.cluster_bits, rc = 0;
	struct qcow2_sync s;
	int ret;

	qcow2_sync_init(&s);
	while (c > 0) {
		c--;
		ret = QCOW2_SYNC(img, &s, qcow2_refcount_get(img, c, &s.w, &rc));
		if (ret < 0)
			return ret;
		if (rc)
			break;
	}
	*last = c;
	return 0;
}

/*
 * Unmap the clusters of guest [@start, @end) (cluster aligned, inside one
 * L2 table) as QEMU's full discard does: the entries become unallocated.
 */
static int clear_range(struct qcow2 *img, uint64_t start, uint64_t end)
{
	uint64_t l2_off = 0, l1e, slice_off, idx, e, pos;
	struct qcow2_slice *s = NULL;
	struct qcow2_sync sync;
	int ret;

	if (start >= end)
		return 0;
	ret = qcow2_l1_lookup(img, start, &l2_off, &l1e);
	if (ret < 0 || !l2_off)
		return ret;
	ret = qcow2_l2_table_sync(img, start, &l2_off);
	if (ret < 0)
		return ret;
	qcow2_sync_init(&sync);
	for (pos = start; pos < end; pos += img->cluster_size) {
		qcow2_l2_locate(img, l2_off, pos, &slice_off, &idx);
		ret = QCOW2_SYNC(img, &sync, qcow2_cache_get(&img->l2_cache, slice_off,
							     QCOW2_CACHE_MODIFY, &sync.w, &s));
		if (ret < 0)
			return ret;
		e = qcow2_l2_get(s, idx);
		if (e)
			ret = qcow2_free_entry(img, e);
		if ((e || qcow2_l2_bitmap(s, idx)) && !ret) {
			qcow2_l2_set(s, idx, 0);
			if (img->l2_entry_bytes == 16)
				qcow2_l2_set_bitmap(s, idx, 0);
			qcow2_cache_mark_dirty(s);
		}
		qcow2_cache_put(s);
		if (ret < 0)
			return ret;
	}
	return 0;
}

static int shrink(struct qcow2 *img, uint64_t new_l1, uint64_t size)
{
	uint64_t cs = img->cluster_size, start = (size + cs - 1) & ~(cs - 1);
	uint64_t end = (img->h.size + cs - 1) & ~(cs - 1), i, last = 0;
	int ret;

	/* The last table that stays: its clusters past the end go. */
	if (end > new_l1 * qcow2_l2_span(img))
		end = new_l1 * qcow2_l2_span(img);
	ret = clear_range(img, start, end);
	if (ret < 0)
		return ret;
	for (i = new_l1; i < img->h.l1_size; i++) {
		uint64_t l2_off, l1e;

		ret = qcow2_l1_lookup(img, i * qcow2_l2_span(img), &l2_off, &l1e);
		if (ret < 0)
			return ret;
		if (!l2_off)
			continue;
		ret = drop_table(img, l2_off);
		if (ret < 0)
			return ret;
		ret = qcow2_table_set(&img->l1, i, 0);
		if (ret < 0)
			return ret;
		img->l1_dirty = true;
	}
	/* Freed tables may be reused: no stale copy may stay cached. */
	ret = flush_all(img);
	if (ret < 0)
		return ret;
	qcow2_cache_drop(&img->l2_cache);
	img->h.size = size;
	ret = qcow2_header_write(img);
	if (!ret)
		ret = flush_all(img);
	if (!ret)
		ret = drop_unused_blocks(img);
	if (!ret)
		ret = last_used(img, &last);
	if (ret < 0)
		return ret;
	if ((last + 1) * cs < img->file_end) {
		/* As QEMU: a tail that cannot be cut costs space, not correctness. */
		if (ftruncate(img->fd, (last + 1) * cs) == 0)
			img->file_end = img->file_size = (last + 1) * cs;
	}
	return 0;
}

/*
 * Set the external data file's length to @len (@exact), or to at least
 * @len, as QEMU's truncate of the data file child, and make it durable.
 */
static int data_file_truncate(struct qcow2 *img, uint64_t len, bool exact)
{
	struct stat st;
	int ret;

	if (fstat(img->data_fd, &st) < 0)
		return qcow2_error(img, -errno, "cannot stat data file %s: %s", img->data_file,
				   strerror(errno));
	if ((uint64_t)st.st_size == len || (!exact && (uint64_t)st.st_size > len))
		return 0;
	if (ftruncate(img->data_fd, len) < 0)
		return qcow2_error(img, -errno, "cannot resize data file %s: %s", img->data_file,
				   strerror(errno));
	ret = qcow2_io_fsync(img->io, img->data_fd);
	if (ret < 0)
		return qcow2_error(img, ret, "cannot sync data file %s: %s", img->data_file,
				   strerror(-ret));
	return 0;
}

/*
 * data_file_raw: every cluster of guest [@old, @size) maps the same offset
 * of the data file, as QEMU's metadata preallocation of the grown area
 * (subcluster bitmaps untouched, as its preallocated links leave them).
 */
static int map_raw(struct qcow2 *img, uint64_t old, uint64_t size)
{
	uint64_t pos, l2_off = 0, slice_off, idx;
	struct qcow2_slice *s = NULL;
	struct qcow2_sync sync;
	int ret;

	qcow2_sync_init(&sync);
	for (pos = qcow2_cluster_off(img, old); pos < size; pos += img->cluster_size) {
		if (pos == qcow2_cluster_off(img, old) || !qcow2_l2_index(img, pos)) {
			ret = qcow2_l2_table_sync(img, pos, &l2_off);
			if (ret < 0)
				return ret;
		}
		qcow2_l2_locate(img, l2_off, pos, &slice_off, &idx);
		ret = QCOW2_SYNC(img, &sync, qcow2_cache_get(&img->l2_cache, slice_off,
							     QCOW2_CACHE_MODIFY, &sync.w, &s));
		if (ret < 0)
			return ret;
		/* Cluster 0 maps host offset 0: COPIED tells it from unmapped. */
		if (!(qcow2_l2_get(s, idx) & (L2E_OFFSET_MASK | QCOW2_OFLAG_COPIED))) {
			qcow2_l2_set(s, idx, pos | QCOW2_OFLAG_COPIED);
			qcow2_cache_mark_dirty(s);
		}
		qcow2_cache_put(s);
	}
	return 0;
}

int qcow2_resize(struct qcow2 *img, uint64_t size)
{
	uint64_t new_l1, old = img->h.size, zero_end;
	int ret;

	if (img->raw || img->read_only)
		return qcow2_error(img, -EROFS, "resizing needs a writable qcow2 image");
	if (qcow2_busy(img))
		return qcow2_error(img, -EBUSY, "resizing needs an idle image");
	if (img->corrupt)
		return qcow2_error(img, -EIO, "image is marked corrupt; refusing to resize");
	if (size % 512)
		return qcow2_error(img, -EINVAL, "the new size must be a multiple of 512");
	if (size > (1ull << 62))
		return qcow2_error(img, -EFBIG, "the new size is too large");
	if (img->h.nb_snapshots && img->h.version < 3)
		return qcow2_error(img, -ENOTSUP, "cannot resize a v2 image which has snapshots");
	new_l1 = (size + qcow2_l2_span(img) - 1) / qcow2_l2_span(img);
	if (new_l1 * 8 > QCOW2_MAX_L1_BYTES)
		return qcow2_error(img, -EFBIG,
				   "the new size needs an L1 table over %u bytes (try a larger cluster size)",
				   QCOW2_MAX_L1_BYTES);
	/* Everything in the caches is durable first: the tables are rewritten directly. */
	ret = flush_all(img);
	if (ret < 0)
		return ret;
	if (size < old) {
		ret = shrink(img, new_l1, size);
		/* The data file's tail goes only once nothing maps it. */
		if (!ret && img->data_fd >= 0)
			ret = data_file_truncate(img, size, true);
		return ret;
	}
	ret = grow(img, new_l1, size);
	if (ret < 0 || size == old)
		return ret;
	if (img->data_raw) {
		/* The file has the room before the entries that map it exist. */
		ret = data_file_truncate(img, (size + img->cluster_size - 1) &
					 ~(img->cluster_size - 1), false);
		if (!ret)
			ret = map_raw(img, old, size);
		if (ret < 0)
			return ret;
	} else if (img->data_fd >= 0) {
		ret = data_file_truncate(img, size, true);
		if (ret < 0)
			return ret;
	}
	/* A backing file reaching into the new area must not show through (as QEMU). */
	if (img->backing && img->backing->h.size > old) {
		zero_end = img->backing->h.size < size ? img->backing->h.size : size;
		ret = qcow2_write_zeroes(img, zero_end - old, old, true);
		if (ret < 0)
			return ret;
	}
	return flush_all(img);
}
