// SPDX-License-Identifier: MIT
/*
 * Guest requests as state machines: read, write, write-zeroes, discard,
 * flush. A request walks its range piece by piece (one run of like clusters
 * in one L2 slice at a time); a metadata miss parks it and the completion
 * re-enters req_step(), which picks up where it left off.
 *
 * Allocating write of a run:   LOOKUP ─► ALLOC ─► DATA (write) ─► LINK (L2) ─► LOOKUP
 *
 * Ordering: a new cluster is fully written (data plus zero padding) before
 * its L2 entry is set in the cache; a new L2 table is zeroed on disk before
 * its L1 entry is set; refcounts are raised before either. flush.c makes
 * them durable in that order. A guest range being allocated is registered
 * in img->inflight; requests touching it wait for the LINK.
 */
#include <stdlib.h>

#include "internal.h"

#define REQ_AIOS	8

enum l2_type {
	L2_UNALLOC,
	L2_ZERO_PLAIN,
	L2_ZERO_ALLOC,
	L2_NORMAL,
	L2_COMPRESSED,
};

enum alloc_state {
	ALLOC_NONE,
	ALLOC_COW,		/* reading what the write does not cover */
	ALLOC_DATA,		/* cluster data being written */
	ALLOC_LINK,		/* data written: set the L2 entries */
	ALLOC_L2_READ,		/* shared L2 table being read for its copy */
	ALLOC_L2_COPY,		/* read: write the copy (from dbuf) */
	ALLOC_L2_ZERO,		/* new L2 table being written */
	ALLOC_L2_LINK,		/* zeroed: set the L1 entry */
};

struct req_aio {
	struct qcow2_aio aio;
	struct iovec iov[3];
	struct qcow2_req *req;
	size_t len;
	bool busy;
	bool alloc;			/* completes the allocation in progress */
	bool compressed;		/* cbuf: decompress, copy to dst */
	bool cow;			/* a read the allocation waits for */
	bool cow_copy;			/* dbuf holds the old cluster: cow_fill */
	uint8_t *dst;
	uint32_t dst_skip;
};

struct qcow2_req {
	struct qcow2 *img;
	enum qcow2_op op;
	uint64_t off, len, pos;
	uint8_t *buf;
	qcow2_done_fn done;
	void *priv;
	unsigned int pending;
	int err;
	bool active, stepping, again;
	bool parked;			/* r->wait sits on some wait queue */
	unsigned int wakes;
	struct qcow2_wait wait;

	enum alloc_state alloc;
	struct qcow2_inflight flight;
	uint64_t a_guest;		/* first guest byte the allocation covers */
	uint64_t a_end;			/* guest byte after the write */
	uint64_t a_host;		/* host offset of the first cluster */
	uint64_t a_nr;			/* clusters */
	bool a_new;			/* refcounts were raised for it */
	uint64_t a_l1;			/* L1 index (L2 table allocation) */
	uint64_t a_old_l2;		/* shared L2 table being copied, or 0 */

	bool a_cow;			/* head/tail come from r->cow, not zeros */
	unsigned int cow_pending;	/* COW reads in flight */
	uint64_t a_old;			/* L2 entry to release after LINK, or 0 */
	uint8_t *cow;			/* head and tail clusters (2 clusters), lazily */
	struct qcow2_req *sub[2];	/* reads from the backing image */
	bool sub_busy[2];
	uint8_t *cbuf;			/* compressed bytes (2 clusters), lazily */
	uint8_t *dbuf;			/* one decompressed cluster, lazily */
	bool cbuf_busy;

	struct req_aio aios[REQ_AIOS];
};

static void req_step(struct qcow2_req *r);

/* ---- L1/L2 entries --------------------------------------------------------- */

static int l2_classify(struct qcow2 *img, uint64_t e, enum l2_type *type, uint64_t *host)
{
	if (e & L2E_COMPRESSED) {
		*type = L2_COMPRESSED;
		*host = e;		/* the whole descriptor */
		return 0;
	}
	*host = e & L2E_OFFSET_MASK;
	if (*host & (img->cluster_size - 1))
		return qcow2_corrupt(img, "L2 entry 0x%llx: cluster offset not aligned",
				     (unsigned long long)e);
	if (e & L2E_ZERO)
		*type = *host ? L2_ZERO_ALLOC : L2_ZERO_PLAIN;
	else
		*type = *host ? L2_NORMAL : L2_UNALLOC;
	return 0;
}

/* Drop the reference L2 entry @e holds (after the next flush). 0 or -errno. */
static int free_entry(struct qcow2 *img, uint64_t e)
{
	uint64_t host, coff, first, last;
	enum l2_type type = L2_UNALLOC;
	uint32_t clen;
	int ret = l2_classify(img, e, &type, &host);

	if (ret < 0)
		return ret;
	switch (type) {
	case L2_NORMAL:
	case L2_ZERO_ALLOC:
		return qcow2_free_clusters(img, host, 1);
	case L2_COMPRESSED:
		ret = qcow2_compressed_locate(img, e, &coff, &clen);
		if (ret < 0)
			return ret;
		/* Every host cluster the compressed bytes touch holds one reference. */
		first = coff >> img->h.cluster_bits;
		last = (coff + clen - 1) >> img->h.cluster_bits;
		return qcow2_free_clusters(img, first << img->h.cluster_bits, last - first + 1);
	default:
		return 0;
	}
}

/* The L2 table offset for guest offset @pos (0 if none). 0 or -EIO. */
static int l1_lookup(struct qcow2 *img, uint64_t pos, uint64_t *l2_off, uint64_t *l1e)
{
	uint64_t i = qcow2_l1_index(img, pos);

	if (i >= img->h.l1_size)
		return qcow2_corrupt(img, "guest offset %llu beyond the L1 table",
				     (unsigned long long)pos);
	*l1e = img->l1[i];
	*l2_off = *l1e & L1E_OFFSET_MASK;
	if (*l2_off & (img->cluster_size - 1))
		return qcow2_corrupt(img, "L2 table offset 0x%llx (L1 index %llu) not aligned",
				     (unsigned long long)*l2_off, (unsigned long long)i);
	return 0;
}

/* Locate the L2 entry of @pos: its slice offset and index in the slice. */
static void l2_locate(struct qcow2 *img, uint64_t l2_off, uint64_t pos,
		      uint64_t *slice_off, uint64_t *idx)
{
	uint64_t per_slice = img->l2_cache.slice_bytes / img->l2_entry_bytes;
	uint64_t i = qcow2_l2_index(img, pos);

	*slice_off = l2_off + (i / per_slice) * img->l2_cache.slice_bytes;
	*idx = i % per_slice;
}

static inline uint64_t l2_get(const struct qcow2_slice *s, uint64_t idx)
{
	return get_be64(s->data + idx * 8);
}

static inline void l2_set(struct qcow2_slice *s, uint64_t idx, uint64_t v)
{
	put_be64(s->data + idx * 8, v);
}

/*
 * The run of like clusters starting at guest byte @pos, ending at @end at
 * most: its type, host offset of @pos (DATA) and length. Stops at the end of
 * the L2 slice. 0 / -EAGAIN (parked on @w) / -errno.
 */
static int lookup_run(struct qcow2 *img, uint64_t pos, uint64_t end, struct qcow2_wait *w,
		      enum l2_type *type, uint64_t *host, uint64_t *run)
{
	uint64_t l2_off, l1e, slice_off, idx, per_slice, first, h, n, limit;
	uint64_t in_cluster = pos & (img->cluster_size - 1);
	struct qcow2_slice *s;
	enum l2_type t;
	int ret;

	ret = l1_lookup(img, pos, &l2_off, &l1e);
	if (ret < 0)
		return ret;
	if (!l2_off) {
		limit = (qcow2_l1_index(img, pos) + 1) * qcow2_l2_span(img);
		*type = L2_UNALLOC;
		*host = 0;
		*run = (end < limit ? end : limit) - pos;
		return 0;
	}
	l2_locate(img, l2_off, pos, &slice_off, &idx);
	ret = qcow2_cache_get(&img->l2_cache, slice_off, 0, w, &s);
	if (ret < 0)
		return ret;
	ret = l2_classify(img, l2_get(s, idx), type, &first);
	if (ret < 0)
		goto out;
	per_slice = img->l2_cache.slice_bytes / img->l2_entry_bytes;
	n = 1;
	while (idx + n < per_slice &&
	       qcow2_cluster_off(img, pos) + n * img->cluster_size < end) {
		ret = l2_classify(img, l2_get(s, idx + n), &t, &h);
		if (ret < 0)
			goto out;
		if (t != *type || t == L2_COMPRESSED)
			break;
		if ((t == L2_NORMAL || t == L2_ZERO_ALLOC) &&
		    h != first + n * img->cluster_size)
			break;
		n++;
	}
	*host = *type == L2_COMPRESSED ? first : first ? first + in_cluster : 0;
	limit = qcow2_cluster_off(img, pos) + n * img->cluster_size;
	*run = (end < limit ? end : limit) - pos;
out:
	qcow2_cache_put(s);
	return ret;
}

/* ---- Data I/O ---------------------------------------------------------------- */

static void cow_fill(struct qcow2_req *r, const uint8_t *old);

static void aio_done(struct qcow2_aio *aio, int res)
{
	struct req_aio *a = (struct req_aio *)aio;
	struct qcow2_req *r = a->req;

	if (res >= 0 && (size_t)res < a->len) {
		if (aio->op == QCOW2_AIO_READ && a->aio.iovcnt == 1) {
			/* Past the end of the file reads as zeros. */
			memset((uint8_t *)a->iov[0].iov_base + res, 0, a->len - res);
			res = a->len;
		} else {
			res = -EIO;
		}
	}
	if (res < 0 && !r->err) {
		r->err = res;
		qcow2_error(r->img, res, "%s at 0x%llx failed: %s",
			    aio->op == QCOW2_AIO_READ ? "read" : "write",
			    (unsigned long long)aio->off, strerror(-res));
	}
	if (a->compressed) {
		r->cbuf_busy = false;
		if (res >= 0) {
			res = qcow2_decompress(r->img, r->cbuf, a->len, r->dbuf);
			if (res < 0 && !r->err)
				r->err = res;
			else if (a->cow)
				cow_fill(r, r->dbuf);
			else
				memcpy(a->dst, r->dbuf + a->dst_skip, a->iov[1].iov_len);
		}
	}
	if (a->cow_copy && res >= 0)
		cow_fill(r, r->dbuf);
	if (a->cow)
		r->cow_pending--;
	a->busy = false;
	r->pending--;
	if (a->alloc && res >= 0)
		r->alloc = r->alloc == ALLOC_DATA ? ALLOC_LINK :
			   r->alloc == ALLOC_L2_READ ? ALLOC_L2_COPY : ALLOC_L2_LINK;
	req_step(r);
}

static struct req_aio *aio_get(struct qcow2_req *r)
{
	unsigned int i;

	for (i = 0; i < REQ_AIOS; i++)
		if (!r->aios[i].busy)
			return &r->aios[i];
	return NULL;
}

/* Submit one read/write of up to three buffers. 0 or -errno. */
static int aio_submit(struct qcow2_req *r, struct req_aio *a, enum qcow2_aio_op op,
		      uint64_t host_off, unsigned int iovcnt, bool alloc)
{
	unsigned int i;
	int ret;

	a->len = 0;
	for (i = 0; i < iovcnt; i++)
		a->len += a->iov[i].iov_len;
	a->req = r;
	a->alloc = alloc;
	a->compressed = false;
	a->cow = false;
	a->cow_copy = false;
	a->aio = (struct qcow2_aio){
		.op = op, .fd = r->img->fd, .iov = a->iov, .iovcnt = iovcnt,
		.off = host_off, .done = aio_done,
	};
	ret = r->img->io->submit(r->img->io, &a->aio);
	if (ret < 0)
		return ret;
	a->busy = true;
	r->pending++;
	return 0;
}

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

static void inflight_del(struct qcow2_req *r)
{
	struct qcow2_inflight **pp = &r->img->inflight;

	while (*pp && *pp != &r->flight)
		pp = &(*pp)->next;
	if (*pp)
		*pp = r->flight.next;
	qcow2_waitq_wake(&r->flight.waiters, 0);
}

/* ---- Reads ---------------------------------------------------------------------- */

static void sub_done(struct qcow2_req *sub, int res, void *priv)
{
	struct qcow2_req *r = priv;

	r->sub_busy[sub == r->sub[1]] = false;
	r->pending--;
	if (r->alloc == ALLOC_COW)
		r->cow_pending--;
	if (res < 0 && !r->err) {
		r->err = res;
		qcow2_error(r->img, res, "backing file: %s", qcow2_errmsg(sub->img));
	}
	req_step(r);
}

/*
 * Read guest bytes [@off, @off + @len) as the backing chain shows them into
 * @dst. 0 (submitted or done), -EBUSY (both sub-requests busy) or -errno.
 */
static int backing_read(struct qcow2_req *r, uint8_t *dst, uint64_t off, uint64_t len)
{
	struct qcow2 *b = r->img->backing;
	int i;

	if (!b || off >= b->h.size) {
		memset(dst, 0, len);
		return 0;
	}
	if (len > b->h.size - off) {
		memset(dst + (b->h.size - off), 0, len - (b->h.size - off));
		len = b->h.size - off;
	}
	i = r->sub_busy[0] ? 1 : 0;
	if (r->sub_busy[i])
		return -EBUSY;
	if (!r->sub[i]) {
		r->sub[i] = qcow2_req_new(b);
		if (!r->sub[i])
			return -ENOMEM;
	}
	r->sub_busy[i] = true;
	r->pending++;
	if (r->alloc == ALLOC_COW)
		r->cow_pending++;
	qcow2_req_submit(r->sub[i], QCOW2_OP_READ, off, len, dst, sub_done, r);
	return 0;
}

/* A raw image: guest offsets are file offsets. */
static int read_piece_raw(struct qcow2_req *r)
{
	uint64_t end = r->off + r->len, len = end - r->pos;
	uint8_t *dst = r->buf + (r->pos - r->off);
	struct req_aio *a = aio_get(r);
	int ret;

	if (!a)
		return -EBUSY;
	if (len > (1u << 30))
		len = 1u << 30;
	a->iov[0] = (struct iovec){ .iov_base = dst, .iov_len = len };
	ret = aio_submit(r, a, QCOW2_AIO_READ, r->pos, 1, false);
	if (ret < 0)
		return ret;
	r->pos += len;
	return 0;
}

/* Buffers for compressed clusters, allocated on first use and kept. */
static int req_cbufs(struct qcow2_req *r)
{
	size_t cs = r->img->cluster_size;

	if (!r->cbuf && posix_memalign((void **)&r->cbuf, 4096, 2 * cs))
		r->cbuf = NULL;
	if (!r->dbuf)
		r->dbuf = malloc(cs);
	return r->cbuf && r->dbuf ? 0 : -ENOMEM;
}

/*
 * Read the compressed cluster behind descriptor @e; its completion
 * decompresses and copies @len bytes at the current offset into @dst.
 */
static int read_compressed(struct qcow2_req *r, struct req_aio *a, uint64_t e,
			   uint8_t *dst, uint64_t len, bool cow)
{
	uint64_t coff;
	uint32_t clen;
	int ret;

	if (r->cbuf_busy)
		return -EBUSY;
	ret = req_cbufs(r);
	if (ret < 0)
		return ret;
	ret = qcow2_compressed_locate(r->img, e, &coff, &clen);
	if (ret < 0)
		return ret;
	a->iov[0] = (struct iovec){ .iov_base = r->cbuf, .iov_len = clen };
	ret = aio_submit(r, a, QCOW2_AIO_READ, coff, 1, false);
	if (ret < 0)
		return ret;
	a->compressed = true;
	a->cow = cow;
	if (cow)
		r->cow_pending++;
	a->dst = dst;
	a->dst_skip = r->pos & (r->img->cluster_size - 1);
	a->iov[1].iov_len = len;	/* bytes to copy out */
	r->cbuf_busy = true;
	return 0;
}

static int read_piece(struct qcow2_req *r)
{
	struct qcow2 *img = r->img;
	uint64_t end = r->off + r->len, host, run;
	uint8_t *dst = r->buf + (r->pos - r->off);
	enum l2_type type;
	struct req_aio *a = aio_get(r);
	int ret;

	if (!a)
		return -EBUSY;		/* an aio completion re-steps us */
	ret = lookup_run(img, r->pos, end, &r->wait, &type, &host, &run);
	if (ret < 0)
		return ret;
	switch (type) {
	case L2_UNALLOC:
		ret = backing_read(r, dst, r->pos, run);
		if (ret < 0)
			return ret;
		break;
	case L2_ZERO_PLAIN:
	case L2_ZERO_ALLOC:
		memset(dst, 0, run);
		break;
	case L2_NORMAL:
		a->iov[0] = (struct iovec){ .iov_base = dst, .iov_len = run };
		ret = aio_submit(r, a, QCOW2_AIO_READ, host, 1, false);
		if (ret < 0)
			return ret;
		break;
	case L2_COMPRESSED:
		ret = read_compressed(r, a, host, dst, run, false);
		if (ret < 0)
			return ret;
		break;
	}
	r->pos += run;
	return 0;
}

/* ---- Writes --------------------------------------------------------------------- */

/*
 * The L2 table for @pos must exist and be ours alone. 0 when it is;
 * -EINPROGRESS when a new table is being written; -EAGAIN (parked) / -errno.
 */
static int l2_table_ready(struct qcow2_req *r, uint64_t *l2_off)
{
	struct qcow2 *img = r->img;
	uint64_t l1e, i = qcow2_l1_index(img, r->pos), host, got, rc;
	struct req_aio *a;
	int ret;

	ret = l1_lookup(img, r->pos, l2_off, &l1e);
	if (ret < 0)
		return ret;
	if (*l2_off && (l1e & QCOW2_OFLAG_COPIED))
		return 0;
	if (*l2_off) {
		ret = qcow2_refcount_get(img, *l2_off >> img->h.cluster_bits, &r->wait, &rc);
		if (ret < 0)
			return ret;
		if (rc == 1) {
			img->l1[i] |= QCOW2_OFLAG_COPIED;
			img->l1_dirty = true;
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
	a = aio_get(r);
	if (!a)
		return -EBUSY;
	if (*l2_off) {
		ret = req_cbufs(r);
		if (ret < 0)
			return ret;
	}
	ret = qcow2_alloc_clusters(img, 1, &r->wait, &host, &got);
	if (ret < 0)
		return ret;
	inflight_add(r, i * qcow2_l2_span(img), qcow2_l2_span(img));
	r->a_host = host;
	r->a_l1 = i;
	r->a_old_l2 = *l2_off;
	if (*l2_off) {
		r->alloc = ALLOC_L2_READ;
		a->iov[0] = (struct iovec){ .iov_base = r->dbuf, .iov_len = img->cluster_size };
		ret = aio_submit(r, a, QCOW2_AIO_READ, *l2_off, 1, true);
	} else {
		r->alloc = ALLOC_L2_ZERO;
		a->iov[0] = (struct iovec){ .iov_base = img->zero_buf, .iov_len = img->cluster_size };
		ret = aio_submit(r, a, QCOW2_AIO_WRITE, host, 1, true);
	}
	if (ret < 0) {
		r->alloc = ALLOC_NONE;
		inflight_del(r);
		qcow2_free_clusters(img, host, 1);
		return ret;
	}
	return -EINPROGRESS;
}

/* The shared table is in dbuf: write the copy. 0 or -errno. */
static int l2_table_copy(struct qcow2_req *r, struct req_aio *a)
{
	struct qcow2 *img = r->img;
	int ret;

	r->alloc = ALLOC_L2_ZERO;
	a->iov[0] = (struct iovec){ .iov_base = r->dbuf, .iov_len = img->cluster_size };
	ret = aio_submit(r, a, QCOW2_AIO_WRITE, r->a_host, 1, true);
	if (ret < 0) {
		r->alloc = ALLOC_NONE;
		inflight_del(r);
		qcow2_free_clusters(img, r->a_host, 1);
	}
	return ret;
}

static int l2_table_link(struct qcow2_req *r)
{
	r->img->l1[r->a_l1] = r->a_host | QCOW2_OFLAG_COPIED;
	r->img->l1_dirty = true;
	r->alloc = ALLOC_NONE;
	inflight_del(r);
	if (!r->a_old_l2)
		return 0;
	return qcow2_free_clusters(r->img, r->a_old_l2, 1);
}

/* The bytes this request writes at guest @pos (the zero buffer for zeroes). */
static uint8_t *write_src(struct qcow2_req *r, uint64_t pos)
{
	if (r->op == QCOW2_OP_WRITE)
		return r->buf + (pos - r->off);
	return r->img->zero_buf;
}

/*
 * Write the run [pos, a_end) into fresh clusters at a_host: zeros before and
 * after the guest bytes so the whole clusters are defined before LINK.
 */
static int alloc_write(struct qcow2_req *r, struct req_aio *a)
{
	struct qcow2 *img = r->img;
	uint64_t cluster_end = r->a_guest + r->a_nr * img->cluster_size;
	uint64_t head = r->pos - r->a_guest, tail = cluster_end - r->a_end;
	uint8_t *tail_src = r->a_cow ? r->cow + img->cluster_size +
			    (r->a_end & (img->cluster_size - 1)) : img->zero_buf;
	unsigned int n = 0;

	if (head)
		a->iov[n++] = (struct iovec){ .iov_base = r->a_cow ? r->cow : img->zero_buf,
					      .iov_len = head };
	a->iov[n++] = (struct iovec){ .iov_base = write_src(r, r->pos),
				      .iov_len = r->a_end - r->pos };
	if (tail)
		a->iov[n++] = (struct iovec){ .iov_base = tail_src, .iov_len = tail };
	r->alloc = ALLOC_DATA;
	return aio_submit(r, a, QCOW2_AIO_WRITE, r->a_host, n, true);
}

static int alloc_link(struct qcow2_req *r)
{
	struct qcow2 *img = r->img;
	uint64_t l2_off, l1e, slice_off, idx, i;
	struct qcow2_slice *s;
	int ret;

	ret = l1_lookup(img, r->a_guest, &l2_off, &l1e);
	if (ret < 0)
		return ret;
	l2_locate(img, l2_off, r->a_guest, &slice_off, &idx);
	ret = qcow2_cache_get(&img->l2_cache, slice_off, 0, &r->wait, &s);
	if (ret < 0)
		return ret;
	for (i = 0; i < r->a_nr; i++)
		l2_set(s, idx + i, (r->a_host + i * img->cluster_size) | QCOW2_OFLAG_COPIED);
	qcow2_cache_mark_dirty(s);
	qcow2_cache_put(s);
	r->alloc = ALLOC_NONE;
	r->pos = r->a_end;
	inflight_del(r);
	if (r->a_old) {
		ret = free_entry(img, r->a_old);
		r->a_old = 0;
	}
	return ret;
}

/* Copy the old bytes the write does not cover into the COW buffer. */
static void cow_fill(struct qcow2_req *r, const uint8_t *old)
{
	uint64_t cs = r->img->cluster_size, head = r->pos - r->a_guest;
	uint64_t in_last = r->a_end & (cs - 1);

	memcpy(r->cow, old, head);
	if (in_last)
		memcpy(r->cow + cs + in_last, old + in_last, cs - in_last);
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
	uint64_t cs = img->cluster_size, head = r->pos - r->a_guest;
	uint64_t in_last = r->a_end & (cs - 1);
	int ret;

	if (!r->cow && posix_memalign((void **)&r->cow, 4096, 2 * cs))
		r->cow = NULL;
	if (!r->cow)
		return -ENOMEM;
	r->a_cow = true;
	r->alloc = ALLOC_COW;
	if (type == L2_COMPRESSED)
		return read_compressed(r, a, old_e, NULL, 0, true);
	if (type == L2_NORMAL) {
		/* A shared cluster: read it whole, keep what the write spares. */
		ret = req_cbufs(r);
		if (ret < 0)
			return ret;
		a->iov[0] = (struct iovec){ .iov_base = r->dbuf, .iov_len = cs };
		ret = aio_submit(r, a, QCOW2_AIO_READ, old_host, 1, false);
		if (ret < 0)
			return ret;
		a->cow = true;
		a->cow_copy = true;
		r->cow_pending++;
		return 0;
	}
	if (head) {
		ret = backing_read(r, r->cow, r->a_guest, head);
		if (ret < 0)
			return ret;
	}
	if (in_last)
		return backing_read(r, r->cow + cs + in_last, r->a_end, cs - in_last);
	return 0;
}

/* Write guest bytes [pos, @end) of the request's current piece. */
static int write_piece(struct qcow2_req *r, uint64_t end)
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

	a = aio_get(r);
	if (!a)
		return -EBUSY;
	ret = l2_table_ready(r, &l2_off);
	if (ret < 0)
		return ret;
	if (inflight_wait(r, cstart, end - cstart))
		return -EAGAIN;
	l2_locate(img, l2_off, r->pos, &slice_off, &idx);
	ret = qcow2_cache_get(&img->l2_cache, slice_off, 0, &r->wait, &s);
	if (ret < 0)
		return ret;
	e = l2_get(s, idx);
	ret = l2_classify(img, e, &type, &host);
	if (ret < 0)
		goto out;
	per_slice = img->l2_cache.slice_bytes / img->l2_entry_bytes;

	if (type == L2_NORMAL && !(e & QCOW2_OFLAG_COPIED)) {
		ret = qcow2_refcount_get(img, host >> img->h.cluster_bits, &r->wait, &rc);
		if (ret < 0)
			goto out;
		if (rc == 1) {
			l2_set(s, idx, e | QCOW2_OFLAG_COPIED);
			qcow2_cache_mark_dirty(s);
			e |= QCOW2_OFLAG_COPIED;
		}
	}
	if (type == L2_NORMAL && (e & QCOW2_OFLAG_COPIED)) {
		/* Rewrite in place: extend over contiguous clusters we own. */
		for (n = 1; idx + n < per_slice && cstart + n * img->cluster_size < end; n++) {
			uint64_t en = l2_get(s, idx + n), hn;

			if (l2_classify(img, en, &t, &hn) < 0 || t != L2_NORMAL ||
			    !(en & QCOW2_OFLAG_COPIED) || hn != host + n * img->cluster_size)
				break;
		}
		run_end = cstart + n * img->cluster_size;
		if (run_end > end)
			run_end = end;
		a->iov[0] = (struct iovec){ .iov_base = write_src(r, r->pos),
					    .iov_len = run_end - r->pos };
		ret = aio_submit(r, a, QCOW2_AIO_WRITE, host + (r->pos - cstart), 1, false);
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

		if (l2_classify(img, l2_get(s, idx + n), &t, &hn) < 0 || t != type)
			break;
	}
	qcow2_cache_put(s);

	old_host = host;
	if (type == L2_ZERO_ALLOC && !shared) {
		/* A preallocated zero cluster: write it whole in place. */
		got = 1;
	} else {
		ret = qcow2_alloc_clusters(img, shared ? 1 : n, &r->wait, &host, &got);
		if (ret < 0)
			return ret;
	}
	inflight_add(r, cstart, got * img->cluster_size);
	r->a_guest = cstart;
	r->a_host = host;
	r->a_nr = got;
	r->a_new = shared || type != L2_ZERO_ALLOC;
	r->a_old = shared ? e : 0;
	r->a_end = cstart + got * img->cluster_size < end ? cstart + got * img->cluster_size : end;
	r->a_cow = false;
	partial = r->pos != cstart || (r->a_end & (img->cluster_size - 1));
	if (partial && ((type == L2_UNALLOC && img->backing) || type == L2_COMPRESSED ||
			type == L2_NORMAL)) {
		ret = cow_start(r, a, type, e, old_host);
		if (ret < 0)
			goto fail;
		return 0;
	}
	ret = alloc_write(r, a);
	if (ret < 0)
		goto fail;
	return 0;
fail:
	r->alloc = ALLOC_NONE;
	r->a_old = 0;
	inflight_del(r);
	if (r->a_new)
		qcow2_free_clusters(img, host, got);
	return ret;
out:
	qcow2_cache_put(s);
	return ret;
}

/* ---- Write-zeroes and discard ------------------------------------------------- */

/*
 * Whole clusters: drop their allocation and mark them zero (v3) or
 * unallocated (v2, where no backing file shows through). Freed clusters are
 * released after the next flush.
 */
static int zero_clusters(struct qcow2_req *r, uint64_t end)
{
	struct qcow2 *img = r->img;
	uint64_t l2_off, l1e, slice_off, idx, per_slice, i, n, host, e, ne;
	struct qcow2_slice *s;
	enum l2_type type;
	int ret;

	/* With a backing file, v3 hides it behind zero flags; v2 cannot. */
	bool hide = img->backing && img->h.version >= 3;

	ret = l1_lookup(img, r->pos, &l2_off, &l1e);
	if (ret < 0)
		return ret;
	if (!l2_off && !hide) {
		uint64_t limit = (qcow2_l1_index(img, r->pos) + 1) * qcow2_l2_span(img);

		r->pos = end < limit ? end : limit;
		return 0;
	}
	ret = l2_table_ready(r, &l2_off);
	if (ret < 0)
		return ret;
	if (inflight_wait(r, r->pos, end - r->pos))
		return -EAGAIN;
	l2_locate(img, l2_off, r->pos, &slice_off, &idx);
	ret = qcow2_cache_get(&img->l2_cache, slice_off, 0, &r->wait, &s);
	if (ret < 0)
		return ret;
	per_slice = img->l2_cache.slice_bytes / img->l2_entry_bytes;
	n = (end - r->pos) >> img->h.cluster_bits;
	if (n > per_slice - idx)
		n = per_slice - idx;
	for (i = 0; i < n; i++) {
		e = l2_get(s, idx + i);
		ret = l2_classify(img, e, &type, &host);
		if (ret < 0)
			break;
		if (type == L2_ZERO_PLAIN)
			continue;
		if (type == L2_UNALLOC) {
			if (hide) {
				l2_set(s, idx + i, L2E_ZERO);
				qcow2_cache_mark_dirty(s);
			}
			continue;
		}
		ne = img->h.version >= 3 ? L2E_ZERO : 0;
		ret = free_entry(img, e);
		if (ret < 0)
			break;
		l2_set(s, idx + i, ne);
		qcow2_cache_mark_dirty(s);
	}
	qcow2_cache_put(s);
	r->pos += i << img->h.cluster_bits;
	return ret;
}

static int zero_piece(struct qcow2_req *r)
{
	struct qcow2 *img = r->img;
	uint64_t end = r->off + r->len, cstart = qcow2_cluster_off(img, r->pos);
	uint64_t cend = cstart + img->cluster_size, host, run;
	enum l2_type type;
	int ret;

	if (r->pos == cstart && end >= cend) {
		/* v2 over a backing file: only real zeros hide it. */
		if (r->op == QCOW2_OP_WRITE_ZEROES && img->backing && img->h.version < 3)
			return write_piece(r, qcow2_cluster_off(img, end));
		return zero_clusters(r, qcow2_cluster_off(img, end));
	}
	/* A partial cluster. */
	if (cend > end)
		cend = end;
	if (r->op == QCOW2_OP_DISCARD) {
		r->pos = cend;		/* as QEMU: partial clusters are not discarded */
		return 0;
	}
	ret = lookup_run(img, r->pos, cend, &r->wait, &type, &host, &run);
	if (ret < 0)
		return ret;
	if ((type == L2_UNALLOC && !img->backing) || type == L2_ZERO_PLAIN ||
	    type == L2_ZERO_ALLOC) {
		r->pos = cend;		/* already reads as zeros */
		return 0;
	}
	return write_piece(r, cend);
}

/* ---- The state machine ------------------------------------------------------------ */

static void flush_wake(struct qcow2_wait *w, int res)
{
	struct qcow2_req *r = (struct qcow2_req *)((char *)w - offsetof(struct qcow2_req, wait));

	if (res < 0 && !r->err)
		r->err = res;
	r->pos = r->off + r->len;
	r->parked = false;
	r->wakes++;
	req_step(r);
}

static void req_wake(struct qcow2_wait *w, int res)
{
	struct qcow2_req *r = (struct qcow2_req *)((char *)w - offsetof(struct qcow2_req, wait));

	if (res < 0 && !r->err)
		r->err = res;
	r->parked = false;
	r->wakes++;
	req_step(r);
}

/*
 * Make as much progress as possible. Returns 1 when the request is complete
 * (result in r->err), 0 when it waits for an I/O or a wakeup.
 */
static int req_run(struct qcow2_req *r)
{
	uint64_t end = r->off + r->len;
	unsigned int wakes;
	int ret;

	for (;;) {
		/* Parked: only the wakeup may move us on (completions just count). */
		if (r->parked)
			return 0;
		wakes = r->wakes;
		if (r->err)
			return r->pending ? 0 : 1;
		switch (r->alloc) {
		case ALLOC_COW: {
			struct req_aio *a;

			if (r->cow_pending)
				return 0;
			a = aio_get(r);
			if (!a)
				return 0;
			ret = alloc_write(r, a);
			if (ret < 0) {
				r->alloc = ALLOC_NONE;
				inflight_del(r);
				if (r->a_new)
					qcow2_free_clusters(r->img, r->a_host, r->a_nr);
			}
			goto progress;
		}
		case ALLOC_DATA:
		case ALLOC_L2_READ:
		case ALLOC_L2_ZERO:
			return 0;
		case ALLOC_LINK:
			ret = alloc_link(r);
			goto progress;
		case ALLOC_L2_LINK:
			ret = l2_table_link(r);
			goto progress;
		case ALLOC_L2_COPY: {
			struct req_aio *a = aio_get(r);

			if (!a)
				return 0;
			ret = l2_table_copy(r, a);
			goto progress;
		}
		case ALLOC_NONE:
			break;
		}
		if (r->pos >= end)
			return r->pending ? 0 : 1;
		switch (r->op) {
		case QCOW2_OP_READ:
			ret = r->img->raw ? read_piece_raw(r) : read_piece(r);
			break;
		case QCOW2_OP_WRITE:
			ret = write_piece(r, end);
			break;
		case QCOW2_OP_WRITE_ZEROES:
		case QCOW2_OP_DISCARD:
			ret = zero_piece(r);
			break;
		default:
			ret = -EINVAL;
			break;
		}
progress:
		if (ret == -EBUSY)
			return 0;
		if (ret == -EINPROGRESS)
			continue;
		if (ret == -EAGAIN) {
			/* Unless the wakeup already came while we were parking. */
			if (r->wakes == wakes)
				r->parked = true;
			continue;
		}
		if (ret < 0)
			r->err = ret;
	}
}

static void req_step(struct qcow2_req *r)
{
	struct qcow2 *img = r->img;
	int done;

	/* Completions can arrive while we run (wakeups are synchronous). */
	if (r->stepping) {
		r->again = true;
		return;
	}
	r->stepping = true;
	do {
		r->again = false;
		done = req_run(r);
	} while (!done && r->again);
	r->stepping = false;
	if (done && r->active) {
		r->active = false;
		img->nr_reqs_active--;
		r->done(r, r->err, r->priv);
	}
}

struct qcow2_req *qcow2_req_new(struct qcow2 *img)
{
	struct qcow2_req *r = calloc(1, sizeof(*r));

	if (r)
		r->img = img;
	return r;
}

void qcow2_req_free(struct qcow2_req *r)
{
	if (!r)
		return;
	qcow2_req_free(r->sub[0]);
	qcow2_req_free(r->sub[1]);
	free(r->cow);
	free(r->cbuf);
	free(r->dbuf);
	free(r);
}

void qcow2_req_submit(struct qcow2_req *r, enum qcow2_op op, uint64_t off,
		      uint64_t len, void *buf, qcow2_done_fn done, void *priv)
{
	struct qcow2 *img = r->img;
	int ret;

	r->op = op;
	r->off = off;
	r->len = len;
	r->pos = off;
	r->buf = buf;
	r->done = done;
	r->priv = priv;
	r->pending = 0;
	r->err = 0;
	r->alloc = ALLOC_NONE;
	r->again = false;
	r->parked = false;
	r->active = true;
	r->wait.fn = req_wake;
	img->nr_reqs_active++;

	if (op != QCOW2_OP_READ && img->read_only) {
		r->err = qcow2_error(img, -EROFS, "image is read-only");
	} else if (op != QCOW2_OP_FLUSH &&
		   (off > img->h.size || len > img->h.size - off)) {
		r->err = qcow2_error(img, -EINVAL, "request [%llu, +%llu) beyond the virtual size %llu",
				     (unsigned long long)off, (unsigned long long)len,
				     (unsigned long long)img->h.size);
	} else if (op == QCOW2_OP_FLUSH) {
		r->wait.fn = flush_wake;
		r->parked = true;
		ret = qcow2_flush_start(img, &r->wait);
		if (ret == -EAGAIN)
			return;
		r->parked = false;
		r->err = ret;
		r->pos = off + len;
	}
	req_step(r);
}

/* ---- Blocking front end ------------------------------------------------------------ */

bool qcow2_busy(const struct qcow2 *img)
{
	return img->nr_reqs_active || qcow2_flush_busy(img);
}

int qcow2_drain(struct qcow2 *img)
{
	while (qcow2_busy(img)) {
		int ret = img->io->wait(img->io);

		if (ret < 0 && ret != -EAGAIN)
			return ret;
		if (ret == -EAGAIN && qcow2_busy(img))
			return qcow2_error(img, -EIO, "engine stalled with requests pending");
	}
	return 0;
}

struct sync_req {
	bool done;
	int res;
};

static void sync_req_done(struct qcow2_req *r, int res, void *priv)
{
	struct sync_req *s = priv;

	(void)r;
	s->res = res;
	s->done = true;
}

static int sync_op(struct qcow2 *img, enum qcow2_op op, void *buf, uint64_t len, uint64_t off)
{
	struct qcow2_req *r = qcow2_req_new(img);
	struct sync_req s = { 0 };
	int ret;

	if (!r)
		return -ENOMEM;
	qcow2_req_submit(r, op, off, len, buf, sync_req_done, &s);
	while (!s.done) {
		ret = img->io->wait(img->io);
		if (ret == -EAGAIN)
			ret = qcow2_error(img, -EIO, "engine stalled with a request pending");
		if (ret < 0)
			return ret;	/* @r may still be referenced: leak it */
	}
	qcow2_req_free(r);
	return s.res;
}

int qcow2_pread(struct qcow2 *img, void *buf, uint64_t len, uint64_t off)
{
	return sync_op(img, QCOW2_OP_READ, buf, len, off);
}

int qcow2_pwrite(struct qcow2 *img, const void *buf, uint64_t len, uint64_t off)
{
	return sync_op(img, QCOW2_OP_WRITE, (void *)buf, len, off);
}

int qcow2_write_zeroes(struct qcow2 *img, uint64_t len, uint64_t off)
{
	return sync_op(img, QCOW2_OP_WRITE_ZEROES, NULL, len, off);
}

int qcow2_discard(struct qcow2 *img, uint64_t len, uint64_t off)
{
	return sync_op(img, QCOW2_OP_DISCARD, NULL, len, off);
}

int qcow2_flush(struct qcow2 *img)
{
	if (img->read_only)
		return 0;
	return sync_op(img, QCOW2_OP_FLUSH, NULL, 0, 0);
}

/* ---- Mapping ---------------------------------------------------------------------- */

struct sync_wait {
	struct qcow2_wait w;
	bool woken;
	int res;
};

static void sync_wake(struct qcow2_wait *w, int res)
{
	struct sync_wait *s = (struct sync_wait *)w;

	s->woken = true;
	s->res = res;
}

int qcow2_map(struct qcow2 *img, uint64_t off, uint64_t len, struct qcow2_extent *ext)
{
	struct sync_wait sw = { .w.fn = sync_wake };
	uint64_t end, host, run;
	enum l2_type type;
	int ret;

	if (off >= img->h.size)
		return qcow2_error(img, -EINVAL, "offset %llu beyond the virtual size",
				   (unsigned long long)off);
	end = len > img->h.size - off ? img->h.size : off + len;
	for (;;) {
		sw.woken = false;
		ret = lookup_run(img, off, end, &sw.w, &type, &host, &run);
		if (ret != -EAGAIN)
			break;
		while (!sw.woken) {
			ret = img->io->wait(img->io);
			if (ret < 0 && ret != -EAGAIN)
				return ret;
		}
		if (sw.res < 0)
			return sw.res;
	}
	if (ret < 0)
		return ret;
	ext->guest_off = off;
	ext->len = run;
	ext->host_off = host;
	switch (type) {
	case L2_UNALLOC:
		ext->type = QCOW2_EXTENT_UNALLOCATED;
		break;
	case L2_ZERO_PLAIN:
	case L2_ZERO_ALLOC:
		ext->type = QCOW2_EXTENT_ZERO;
		break;
	case L2_NORMAL:
		ext->type = QCOW2_EXTENT_DATA;
		break;
	case L2_COMPRESSED:
		ext->type = QCOW2_EXTENT_COMPRESSED;
		break;
	}
	return 0;
}
