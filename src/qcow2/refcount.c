// SPDX-License-Identifier: MIT
/*
 * Refcounts: lookups through the refcount-block cache, cluster allocation
 * from a free-space hint, refcount block creation and refcount table growth,
 * and deferred frees.
 *
 * Invariants (with flush.c):
 *  1. A cluster's refcount is raised in memory before anything points at it,
 *     and reaches disk (flush phase 1 + fdatasync) before the L2/L1 entry
 *     that points at it does.
 *  2. A decrement is applied only after the L2 change that dropped the
 *     reference is durable (frees are sealed by a flush and applied at its
 *     end), so refcount blocks can be written back at any time.
 *  3. A range with no refcount block has refcount 0 everywhere, so its first
 *     cluster is free to hold the block that will describe it.
 */
#include <fcntl.h>
#include <stdlib.h>

#include "internal.h"

#define MAX_HOST_CLUSTER_BYTES	(1ull << 56)

enum grow_state { GROW_IDLE, GROW_ZEROING };

/* The one refcount-structure change in progress; allocators wait on it. */
struct qcow2_rc_grow {
	enum grow_state state;
	uint64_t rt_idx;		/* block being created (simple case) */
	bool grow_table;
	uint64_t new_size;		/* table entries after growth */
	uint64_t base;			/* first new cluster (index) */
	uint64_t nr_new;		/* new blocks (k) + table clusters */
	uint64_t nr_blocks;		/* k */
	uint64_t marked;		/* new clusters whose refcount is set */
	unsigned int pending;
	int err;
	struct qcow2 *img;
	struct qcow2_wait wait;
	struct qcow2_waitq waiters;
	struct grow_aio {
		struct qcow2_aio aio;
		struct iovec iov;
		struct qcow2_rc_grow *g;
	} aios[8];
};

static void grow_step(struct qcow2_rc_grow *g);

/*
 * Where the refcount of host cluster @cluster lives: the slice offset and
 * the entry index inside the slice. 1 if no refcount block covers it (the
 * refcount is 0), 0 if found, -EIO on a corrupt table entry.
 */
static int rc_locate(struct qcow2 *img, uint64_t cluster, uint64_t *slice_off, uint64_t *idx)
{
	uint64_t rt_idx = cluster >> img->rb_bits, blk, entry, per_slice;

	/*
	 * Set on every path: inlined at -O3, gcc cannot see that
	 * qcow2_corrupt() returns nonzero and warns that callers use them unset.
	 */
	*slice_off = 0;
	*idx = 0;
	if (rt_idx >= img->reftable.nr)
		return 1;
	blk = qcow2_table_get(&img->reftable, rt_idx);
	if (!blk)
		return 1;
	if ((blk & RTE_RESERVED_MASK) || (blk & (img->cluster_size - 1)) ||
	    blk >= MAX_HOST_CLUSTER_BYTES)
		return qcow2_corrupt(img, "refcount block offset 0x%llx invalid (table entry %llu)",
				     (unsigned long long)blk, (unsigned long long)rt_idx);
	entry = cluster & ((1ull << img->rb_bits) - 1);
	per_slice = (uint64_t)img->rc_cache.slice_bytes * 8 / img->refcount_bits;
	*slice_off = blk + (entry / per_slice) * img->rc_cache.slice_bytes;
	*idx = entry % per_slice;
	return 0;
}

int qcow2_refcount_get(struct qcow2 *img, uint64_t cluster, struct qcow2_wait *w,
		       uint64_t *out)
{
	struct qcow2_slice *s;
	uint64_t slice_off, idx;
	int ret = rc_locate(img, cluster, &slice_off, &idx);

	if (ret) {
		*out = 0;
		return ret < 0 ? ret : 0;
	}
	ret = qcow2_cache_get(&img->rc_cache, slice_off, 0, w, &s);
	if (ret < 0)
		return ret;
	*out = qcow2_rc_read(s->data, idx, img->h.refcount_order);
	qcow2_cache_put(s);
	return 0;
}

/* ---- Refcount block creation and table growth ----------------------------- */

static void grow_finish(struct qcow2_rc_grow *g, int res)
{
	g->state = GROW_IDLE;
	qcow2_waitq_wake(&g->waiters, res);
}

static void grow_io_done(struct qcow2_aio *aio, int res);

/* Submit zero writes over @nr clusters starting at cluster index @first. */
static int grow_zero(struct qcow2_rc_grow *g, uint64_t first, uint64_t nr)
{
	struct qcow2 *img = g->img;
	uint64_t off = first << img->h.cluster_bits, left = nr << img->h.cluster_bits;
	const uint64_t chunk = 1ull << QCOW2_MAX_CLUSTER_BITS;
	unsigned int i = 0;
	int ret;

	/* Few clusters in practice; anything bigger goes in 2 MiB pieces, 8 at a time. */
	if (left > chunk * 8)
		return -EFBIG;
	/* New refcount blocks (and table): nothing points at them yet. */
	ret = qcow2_overlap_check(img, 0, off, left);
	if (ret < 0)
		return ret;
	g->pending = 0;
	g->err = 0;
	while (left) {
		uint64_t n = left < chunk ? left : chunk;

		struct grow_aio *ga = &g->aios[i];

		ga->g = g;
		ga->iov = (struct iovec){ .iov_base = img->zero_buf, .iov_len = n };
		ga->aio = (struct qcow2_aio){
			.op = QCOW2_AIO_WRITE, .fd = img->fd, .iov = &ga->iov,
			.iovcnt = 1, .off = off, .done = grow_io_done,
		};
		g->pending++;
		ret = qcow2_submit(img, &ga->aio);
		if (ret < 0) {
			g->pending--;
			g->err = ret;
			break;
		}
		off += n;
		left -= n;
		i++;
	}
	return g->pending ? 0 : g->err;
}

static void grow_io_done(struct qcow2_aio *aio, int res)
{
	struct grow_aio *ga = (struct grow_aio *)aio;
	struct qcow2_rc_grow *g = ga->g;
	struct qcow2 *img = g->img;

	if (res >= 0 && (uint64_t)res != ga->iov.iov_len)
		res = -EIO;
	if (res < 0 && !g->err) {
		g->err = res;
		qcow2_error(img, res, "cannot initialize refcount block: %s", strerror(-res));
	}
	if (--g->pending)
		return;
	if (g->err) {
		grow_finish(g, g->err);
		return;
	}
	grow_step(g);
}

static void grow_wake(struct qcow2_wait *w, int res)
{
	struct qcow2_rc_grow *g = (struct qcow2_rc_grow *)((char *)w - offsetof(struct qcow2_rc_grow, wait));

	if (res < 0) {
		grow_finish(g, res);
		return;
	}
	grow_step(g);
}

/* Set refcount 1 on new clusters [base + marked, base + nr_new), slice by slice. */
static int grow_mark(struct qcow2_rc_grow *g, uint64_t base, uint64_t nr, uint64_t blk_first)
{
	struct qcow2 *img = g->img;
	uint64_t per_slice = (uint64_t)img->rc_cache.slice_bytes * 8 / img->refcount_bits;

	while (g->marked < nr) {
		uint64_t cluster = base + g->marked;
		uint64_t blk = blk_first + ((cluster >> img->rb_bits) - (base >> img->rb_bits));
		uint64_t entry = cluster & ((1ull << img->rb_bits) - 1);
		uint64_t slice_off = (blk << img->h.cluster_bits) +
				     (entry / per_slice) * img->rc_cache.slice_bytes;
		uint64_t idx = entry % per_slice;
		struct qcow2_slice *s;
		int ret;

		/* The block was just zeroed on disk: no need to read it. */
		ret = qcow2_cache_get(&img->rc_cache, slice_off,
				      QCOW2_CACHE_NOLOAD | QCOW2_CACHE_MODIFY, &g->wait, &s);
		if (ret < 0)
			return ret;
		for (; g->marked < nr && idx < per_slice; idx++, g->marked++)
			qcow2_rc_write(s->data, idx, img->h.refcount_order, 1);
		qcow2_cache_mark_dirty(s);
		qcow2_cache_put(s);
	}
	return 0;
}

static int grow_link(struct qcow2_rc_grow *g)
{
	struct qcow2 *img = g->img;
	uint64_t j, old_off, old_clusters, old_size = img->reftable.nr;
	int ret;

	if (!g->grow_table) {
		uint64_t blk = g->rt_idx << img->rb_bits;

		/* Before anything changes: the entry's set cannot fail then. */
		ret = qcow2_table_reserve(&img->reftable, g->rt_idx, 1);
		if (ret < 0)
			return ret;
		ret = grow_mark(g, blk, 1, blk);
		if (ret < 0)
			return ret;
		ret = qcow2_table_set(&img->reftable, g->rt_idx, blk << img->h.cluster_bits);
		if (ret < 0)
			return ret;
		qcow2_reftable_note(img, g->rt_idx);
		qcow2_pieces_mark(&img->rt_pieces, &img->reftable_dirty, g->rt_idx);
		return 0;
	}
	ret = grow_mark(g, g->base, g->nr_new, g->base);
	if (ret < 0)
		return ret;
	/*
	 * The table grows in place (its chunks stay), the chunks of the new
	 * entries allocated first: past this point nothing can fail.
	 */
	ret = qcow2_table_resize(&img->reftable, g->new_size);
	if (!ret)
		ret = qcow2_table_reserve(&img->reftable, g->rt_idx, g->nr_blocks);
	if (ret < 0) {
		qcow2_table_resize(&img->reftable, old_size);
		return ret;
	}
	for (j = 0; j < g->nr_blocks; j++) {
		ret = qcow2_table_set(&img->reftable, g->rt_idx + j,
				      (g->base + j) << img->h.cluster_bits);
		if (ret < 0)
			return ret;
	}
	old_off = img->h.refcount_table_offset;
	old_clusters = img->h.refcount_table_clusters;
	img->h.refcount_table_offset = (g->base + g->nr_blocks) << img->h.cluster_bits;
	img->h.refcount_table_clusters = g->nr_new - g->nr_blocks;
	img->reftable_dirty = true;
	img->header_dirty = true;
	/* The old table is freed once the header pointing past it is durable. */
	return qcow2_free_clusters(img, old_off, old_clusters);
}

/* Continue after the zero writes landed or a cache slice came free. */
static void grow_step(struct qcow2_rc_grow *g)
{
	int ret = grow_link(g);

	if (ret != -EAGAIN)
		grow_finish(g, ret);
}

/*
 * Plan a table growth that also creates the blocks covering the new
 * clusters: they go at the start of the range of entry @rt_idx (past the
 * table's end, so free) and the blocks fill entries @rt_idx onwards.
 */
static int grow_plan_table(struct qcow2 *img, struct qcow2_rc_grow *g, uint64_t rt_idx)
{
	uint64_t per_cluster = img->cluster_size / 8, cpb = 1ull << img->rb_bits;
	uint64_t new_size = img->reftable.nr + img->reftable.nr / 2, t, k;

	if (new_size < rt_idx + 1)
		new_size = rt_idx + 1;
	for (k = 1;; k++) {
		if (new_size < rt_idx + k)
			new_size = rt_idx + k;
		new_size = (new_size + per_cluster - 1) / per_cluster * per_cluster;
		t = new_size / per_cluster;
		if (k * cpb >= k + t)
			break;
	}
	if (new_size * 8 > QCOW2_MAX_REFTABLE_BYTES)
		return qcow2_error(img, -ENOSPC, "refcount table would exceed %u bytes",
				   QCOW2_MAX_REFTABLE_BYTES);
	g->grow_table = true;
	g->new_size = new_size;
	g->nr_blocks = k;
	g->nr_new = k + t;
	g->base = rt_idx << img->rb_bits;
	return 0;
}

/* Make sure refcount block @rt_idx exists. 0 / -EAGAIN (parked on @w) / -errno. */
static int rc_block_create(struct qcow2 *img, uint64_t rt_idx, struct qcow2_wait *w)
{
	struct qcow2_rc_grow *g = img->rc_grow;
	int ret;

	if (img->read_only)
		return -EROFS;
	if (!g) {
		g = calloc(1, sizeof(*g));
		if (!g)
			return -ENOMEM;
		g->img = img;
		g->wait.fn = grow_wake;
		img->rc_grow = g;
	}
	if (g->state != GROW_IDLE) {
		qcow2_waitq_add(&g->waiters, w);
		return -EAGAIN;
	}
	if (((rt_idx + 1) << img->rb_bits) > (MAX_HOST_CLUSTER_BYTES >> img->h.cluster_bits))
		return qcow2_error(img, -ENOSPC, "image file would exceed the qcow2 offset limit");
	g->grow_table = false;
	g->rt_idx = rt_idx;
	g->marked = 0;
	if (rt_idx >= img->reftable.nr) {
		ret = grow_plan_table(img, g, rt_idx);
		if (ret < 0)
			return ret;
	}
	if (g->grow_table)
		ret = grow_zero(g, g->base, g->nr_new);
	else
		ret = grow_zero(g, rt_idx << img->rb_bits, 1);
	if (ret < 0)
		return ret;
	g->state = GROW_ZEROING;
	qcow2_waitq_add(&g->waiters, w);
	return -EAGAIN;
}

int qcow2_reftable_reserve(struct qcow2 *img, uint64_t rt_idx, struct qcow2_wait *w)
{
	if (rt_idx < img->reftable.nr)
		return 0;
	/*
	 * One growth, its clusters in the range after @rt_idx's (what the
	 * caller is about to fill stays free); the call that retries returns 0.
	 */
	return rc_block_create(img, rt_idx + 1, w);
}

void qcow2_refcount_free(struct qcow2 *img)
{
	free(img->rc_grow);
	img->rc_grow = NULL;
}

/* ---- Allocation ---------------------------------------------------------- */

/*
 * Clusters allocated past the end of the file would be written there by
 * extending O_DIRECT writes, which a file system like ext4 cannot do without
 * blocking (io_uring punts each to a worker) and serializes under the inode
 * lock. Reserving the file ahead, an eighth of its size at a time (1 to 32
 * MiB), makes those writes land inside it; qcow2_close() truncates what was
 * not used. Best effort: a file system without fallocate stops the growing;
 * a full one only skips it, so it resumes once space is freed.
 */
static void grow_ahead(struct qcow2 *img, uint64_t end)
{
	uint64_t from = img->grow_end > img->file_end ? img->grow_end : img->file_end;
	uint64_t step = end >> 3;

	if (!img->grow_ok || end <= from)
		return;
	if (step < (1u << 20))
		step = 1u << 20;
	if (step > (32u << 20))
		step = 32u << 20;
	step = (end - from + step + img->cluster_size - 1) & ~((uint64_t)img->cluster_size - 1);
	if (fallocate(img->fd, 0, (off_t)from, (off_t)step) < 0) {
		if (errno == EOPNOTSUPP || errno == ENOSYS)
			img->grow_ok = false;
		return;
	}
	img->grow_end = from + step;
}

/*
 * Holes in clusters in use would make qemu take the image for one with
 * preallocated metadata (more clusters in use than the file holds: it then
 * asks the file system and maps the holes as zeros, unlike what it maps
 * for its own images), so a fresh cluster is allocated whole, as QEMU
 * does. Where grow_ahead() reserved the range already, that is done.
 */
void qcow2_reserve_fresh(struct qcow2 *img, uint64_t off, uint64_t len)
{
	if (off + len > img->grow_end)
		(void)fallocate(img->fd, 0, (off_t)off, (off_t)len);
}

int qcow2_alloc_clusters(struct qcow2 *img, uint64_t want, struct qcow2_wait *w,
			 uint64_t *host_off, uint64_t *got)
{
	uint64_t c = img->free_hint;
	uint64_t limit = MAX_HOST_CLUSTER_BYTES >> img->h.cluster_bits;

	if (img->read_only)
		return -EROFS;
	if (img->corrupt)
		return qcow2_error(img, -EIO, "image is marked corrupt; refusing to allocate");
	while (c < limit) {
		uint64_t slice_off, idx, per_slice, start, n = 0;
		struct qcow2_slice *s;
		int ret = rc_locate(img, c, &slice_off, &idx);

		if (ret < 0)
			return ret;
		if (ret == 1) {
			ret = rc_block_create(img, c >> img->rb_bits, w);
			if (ret < 0)
				return ret;
			continue;
		}
		ret = qcow2_cache_get(&img->rc_cache, slice_off, QCOW2_CACHE_MODIFY, w, &s);
		if (ret < 0)
			return ret;
		per_slice = (uint64_t)img->rc_cache.slice_bytes * 8 / img->refcount_bits;
		while (idx < per_slice && qcow2_rc_read(s->data, idx, img->h.refcount_order)) {
			idx++;
			c++;
		}
		start = c;
		while (idx < per_slice && n < want &&
		       !qcow2_rc_read(s->data, idx, img->h.refcount_order)) {
			qcow2_rc_write(s->data, idx, img->h.refcount_order, 1);
			idx++;
			n++;
		}
		if (n)
			qcow2_cache_mark_dirty(s);
		qcow2_cache_put(s);
		if (n) {
			*host_off = start << img->h.cluster_bits;
			*got = n;
			grow_ahead(img, (start + n) << img->h.cluster_bits);
			if (img->free_hint == start || img->free_hint < start)
				img->free_hint = start + n;
			return 0;
		}
		img->free_hint = c;
	}
	return qcow2_error(img, -ENOSPC, "no free cluster below the qcow2 offset limit");
}

/* ---- Frees ------------------------------------------------------------------- */

int qcow2_free_clusters(struct qcow2 *img, uint64_t host_off, uint64_t nr)
{
	struct qcow2_free *last = img->nr_frees > img->nr_frees_sealed ?
				  &img->frees[img->nr_frees - 1] : NULL;

	if (!nr)
		return 0;
	if (last && last->host_off + (last->nr_clusters << img->h.cluster_bits) == host_off) {
		last->nr_clusters += nr;
		return 0;
	}
	if (img->nr_frees == img->frees_alloc) {
		size_t n = img->frees_alloc ? 2 * img->frees_alloc : 64;
		struct qcow2_free *f = realloc(img->frees, n * sizeof(*f));

		if (!f)
			return -ENOMEM;
		img->frees = f;
		img->frees_alloc = n;
	}
	img->frees[img->nr_frees++] = (struct qcow2_free){ host_off, nr };
	return 0;
}

int qcow2_apply_frees(struct qcow2 *img, struct qcow2_wait *w)
{
	while (img->nr_frees_sealed) {
		struct qcow2_free *f = &img->frees[0];

		while (img->free_progress < f->nr_clusters) {
			uint64_t cluster = (f->host_off >> img->h.cluster_bits) + img->free_progress;
			uint64_t slice_off, idx, v;
			struct qcow2_slice *s;
			int ret = rc_locate(img, cluster, &slice_off, &idx);

			if (ret)
				return ret < 0 ? ret :
				       qcow2_corrupt(img, "freeing cluster %llu with no refcount block",
						     (unsigned long long)cluster);
			/* The flush applies us: it cannot also flush for room. */
			ret = qcow2_cache_get(&img->rc_cache, slice_off,
					      QCOW2_CACHE_NOFLUSH | QCOW2_CACHE_MODIFY, w, &s);
			if (ret == -ENOBUFS) {
				img->nr_frees_sealed = 0;	/* the next flush goes on */
				return 0;
			}
			if (ret < 0)
				return ret;
			v = qcow2_rc_read(s->data, idx, img->h.refcount_order);
			if (!v) {
				qcow2_cache_put(s);
				return qcow2_corrupt(img, "refcount of cluster %llu would drop below 0",
						     (unsigned long long)cluster);
			}
			qcow2_rc_write(s->data, idx, img->h.refcount_order, v - 1);
			qcow2_cache_mark_dirty(s);
			qcow2_cache_put(s);
			if (v == 1 && cluster < img->free_hint)
				img->free_hint = cluster;
			/* A freed cluster is no place to pack compressed bytes into. */
			if (v == 1 && img->free_byte_off >> img->h.cluster_bits == cluster)
				img->free_byte_off = 0;
			img->free_progress++;
		}
		img->free_progress = 0;
		memmove(img->frees, img->frees + 1, (img->nr_frees - 1) * sizeof(*f));
		img->nr_frees--;
		img->nr_frees_sealed--;
	}
	return 0;
}

/* ---- Snapshots ------------------------------------------------------------- */

int qcow2_refcount_add(struct qcow2 *img, uint64_t cluster, int64_t delta, struct qcow2_wait *w)
{
	uint64_t slice_off, idx, v;
	struct qcow2_slice *s;
	int ret = rc_locate(img, cluster, &slice_off, &idx);

	if (ret)
		return ret < 0 ? ret :
		       qcow2_error(img, -EIO, "cluster %llu has no refcount block",
				   (unsigned long long)cluster);
	ret = qcow2_cache_get(&img->rc_cache, slice_off, QCOW2_CACHE_MODIFY, w, &s);
	if (ret < 0)
		return ret;
	v = qcow2_rc_read(s->data, idx, img->h.refcount_order);
	if ((delta < 0 && v < (uint64_t)-delta) ||
	    (delta > 0 && (uint64_t)delta > img->refcount_max - v)) {
		qcow2_cache_put(s);
		return qcow2_error(img, -ERANGE, "refcount of cluster %llu out of range",
				   (unsigned long long)cluster);
	}
	v += delta;
	qcow2_rc_write(s->data, idx, img->h.refcount_order, v);
	qcow2_cache_mark_dirty(s);
	qcow2_cache_put(s);
	if (!v && cluster < img->free_hint)
		img->free_hint = cluster;
	return 0;
}
