// SPDX-License-Identifier: MIT
/*
 * Writes that change the mapping, as steps of the request state machine:
 *
 *   LOOKUP ─► ALLOC ─► [COW read] ─► DATA (whole clusters) ─► LINK (L2) ─► LOOKUP
 *
 * Ordering: a new cluster is fully written (data plus zero or copied
 * padding) before its L2 entry is set in the cache; a new L2 table is
 * written before its L1 entry is set; refcounts are raised before either,
 * and old references are released (after the next flush) only after. flush.c
 * makes them durable in that order. A guest range being allocated is
 * registered in img->inflight; requests touching it wait for the LINK.
 */
#include <stdlib.h>

#include "internal.h"

/* ---- In-flight allocations ---------------------------------------------------- */

/* Park @r if [@off, @off + @len) overlaps an allocation in progress. */
static bool inflight_wait(struct qcow2_req *r, uint64_t off, uint64_t len)
{
	struct qcow2_inflight *f;

	for (f = r->img->inflight; f; f = f->next) {
		if (f == &r->flight)
			continue;
		if (off < f->guest_off + f->len && f->guest_off < off + len) {
			qcow2_waitq_add(&f->waiters, &r->wait);
			return true;
		}
	}
	return false;
}

static void inflight_add(struct qcow2_req *r, uint64_t off, uint64_t len)
{
	r->flight.guest_off = off;
	r->flight.len = len;
	r->flight.waiters.head = r->flight.waiters.tail = NULL;
	r->flight.next = r->img->inflight;
	r->img->inflight = &r->flight;
}

void qcow2_inflight_del(struct qcow2_req *r)
{
	struct qcow2_inflight **pp = &r->img->inflight;

	while (*pp && *pp != &r->flight)
		pp = &(*pp)->next;
	if (*pp)
		*pp = r->flight.next;
	qcow2_waitq_wake(&r->flight.waiters, 0);
}

/* ---- Writes --------------------------------------------------------------------- */

/*
 * The L2 table for @pos must exist and be ours alone. 0 when it is;
 * -EINPROGRESS when a new table is being written; -EAGAIN (parked) / -errno.
 */
static int l2_table_ready(struct qcow2_req *r, uint64_t *l2_off)
{
	struct qcow2 *img = r->img;
	uint64_t l1e, i = qcow2_l1_index(img, r->pos), host, got, rc = 0;
	struct req_aio *a;
	int ret;

	ret = qcow2_l1_lookup(img, r->pos, l2_off, &l1e);
	if (ret < 0)
		return ret;
	if (*l2_off && (l1e & QCOW2_OFLAG_COPIED))
		return 0;
	if (*l2_off) {
		ret = qcow2_refcount_get(img, *l2_off >> img->h.cluster_bits, &r->wait, &rc);
		if (ret < 0)
			return ret;
		if (rc == 1) {
			/* A nonzero entry: its chunk exists, the set cannot fail. */
			ret = qcow2_table_set(&img->l1, i, l1e | QCOW2_OFLAG_COPIED);
			if (ret < 0)
				return ret;
			qcow2_pieces_mark(&img->l1_pieces, &img->l1_dirty, i);
			return 0;
		}
	}
	/*
	 * A new L2 table: zero a fresh cluster, then point L1 at it. A table
	 * shared with a snapshot is copied the same way; its data clusters
	 * keep their counts (both tables reference them).
	 */
	if (inflight_wait(r, i * qcow2_l2_span(img), qcow2_l2_span(img)))
		return -EAGAIN;
	a = qcow2_req_aio_get(r);
	if (!a)
		return -EBUSY;
	if (*l2_off) {
		ret = qcow2_req_cbufs(r);
		if (ret < 0)
			return ret;
	}
	/* The L1 chunk the new entry goes in, so that linking it cannot fail. */
	ret = qcow2_table_reserve(&img->l1, i, 1);
	if (ret < 0)
		return ret;
	ret = qcow2_alloc_clusters(img, 1, &r->wait, &host, &got);
	if (ret < 0)
		return ret;
	inflight_add(r, i * qcow2_l2_span(img), qcow2_l2_span(img));
	r->a_host = host;
	r->a_l1 = i;
	/*
	 * The old table loses our reference once L1 points at the copy; one
	 * with refcount 0 (a corrupt image) has none to lose, and freeing it
	 * would underflow. QEMU's free fails there and is ignored: the same.
	 */
	r->a_old_l2 = *l2_off && rc ? *l2_off : 0;
	if (*l2_off) {
		r->alloc = ALLOC_L2_READ;
		a->iov[0] = (struct iovec){ .iov_base = r->dbuf, .iov_len = img->cluster_size };
		ret = qcow2_req_aio_submit(r, a, QCOW2_AIO_READ, *l2_off, 1, true);
	} else {
		r->alloc = ALLOC_L2_ZERO;
		a->iov[0] = (struct iovec){ .iov_base = img->zero_buf, .iov_len = img->cluster_size };
		ret = qcow2_req_aio_submit(r, a, QCOW2_AIO_WRITE, host, 1, true);
	}
	if (ret < 0) {
		r->alloc = ALLOC_NONE;
		qcow2_inflight_del(r);
		qcow2_free_clusters(img, host, 1);
		return ret;
	}
	return -EINPROGRESS;
}

/* The shared table is in dbuf: write the copy. 0 or -errno. */
int qcow2_l2_table_copy(struct qcow2_req *r, struct req_aio *a)
{
	struct qcow2 *img = r->img;
	int ret;

	r->alloc = ALLOC_L2_ZERO;
	a->iov[0] = (struct iovec){ .iov_base = r->dbuf, .iov_len = img->cluster_size };
	ret = qcow2_req_aio_submit(r, a, QCOW2_AIO_WRITE, r->a_host, 1, true);
	if (ret < 0) {
		r->alloc = ALLOC_NONE;
		qcow2_inflight_del(r);
		qcow2_free_clusters(img, r->a_host, 1);
	}
	return ret;
}

int qcow2_l2_table_link(struct qcow2_req *r)
{
	/* The chunk was reserved when the table was allocated: this cannot fail. */
	int ret = qcow2_table_set(&r->img->l1, r->a_l1, r->a_host | QCOW2_OFLAG_COPIED);

	if (ret < 0)
		return ret;
	qcow2_l1_note(r->img, r->a_l1);
	qcow2_pieces_mark(&r->img->l1_pieces, &r->img->l1_dirty, r->a_l1);
	r->alloc = ALLOC_NONE;
	qcow2_inflight_del(r);
	if (!r->a_old_l2)
		return 0;
	return qcow2_free_clusters(r->img, r->a_old_l2, 1);
}

/* The bytes this request writes at guest @pos (the zero buffer for zeroes). */
static uint8_t *write_src(struct qcow2_req *r, uint64_t pos)
{
	if (r->op == QCOW2_OP_WRITE)
		return r->data + (pos - r->off);
	return r->img->zero_buf;
}

/* The COW buffer's cluster that holds the tail: the first if it is the only one. */
static uint8_t *cow_tail(struct qcow2_req *r)
{
	return r->cow + (r->a_nr > 1 ? r->img->cluster_size : 0);
}

/* Give back what an allocation in progress took: a failed request's cleanup. */
void qcow2_alloc_abort(struct qcow2_req *r)
{
	switch (r->alloc) {
	case ALLOC_NONE:
		return;
	case ALLOC_COW:
	case ALLOC_DATA:
	case ALLOC_LINK:
		if (r->a_new)
			qcow2_free_clusters(r->img, r->a_host, r->a_nr);
		r->a_old = 0;
		break;
	default:
		/* A new L2 table that L1 does not point at yet. */
		qcow2_free_clusters(r->img, r->a_host, 1);
		break;
	}
	r->alloc = ALLOC_NONE;
	qcow2_inflight_del(r);
}

/*
 * Write the run [pos, a_end) into fresh clusters at a_host: zeros (or the
 * copied old bytes) before and after the guest bytes so the whole clusters
 * are defined before LINK. Deferred data is asked for here, once the
 * clusters are allocated and the copy-on-write reads are done: when the
 * whole request lies in at most two clusters of the COW buffer, the bytes
 * land in place there and the clusters go out as one buffer.
 */
int qcow2_alloc_write(struct qcow2_req *r, struct req_aio *a)
{
	struct qcow2 *img = r->img;
	uint64_t cs = img->cluster_size, ws = r->a_ws - r->a_guest;
	uint64_t head = r->pos - r->a_ws, tail = r->a_we - r->a_end;
	uint8_t *tail_src = r->a_cow ? cow_tail(r) + (r->a_end & (cs - 1)) : img->zero_buf;
	bool in_cow = r->a_cow && r->a_nr <= 2 && r->pos == r->off &&
		      r->a_end == r->off + r->len;
	unsigned int n = 0;

	if (qcow2_data_wait(r, in_cow ? r->cow + (r->pos - r->a_guest) : r->buf)) {
		r->alloc = ALLOC_COW;
		return 0;
	}
	r->alloc = ALLOC_DATA;
	if (r->op == QCOW2_OP_WRITE && r->data != r->buf) {
		/* The data landed between the old bytes: one buffer. */
		a->iov[n++] = (struct iovec){ .iov_base = r->cow + ws,
					      .iov_len = r->a_we - r->a_ws };
	} else if (r->a_new && !r->a_cow && r->a_host >= img->file_end && !img->crypt) {
		/* Fresh clusters past everything ever written read as zeros
		 * already (not when encrypted: host zeros decrypt to noise). */
		if (head || tail)
			qcow2_reserve_fresh(img, r->a_host, r->a_nr * cs);
		a->iov[0] = (struct iovec){ .iov_base = write_src(r, r->pos),
					    .iov_len = r->a_end - r->pos };
		return qcow2_req_data_submit(r, a, QCOW2_AIO_WRITE,
					    r->a_host + (r->pos - r->a_guest), 1, true);
	} else if (r->opaque && (head || tail)) {
		/* Zeros around an opaque buffer: only memory can join them. */
		return -EXDEV;
	} else {
		if (head)
			a->iov[n++] = (struct iovec){ .iov_base = r->a_cow ? r->cow + ws :
								       img->zero_buf,
						      .iov_len = head };
		a->iov[n++] = (struct iovec){ .iov_base = write_src(r, r->pos),
					      .iov_len = r->a_end - r->pos };
		if (tail)
			a->iov[n++] = (struct iovec){ .iov_base = tail_src, .iov_len = tail };
	}
	if (img->crypt) {
		int ret = qcow2_crypt_iov(r, a->iov, n, r->a_host + ws, r->a_ws);

		if (ret < 0)
			return ret;
		n = ret;
	}
	return qcow2_req_data_submit(r, a, QCOW2_AIO_WRITE, r->a_host + ws, n, true);
}

int qcow2_alloc_link(struct qcow2_req *r)
{
	struct qcow2 *img = r->img;
	uint64_t l2_off, l1e, slice_off, idx, i;
	struct qcow2_slice *s;
	int ret;

	ret = qcow2_l1_lookup(img, r->a_guest, &l2_off, &l1e);
	if (ret < 0)
		return ret;
	qcow2_l2_locate(img, l2_off, r->a_guest, &slice_off, &idx);
	ret = qcow2_cache_get(&img->l2_cache, slice_off, QCOW2_CACHE_MODIFY, &r->wait, &s);
	if (ret < 0)
		return ret;
	for (i = 0; i < r->a_nr; i++)
		qcow2_l2_set(s, idx + i, (r->a_host + i * img->cluster_size) | QCOW2_OFLAG_COPIED);
	if (img->l2_entry_bytes == 16)
		qcow2_l2_set_bitmap(s, idx, r->a_bitmap);	/* one cluster at a time */
	qcow2_cache_mark_dirty(s);
	qcow2_cache_put(s);
	r->alloc = ALLOC_NONE;
	r->pos = r->a_end;
	qcow2_inflight_del(r);
	if (r->a_old) {
		ret = qcow2_free_entry(img, r->a_old);
		r->a_old = 0;
	}
	return ret;
}

/* Extended L2: is the subcluster of guest byte @pos in @mask (of the allocation)? */
static bool sc_in(const struct qcow2_req *r, uint32_t mask, uint64_t pos)
{
	uint64_t i = (pos - r->a_guest) >> r->img->unit_bits;

	return i < QCOW2_SUBCLUSTERS && (mask & (1u << i));
}

/* Copy the old bytes the write does not cover into the COW buffer. */
void qcow2_cow_fill(struct qcow2_req *r, const uint8_t *old)
{
	uint64_t cs = r->img->cluster_size, head = r->pos - r->a_guest;
	uint64_t in_last = r->a_end & (cs - 1);

	uint64_t unit = 1ull << r->img->unit_bits, hs = r->pos & ~(unit - 1);
	uint64_t te = (r->a_end + unit - 1) & ~(unit - 1);
	unsigned int sc;
	int ret = 0;

	memcpy(r->cow, old, head);
	if (in_last)
		memcpy(cow_tail(r) + in_last, old + in_last, cs - in_last);
	/* Extended L2: touched subclusters the old cluster did not hold read as zeros... */
	for (sc = 0; r->a_zmask && sc < QCOW2_SUBCLUSTERS; sc++)
		if (r->a_zmask & (1u << sc))
			memset(r->cow + sc * unit, 0, unit);
	/* ...or as the backing file shows them: read now, over the copy. */
	if (sc_in(r, r->a_bmask, hs) && r->pos > hs)
		ret = qcow2_backing_read(r, r->cow + (hs - r->a_guest), hs, r->pos - hs);
	if (!ret && sc_in(r, r->a_bmask, te - 1) &&
	    r->a_end < te)
		ret = qcow2_backing_read(r, r->cow + (r->a_end - r->a_guest), r->a_end,
					 te - r->a_end);
	if (ret < 0 && !r->err)
		r->err = ret;
}

/*
 * A partial write into clusters whose old content is not zeros: read the
 * bytes before and after it (from the backing chain, from a shared cluster
 * or by decompressing), then write whole clusters. @old_e is the old L2
 * entry (one cluster only unless it is unallocated).
 */
static int cow_start(struct qcow2_req *r, struct req_aio *a, enum l2_type type,
		     uint64_t old_e, uint64_t old_host)
{
	struct qcow2 *img = r->img;
	uint64_t cs = img->cluster_size, in_last = r->a_end & (cs - 1);
	int ret;

	if (!r->cow) {
		if (posix_memalign((void **)&r->cow, 4096, 2 * cs))
			r->cow = NULL;
		else
			r->img->scratch_bytes += 2 * cs;
	}
	if (!r->cow)
		return -ENOMEM;
	r->a_cow = true;
	if (type == L2_COMPRESSED)
		return qcow2_read_compressed(r, a, old_e, NULL, 0, true);
	if (type == L2_NORMAL) {
		/* A shared cluster: read it whole, keep what the write spares. */
		ret = qcow2_req_cbufs(r);
		if (ret < 0)
			return ret;
		a->iov[0] = (struct iovec){ .iov_base = r->dbuf, .iov_len = cs };
		ret = qcow2_req_data_submit(r, a, QCOW2_AIO_READ, old_host, 1, false);
		if (ret < 0)
			return ret;
		a->decrypt = img->crypt != NULL;
		a->crypt_guest = r->a_guest;
		a->cow = true;
		a->cow_copy = true;
		r->cow_pending++;
		return 0;
	}
	/*
	 * From the backing file: the touched (sub)clusters around the write;
	 * with extended L2 those marked in a_zmask are zeros instead.
	 */
	if (r->pos > r->a_ws) {
		uint8_t *dst = r->cow + (r->a_ws - r->a_guest);

		if (sc_in(r, r->a_zmask, r->a_ws))
			memset(dst, 0, r->pos - r->a_ws);
		else if ((ret = qcow2_backing_read(r, dst, r->a_ws, r->pos - r->a_ws)) < 0)
			return ret;
	}
	if (in_last && r->a_we > r->a_end) {
		if (sc_in(r, r->a_zmask, r->a_end))
			memset(cow_tail(r) + in_last, 0, r->a_we - r->a_end);
		else
			return qcow2_backing_read(r, cow_tail(r) + in_last, r->a_end,
						  r->a_we - r->a_end);
	}
	return 0;
}

/*
 * The allocation is set up: read what copy-on-write needs first (@cow, old
 * entry @old_e of @type at @old_host), or write at once. Undone on failure.
 */
static int alloc_fill(struct qcow2_req *r, struct req_aio *a, bool cow, enum l2_type type,
		      uint64_t old_e, uint64_t old_host)
{
	int ret;

	/* Copy-on-write needs the bytes in memory: an opaque buffer goes back. */
	if (cow && r->opaque)
		ret = -EXDEV;
	else
		ret = cow ? cow_start(r, a, type, old_e, old_host) : qcow2_alloc_write(r, a);

	if (ret < 0)
		qcow2_alloc_abort(r);
	return ret;
}

/* Bitmap bits of the subclusters of [@from, @to) in the cluster at @cstart. */
static uint64_t sc_mask(const struct qcow2 *img, uint64_t cstart, uint64_t from, uint64_t to)
{
	unsigned int a = (from - cstart) >> img->unit_bits;
	unsigned int b = (to - cstart + (1ull << img->unit_bits) - 1) >> img->unit_bits;

	return (b - a == 32 ? L2B_ALL_ALLOC : ((1ull << (b - a)) - 1)) << a;
}

/*
 * Extended L2, one cluster at a time: only the touched subclusters are
 * written (a partial one filled from the backing file, or with zeros);
 * the others keep their state. A cluster held alone is written in place;
 * a missing one is allocated; a shared or compressed one is copied whole.
 */
static int write_piece_ext(struct qcow2_req *r, uint64_t end, struct req_aio *a,
			   uint64_t l2_off)
{
	struct qcow2 *img = r->img;
	uint64_t cs = img->cluster_size, unit = 1ull << img->unit_bits;
	uint64_t cstart = qcow2_cluster_off(img, r->pos), pe = end < cstart + cs ? end : cstart + cs;
	uint64_t slice_off, idx, e, b, host, rc, touched, got, ws, we;
	bool compressed, shared, backing_side = false;
	struct qcow2_slice *s;
	enum l2_type type;
	uint32_t zmask = 0, bmask = 0;
	int ret;

	if (inflight_wait(r, cstart, cs))
		return -EAGAIN;
	qcow2_l2_locate(img, l2_off, r->pos, &slice_off, &idx);
	ret = qcow2_cache_get(&img->l2_cache, slice_off, QCOW2_CACHE_MODIFY, &r->wait, &s);
	if (ret < 0)
		return ret;
	e = qcow2_l2_get(s, idx);
	b = qcow2_l2_bitmap(s, idx);
	/* Validates the entry and the bitmap. */
	ret = qcow2_l2_classify_sc(img, e, b, 0, &type, &host);
	if (ret < 0)
		goto out;
	compressed = type == L2_COMPRESSED;
	host = compressed ? 0 : e & L2E_OFFSET_MASK;
	shared = compressed;
	if (img->data_fd >= 0) {
		/* One to one, never shared, offset 0 allowed: COPIED tells. */
		host = e & QCOW2_OFLAG_COPIED ? cstart : 0;
	} else if (host && !(e & QCOW2_OFLAG_COPIED)) {
		ret = qcow2_refcount_get(img, host >> img->h.cluster_bits, &r->wait, &rc);
		if (ret < 0)
			goto out;
		if (rc == 1) {
			e |= QCOW2_OFLAG_COPIED;
			qcow2_l2_set(s, idx, e);
			qcow2_cache_mark_dirty(s);
		} else {
			shared = true;
		}
	}
	touched = sc_mask(img, cstart, r->pos, pe);
	if ((host || (e & QCOW2_OFLAG_COPIED)) && !shared && (b & touched) == touched) {
		/* Every touched subcluster is ours already: write in place. */
		if (qcow2_data_wait(r, r->buf)) {
			ret = -EBUSY;
			goto out;
		}
		a->iov[0] = (struct iovec){ .iov_base = write_src(r, r->pos),
					    .iov_len = pe - r->pos };
		if (img->crypt) {
			ret = qcow2_crypt_iov(r, a->iov, 1, host + (r->pos - cstart), r->pos);
			if (ret < 0)
				goto out;
		}
		ret = qcow2_req_data_submit(r, a, QCOW2_AIO_WRITE, host + (r->pos - cstart), 1,
					    false);
		if (!ret)
			r->pos = pe;
		goto out;
	}
	qcow2_cache_put(s);

	/* The partial subclusters at either end: which need old bytes, and whence. */
	ws = r->pos & ~(unit - 1);
	we = (pe + unit - 1) & ~(unit - 1);
	if (shared) {
		if (!compressed) {
			/*
			 * Copied whole; the touched subclusters the old cluster
			 * lacked are zeros, or at the partial ends, where the
			 * backing file shows through, read from it.
			 */
			if (img->backing)
				bmask = touched & ~b & ~(b >> 32) &
					(sc_mask(img, cstart, ws, ws + 1) |
					 sc_mask(img, cstart, we - 1, we));
			zmask = touched & ~b & ~bmask;
		}
		ws = cstart;
		we = cstart + cs;
	} else {
		unsigned int hs = (ws - cstart) >> img->unit_bits;
		unsigned int ts = (we - 1 - cstart) >> img->unit_bits;

		if (r->pos == ws || (b & L2B_ALLOC(hs)))
			ws = r->pos;
		else if ((b & L2B_ZERO(hs)) || !img->backing)
			zmask |= 1u << hs;
		else
			backing_side = true;
		if (pe == we || (b & L2B_ALLOC(ts)))
			we = pe;
		else if ((b & L2B_ZERO(ts)) || !img->backing)
			zmask |= 1u << ts;
		else
			backing_side = true;
	}
	if (img->data_fd >= 0) {
		host = cstart;
	} else if (!host || shared) {
		ret = qcow2_alloc_clusters(img, 1, &r->wait, &host, &got);
		if (ret < 0)
			return ret;
	}
	inflight_add(r, cstart, cs);
	r->alloc = ALLOC_COW;
	r->a_guest = cstart;
	r->a_host = host;
	r->a_nr = 1;
	r->a_new = (!(e & L2E_OFFSET_MASK) || shared) && img->data_fd < 0;
	r->a_old = shared ? e : 0;
	r->a_end = pe;
	r->a_ws = ws;
	r->a_we = we;
	r->a_zmask = zmask;
	r->a_bmask = bmask;
	r->a_cow = false;
	touched = sc_mask(img, cstart, r->pos, pe);
	r->a_bitmap = compressed ? L2B_ALL_ALLOC : (b | touched) & ~(touched << 32);
	return alloc_fill(r, a, shared || backing_side || (zmask && (!r->a_new ||
							     host < img->file_end)),
			  compressed ? L2_COMPRESSED : shared ? L2_NORMAL : L2_UNALLOC,
			  e, e & L2E_OFFSET_MASK);
out:
	qcow2_cache_put(s);
	return ret;
}

/* Write guest bytes [pos, @end) of the request's current piece. */
int qcow2_write_piece(struct qcow2_req *r, uint64_t end)
{
	struct qcow2 *img = r->img;
	uint64_t l2_off, slice_off, idx, per_slice, host, e, rc;
	uint64_t cstart = qcow2_cluster_off(img, r->pos), n, got, run_end;
	uint64_t old_host;
	struct qcow2_slice *s;
	struct req_aio *a;
	enum l2_type type, t;
	bool shared, partial;
	int ret;

	a = qcow2_req_aio_get(r);
	if (!a || (img->crypt && qcow2_crypt_busy(r)))
		return -EBUSY;
	ret = l2_table_ready(r, &l2_off);
	if (ret < 0)
		return ret;
	if (img->l2_entry_bytes == 16)
		return write_piece_ext(r, end, a, l2_off);
	if (inflight_wait(r, cstart, end - cstart))
		return -EAGAIN;
	qcow2_l2_locate(img, l2_off, r->pos, &slice_off, &idx);
	ret = qcow2_cache_get(&img->l2_cache, slice_off, QCOW2_CACHE_MODIFY, &r->wait, &s);
	if (ret < 0)
		return ret;
	e = qcow2_l2_get(s, idx);
	ret = qcow2_l2_classify(img, e, &type, &host);
	if (ret < 0)
		goto out;
	per_slice = img->l2_cache.slice_bytes / img->l2_entry_bytes;

	if (img->data_fd >= 0 && (type == L2_NORMAL || type == L2_ZERO_ALLOC))
		e |= QCOW2_OFLAG_COPIED;	/* data file clusters are never shared */
	if (type == L2_NORMAL && !(e & QCOW2_OFLAG_COPIED)) {
		ret = qcow2_refcount_get(img, host >> img->h.cluster_bits, &r->wait, &rc);
		if (ret < 0)
			goto out;
		if (rc == 1) {
			qcow2_l2_set(s, idx, e | QCOW2_OFLAG_COPIED);
			qcow2_cache_mark_dirty(s);
			e |= QCOW2_OFLAG_COPIED;
		}
	}
	if (type == L2_NORMAL && (e & QCOW2_OFLAG_COPIED)) {
		/* Rewrite in place: extend over contiguous clusters we own. */
		for (n = 1; idx + n < per_slice && cstart + n * img->cluster_size < end; n++) {
			uint64_t en = qcow2_l2_get(s, idx + n), hn;

			if (qcow2_l2_classify(img, en, &t, &hn) < 0 || t != L2_NORMAL ||
			    !(en & QCOW2_OFLAG_COPIED) || hn != host + n * img->cluster_size)
				break;
		}
		if (qcow2_data_wait(r, r->buf)) {
			ret = -EBUSY;	/* data_ready re-steps us: look up afresh */
			goto out;
		}
		run_end = cstart + n * img->cluster_size;
		if (run_end > end)
			run_end = end;
		a->iov[0] = (struct iovec){ .iov_base = write_src(r, r->pos),
					    .iov_len = run_end - r->pos };
		if (img->crypt) {
			ret = qcow2_crypt_iov(r, a->iov, 1, host + (r->pos - cstart), r->pos);
			if (ret < 0)
				goto out;
		}
		ret = qcow2_req_data_submit(r, a, QCOW2_AIO_WRITE, host + (r->pos - cstart), 1, false);
		if (!ret)
			r->pos = run_end;
		goto out;
	}
	/* Compressed or shared clusters: copy out into a fresh one. */
	shared = type == L2_COMPRESSED || (type == L2_NORMAL && !(e & QCOW2_OFLAG_COPIED)) ||
		 (type == L2_ZERO_ALLOC && !(e & QCOW2_OFLAG_COPIED));
	for (n = 1; !shared && type != L2_ZERO_ALLOC && idx + n < per_slice &&
	     cstart + n * img->cluster_size < end; n++) {
		uint64_t hn;

		if (qcow2_l2_classify(img, qcow2_l2_get(s, idx + n), &t, &hn) < 0 || t != type)
			break;
	}
	qcow2_cache_put(s);

	old_host = host;
	if (type == L2_ZERO_ALLOC && !shared) {
		/* A preallocated zero cluster: write it whole in place. */
		got = 1;
	} else if (img->data_fd >= 0) {
		/* An external data file maps guest offsets one to one. */
		host = cstart;
		got = n;
	} else {
		ret = qcow2_alloc_clusters(img, shared ? 1 : n, &r->wait, &host, &got);
		if (ret < 0)
			return ret;
	}
	inflight_add(r, cstart, got * img->cluster_size);
	r->alloc = ALLOC_COW;		/* in progress: qcow2_alloc_abort undoes it */
	r->a_guest = cstart;
	r->a_host = host;
	r->a_nr = got;
	r->a_new = (shared || type != L2_ZERO_ALLOC) && img->data_fd < 0;
	r->a_old = shared ? e : 0;
	r->a_end = cstart + got * img->cluster_size < end ? cstart + got * img->cluster_size : end;
	r->a_ws = cstart;
	r->a_we = cstart + got * img->cluster_size;
	r->a_zmask = 0;
	r->a_bmask = 0;
	r->a_cow = false;
	partial = r->pos != cstart || (r->a_end & (img->cluster_size - 1));
	return alloc_fill(r, a, partial && ((type == L2_UNALLOC && img->backing) ||
					    type == L2_COMPRESSED || type == L2_NORMAL),
			  type, e, old_host);
out:
	qcow2_cache_put(s);
	return ret;
}

/* ---- Write-zeroes and discard ------------------------------------------------- */

/*
 * The L2 slice that holds @start, to change the entries of [@start, @end):
 * the table made ready and allocations in flight there waited for.
 */
static int l2_slice_modify(struct qcow2_req *r, uint64_t start, uint64_t end,
			   struct qcow2_slice **s, uint64_t *idx)
{
	uint64_t l2_off, slice_off;
	int ret;

	ret = l2_table_ready(r, &l2_off);
	if (ret < 0)
		return ret;
	if (inflight_wait(r, start, end - start))
		return -EAGAIN;
	qcow2_l2_locate(r->img, l2_off, start, &slice_off, idx);
	return qcow2_cache_get(&r->img->l2_cache, slice_off, QCOW2_CACHE_MODIFY, &r->wait, s);
}

/*
 * Whole clusters: drop their allocation and mark them zero (v3) or
 * unallocated (v2, where no backing file shows through). Freed clusters are
 * released after the next flush. As QEMU: write-zeroes marks unallocated
 * clusters zero too (v3), and without unmapping an allocated cluster keeps
 * its host cluster, marked zero.
 */
static int zero_clusters(struct qcow2_req *r, uint64_t start, uint64_t end)
{
	struct qcow2 *img = r->img;
	uint64_t l2_off, l1e, idx, per_slice, i, n, host, e, ne;
	struct qcow2_slice *s;
	enum l2_type type;
	bool alloc;
	int ret;

	/* With a backing file, v3 hides it behind zero flags; v2 cannot. */
	bool hide = img->h.version >= 3 && (img->backing || r->op != QCOW2_OP_DISCARD);
	bool keep = r->op == QCOW2_OP_WRITE_ZEROES_NOUNMAP && img->h.version >= 3;

	ret = qcow2_l1_lookup(img, start, &l2_off, &l1e);
	if (ret < 0)
		return ret;
	if (!l2_off && !hide) {
		uint64_t limit = (qcow2_l1_index(img, start) + 1) * qcow2_l2_span(img);

		r->pos = end < limit ? end : limit;
		return 0;
	}
	ret = l2_slice_modify(r, start, end, &s, &idx);
	if (ret < 0)
		return ret;
	per_slice = img->l2_cache.slice_bytes / img->l2_entry_bytes;
	n = (end - start) >> img->h.cluster_bits;
	if (n > per_slice - idx)
		n = per_slice - idx;
	for (i = 0; i < n; i++) {
		e = qcow2_l2_get(s, idx + i);
		if (img->l2_entry_bytes == 16) {
			/* Extended L2: the zero bits of every subcluster say it. */
			uint64_t b = qcow2_l2_bitmap(s, idx + i);

			ret = qcow2_l2_classify_sc(img, e, b, 0, &type, &host);
			if (ret < 0)
				break;
			alloc = type != L2_COMPRESSED && qcow2_l2e_has_cluster(img, e);
			if ((!alloc && type != L2_COMPRESSED && !b && !hide) ||
			    (!e && b == ~L2B_ALL_ALLOC))
				continue;
			if (keep && alloc) {
				qcow2_l2_set_bitmap(s, idx + i, ~L2B_ALL_ALLOC);
				qcow2_cache_mark_dirty(s);
				continue;
			}
			if (e & ~QCOW2_OFLAG_COPIED) {
				ret = qcow2_free_entry(img, e);
				if (ret < 0)
					break;
			}
			qcow2_l2_set(s, idx + i, 0);
			qcow2_l2_set_bitmap(s, idx + i, ~L2B_ALL_ALLOC);
			qcow2_cache_mark_dirty(s);
			continue;
		}
		ret = qcow2_l2_classify(img, e, &type, &host);
		if (ret < 0)
			break;
		if (type == L2_ZERO_PLAIN || (keep && type == L2_ZERO_ALLOC))
			continue;
		if (keep && type == L2_NORMAL) {
			qcow2_l2_set(s, idx + i, e | L2E_ZERO);
			qcow2_cache_mark_dirty(s);
			continue;
		}
		if (type == L2_UNALLOC) {
			if (hide) {
				qcow2_l2_set(s, idx + i, L2E_ZERO);
				qcow2_cache_mark_dirty(s);
			}
			continue;
		}
		ne = img->h.version >= 3 ? L2E_ZERO : 0;
		ret = qcow2_free_entry(img, e);
		if (ret < 0)
			break;
		qcow2_l2_set(s, idx + i, ne);
		qcow2_cache_mark_dirty(s);
	}
	qcow2_cache_put(s);
	r->pos = start + (i << img->h.cluster_bits);
	return ret;
}

/*
 * Extended L2: the zero bits of the subclusters of [@start, @end) (in one
 * cluster, the same L2 table as r->pos), their allocation bits cleared; the
 * cluster keeps its host offset.
 */
static int zero_subclusters(struct qcow2_req *r, uint64_t start, uint64_t end)
{
	struct qcow2 *img = r->img;
	uint64_t idx, m, b;
	struct qcow2_slice *s;
	int ret;

	ret = l2_slice_modify(r, start, end, &s, &idx);
	if (ret < 0)
		return ret;
	m = sc_mask(img, qcow2_cluster_off(img, start), start, end);
	b = qcow2_l2_bitmap(s, idx);
	if (((b & ~m) | (m << 32)) != b) {
		qcow2_l2_set_bitmap(s, idx, (b & ~m) | (m << 32));
		qcow2_cache_mark_dirty(s);
	}
	qcow2_cache_put(s);
	r->pos = end;
	return 0;
}

/*
 * Extended L2, write-zeroes on part of a cluster, up to @pend, as QEMU:
 * whole subclusters get their zero bits; part of one is widened to it when
 * it reads as zeros already, else written with zeros (so is a compressed
 * cluster).
 */
static int zero_piece_ext(struct qcow2_req *r, uint64_t pend)
{
	struct qcow2 *img = r->img;
	uint64_t unit = 1ull << img->unit_bits, ws = r->pos & ~(unit - 1), host, run;
	enum l2_type type;
	int ret;

	ret = qcow2_lookup_run(img, r->pos, pend, &r->wait, &type, &host, &run);
	if (ret < 0)
		return ret;
	if (type == L2_COMPRESSED)
		return qcow2_write_piece(r, pend);
	if (r->pos == ws && pend - ws >= unit)
		return zero_subclusters(r, ws, pend & ~(unit - 1));
	if ((type == L2_UNALLOC && !img->backing) || type == L2_ZERO_PLAIN ||
	    type == L2_ZERO_ALLOC)
		return zero_subclusters(r, ws, ws + unit);
	return qcow2_write_piece(r, ws + unit < pend ? ws + unit : pend);
}

/*
 * Discard with a raw data file: QEMU's whole clusters read as zeros after
 * it (it punches them in the data file) and partial ones keep their bytes,
 * so whole clusters that do not read as zeros get real zeros here.
 */
static int discard_raw_piece(struct qcow2_req *r, uint64_t end)
{
	struct qcow2 *img = r->img;
	uint64_t cs = img->cluster_size, head = (r->off + cs - 1) & ~(cs - 1);
	uint64_t stop = end & ~(cs - 1), host, run;
	enum l2_type type;
	int ret;

	/* As QEMU: the last cluster of a disk not a cluster multiple counts whole. */
	if (end == ((img->h.size + 511) & ~511ull))
		stop = end;
	if (r->pos < head) {
		r->pos = head < end ? head : end;
		return 0;
	}
	if (r->pos >= stop) {
		r->pos = end;
		return 0;
	}
	ret = qcow2_lookup_run(img, r->pos, stop, &r->wait, &type, &host, &run);
	if (ret < 0)
		return ret;
	if (type != L2_NORMAL) {
		r->pos += run;
		return 0;
	}
	return qcow2_write_piece(r, r->pos + run);
}

int qcow2_zero_piece(struct qcow2_req *r)
{
	struct qcow2 *img = r->img;
	uint64_t end = r->off + r->len, cstart = qcow2_cluster_off(img, r->pos);
	uint64_t cend = cstart + img->cluster_size, host, run;
	enum l2_type type;
	bool real_zeros;
	int ret;

	if (img->data_raw) {
		/* The data file must stay the raw disk: real zeros, no unmapping. */
		if (r->op == QCOW2_OP_DISCARD)
			return discard_raw_piece(r, end);
		return qcow2_write_piece(r, end);
	}

	/* v2 over a backing file: only real zeros hide it. */
	real_zeros = r->op != QCOW2_OP_DISCARD && img->backing && img->h.version < 3;
	if (r->pos == cstart && end >= cend) {
		if (real_zeros)
			return qcow2_write_piece(r, qcow2_cluster_off(img, end));
		return zero_clusters(r, r->pos, qcow2_cluster_off(img, end));
	}
	/*
	 * As QEMU: the last cluster of a disk whose size is not a cluster
	 * multiple counts as whole when the request runs to the end of the disk
	 * (the virtual size in 512-byte sectors).
	 */
	if (r->pos == cstart && end == ((img->h.size + 511) & ~511ull) && !real_zeros)
		return zero_clusters(r, r->pos, cend);
	/* A partial cluster. */
	if (cend > end)
		cend = end;
	if (r->op == QCOW2_OP_DISCARD) {
		r->pos = cend;		/* as QEMU: partial clusters are not discarded */
		return 0;
	}
	if (img->l2_entry_bytes == 16)
		return zero_piece_ext(r, cend);
	ret = qcow2_lookup_run(img, r->pos, cend, &r->wait, &type, &host, &run);
	if (ret < 0)
		return ret;
	if ((type == L2_UNALLOC && !img->backing) || type == L2_ZERO_PLAIN ||
	    type == L2_ZERO_ALLOC) {
		/*
		 * Already reads as zeros. As QEMU (v3):
		 * then the request widens to the cluster, which gets the zero
		 * flag (or, unmapping, loses its allocation).
		 */
		if (img->h.version >= 3)
			return zero_clusters(r, cstart, cstart + img->cluster_size);
		r->pos += run;
		return 0;
	}
	return qcow2_write_piece(r, cend);
}
