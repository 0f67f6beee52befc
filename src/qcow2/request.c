// SPDX-License-Identifier: MIT
/*
 * Guest requests as state machines: read, write, write-zeroes, discard,
 * flush. A request walks its range piece by piece (one run of like clusters
 * in one L2 slice at a time); a metadata miss parks it and the wakeup
 * re-enters qcow2_req_step(), which picks up where it left off. Reads and
 * the data I/O live here; mapping changes are write.c's.
 */
#include <stdlib.h>

#include "internal.h"

/* ---- Data I/O ---------------------------------------------------------------- */

static void aio_done(struct qcow2_aio *aio, int res)
{
	struct req_aio *a = (struct req_aio *)aio;
	struct qcow2_req *r = a->req;

	if (res >= 0 && (size_t)res < a->len) {
		if (r->opaque) {
			/* The zeros past the end of the file need real memory. */
			res = -EXDEV;
		} else if (aio->op == QCOW2_AIO_READ && a->aio.iovcnt == 1) {
			/* Past the end of the file reads as zeros. */
			memset((uint8_t *)a->iov[0].iov_base + res, 0, a->len - res);
			res = a->len;
		} else {
			/* A short write: the file system is full (as QEMU reads it). */
			res = -ENOSPC;
		}
	}
	if (res == -EXDEV && r->opaque) {
		if (!r->err)
			r->err = res;
	} else if (res < 0 && !r->err) {
		r->err = res;
		qcow2_error(r->img, res, "%s at 0x%llx failed: %s",
			    aio->op == QCOW2_AIO_READ ? "read" : "write",
			    (unsigned long long)aio->off, strerror(-res));
	}
	if (a->decrypt && res >= 0) {
		res = qcow2_crypt_buf(r->img, aio->off, a->crypt_guest, a->iov[0].iov_base,
				      a->len, false);
		if (res < 0 && !r->err)
			r->err = res;
	}
	if (a->compressed) {
		r->cbuf_busy = false;
		if (res >= 0) {
			res = qcow2_decompress(r->img, r->cbuf + a->c_skip, a->c_len, r->dbuf);
			if (res < 0 && !r->err)
				r->err = res;
			else if (a->cow)
				qcow2_cow_fill(r, r->dbuf);
			else
				memcpy(a->dst, r->dbuf + a->dst_skip, a->iov[1].iov_len);
		}
	}
	if (a->cow_copy && res >= 0)
		qcow2_cow_fill(r, r->dbuf);
	if (a->cow)
		r->cow_pending--;
	a->busy = false;
	r->pending--;
	if (a->alloc && res >= 0)
		r->alloc = r->alloc == ALLOC_DATA ? ALLOC_LINK :
			   r->alloc == ALLOC_L2_READ ? ALLOC_L2_COPY : ALLOC_L2_LINK;
	qcow2_req_step(r);
}

struct req_aio *qcow2_req_aio_get(struct qcow2_req *r)
{
	unsigned int i;

	for (i = 0; i < REQ_AIOS; i++)
		if (!r->aios[i].busy)
			return &r->aios[i];
	return NULL;
}

/* Submit one read/write of up to three buffers on @fd. 0 or -errno. */
static int aio_submit_fd(struct qcow2_req *r, struct req_aio *a, enum qcow2_aio_op op, int fd,
			 uint64_t host_off, unsigned int iovcnt, bool alloc)
{
	unsigned int i;
	int ret;

	a->len = 0;
	for (i = 0; i < iovcnt; i++)
		a->len += a->iov[i].iov_len;
	if (op == QCOW2_AIO_WRITE && fd == r->img->fd) {
		/* Data, or a new L2 table nothing points at yet: no metadata there. */
		ret = qcow2_overlap_check(r->img, 0, host_off, a->len);
		if (ret < 0)
			return ret;
	}
	a->req = r;
	a->alloc = alloc;
	a->compressed = false;
	a->cow = false;
	a->cow_copy = false;
	a->decrypt = false;
	a->aio = (struct qcow2_aio){
		.op = op, .fd = fd, .iov = a->iov, .iovcnt = iovcnt,
		.off = host_off, .done = aio_done,
	};
	ret = qcow2_submit(r->img, &a->aio);
	if (ret < 0)
		return ret;
	a->busy = true;
	r->pending++;
	return 0;
}

int qcow2_req_aio_submit(struct qcow2_req *r, struct req_aio *a, enum qcow2_aio_op op,
			 uint64_t host_off, unsigned int iovcnt, bool alloc)
{
	return aio_submit_fd(r, a, op, r->img->fd, host_off, iovcnt, alloc);
}

int qcow2_req_data_submit(struct qcow2_req *r, struct req_aio *a, enum qcow2_aio_op op,
			  uint64_t host_off, unsigned int iovcnt, bool alloc)
{
	return aio_submit_fd(r, a, op, qcow2_data_fd(r->img), host_off, iovcnt, alloc);
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
	qcow2_req_step(r);
}

/*
 * Read guest bytes [@off, @off + @len) as the backing chain shows them into
 * @dst. 0 (submitted or done), -EBUSY (both sub-requests busy) or -errno.
 */
int qcow2_backing_read(struct qcow2_req *r, uint8_t *dst, uint64_t off, uint64_t len)
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

/* A raw image: guest offsets are file offsets, for reads and writes alike. */
static int rw_piece_raw(struct qcow2_req *r)
{
	uint64_t end = r->off + r->len, len = end - r->pos;
	uint8_t *buf = r->buf + (r->pos - r->off);
	bool write = r->op == QCOW2_OP_WRITE;
	struct req_aio *a = qcow2_req_aio_get(r);
	int ret;

	if (!a)
		return -EBUSY;
	/* Deferred data lands in r->buf, as for a qcow2 write in place. */
	if (write && qcow2_data_wait(r, r->buf))
		return -EBUSY;
	if (len > (1u << 30))
		len = 1u << 30;
	a->iov[0] = (struct iovec){ .iov_base = buf, .iov_len = len };
	ret = qcow2_req_aio_submit(r, a, write ? QCOW2_AIO_WRITE : QCOW2_AIO_READ, r->pos, 1,
				   false);
	if (ret < 0)
		return ret;
	r->pos += len;
	return 0;
}

/*
 * Buffers for compressed clusters, allocated on first use and kept; aligned
 * for O_DIRECT. cbuf holds up to two clusters of compressed bytes plus the
 * alignment slack on either side.
 */
int qcow2_req_cbufs(struct qcow2_req *r)
{
	size_t cs = r->img->cluster_size;

	if (!r->cbuf) {
		if (posix_memalign((void **)&r->cbuf, QCOW2_DIO_ALIGN, 2 * cs + 2 * QCOW2_DIO_ALIGN))
			r->cbuf = NULL;
		else
			r->img->scratch_bytes += 2 * cs + 2 * QCOW2_DIO_ALIGN;
	}
	if (!r->dbuf) {
		if (posix_memalign((void **)&r->dbuf, QCOW2_DIO_ALIGN, cs))
			r->dbuf = NULL;
		else
			r->img->scratch_bytes += cs;
	}
	return r->cbuf && r->dbuf ? 0 : -ENOMEM;
}

/*
 * Read the compressed cluster behind descriptor @e; its completion
 * decompresses and copies @len bytes at the current offset into @dst.
 * Not decrypted: QEMU 7.2's compressed writes to an encrypted image store
 * plain bytes, and it reads them back so.
 */
int qcow2_read_compressed(struct qcow2_req *r, struct req_aio *a, uint64_t e,
			   uint8_t *dst, uint64_t len, bool cow)
{
	uint64_t coff, start, end;
	uint32_t clen;
	int ret;

	if (r->cbuf_busy)
		return -EBUSY;
	ret = qcow2_req_cbufs(r);
	if (ret < 0)
		return ret;
	ret = qcow2_compressed_locate(r->img, e, &coff, &clen);
	if (ret < 0)
		return ret;
	/* Compressed bytes start anywhere: read whole aligned blocks around them. */
	start = coff & ~(uint64_t)(QCOW2_DIO_ALIGN - 1);
	end = (coff + clen + QCOW2_DIO_ALIGN - 1) & ~(uint64_t)(QCOW2_DIO_ALIGN - 1);
	a->iov[0] = (struct iovec){ .iov_base = r->cbuf, .iov_len = end - start };
	ret = qcow2_req_aio_submit(r, a, QCOW2_AIO_READ, start, 1, false);
	if (ret < 0)
		return ret;
	a->c_skip = coff - start;
	a->c_len = clen;
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
	struct req_aio *a = qcow2_req_aio_get(r);
	int ret;

	if (!a)
		return -EBUSY;		/* an aio completion re-steps us */
	ret = qcow2_lookup_run(img, r->pos, end, &r->wait, &type, &host, &run);
	if (ret < 0)
		return ret;
	/* An opaque buffer takes only plain reads of the file. */
	if (r->opaque && type != L2_NORMAL)
		return -EXDEV;
	switch (type) {
	case L2_UNALLOC:
		ret = qcow2_backing_read(r, dst, r->pos, run);
		if (ret < 0)
			return ret;
		break;
	case L2_ZERO_PLAIN:
	case L2_ZERO_ALLOC:
		memset(dst, 0, run);
		break;
	case L2_NORMAL:
		a->iov[0] = (struct iovec){ .iov_base = dst, .iov_len = run };
		ret = qcow2_req_data_submit(r, a, QCOW2_AIO_READ, host, 1, false);
		if (ret < 0)
			return ret;
		a->decrypt = img->crypt != NULL;
		a->crypt_guest = r->pos;
		break;
	case L2_COMPRESSED:
		ret = qcow2_read_compressed(r, a, host, dst, run, false);
		if (ret < 0)
			return ret;
		break;
	}
	r->pos += run;
	return 0;
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
	qcow2_req_step(r);
}

static void req_wake(struct qcow2_wait *w, int res)
{
	struct qcow2_req *r = (struct qcow2_req *)((char *)w - offsetof(struct qcow2_req, wait));

	if (res < 0 && !r->err)
		r->err = res;
	r->parked = false;
	r->wakes++;
	qcow2_req_step(r);
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
		if (r->err) {
			/* Fetched data may still be landing in our buffers. */
			if (r->pending || r->fetching)
				return 0;
			qcow2_alloc_abort(r);
			return 1;
		}
		switch (r->alloc) {
		case ALLOC_COW: {
			struct req_aio *a;

			if (r->cow_pending || r->fetching)
				return 0;
			a = qcow2_req_aio_get(r);
			if (!a)
				return 0;
			ret = qcow2_alloc_write(r, a);
			if (ret < 0)
				qcow2_alloc_abort(r);
			goto progress;
		}
		case ALLOC_DATA:
		case ALLOC_L2_READ:
		case ALLOC_L2_ZERO:
			return 0;
		case ALLOC_LINK:
			ret = qcow2_alloc_link(r);
			goto progress;
		case ALLOC_L2_LINK:
			ret = qcow2_l2_table_link(r);
			goto progress;
		case ALLOC_L2_COPY: {
			struct req_aio *a = qcow2_req_aio_get(r);

			if (!a)
				return 0;
			ret = qcow2_l2_table_copy(r, a);
			goto progress;
		}
		case ALLOC_NONE:
			break;
		}
		if (r->pos >= end)
			return r->pending ? 0 : 1;
		switch (r->op) {
		case QCOW2_OP_READ:
			ret = r->img->raw ? rw_piece_raw(r) : read_piece(r);
			break;
		case QCOW2_OP_WRITE:
			ret = r->img->raw ? rw_piece_raw(r) : qcow2_write_piece(r, end);
			break;
		case QCOW2_OP_WRITE_ZEROES:
		case QCOW2_OP_WRITE_ZEROES_NOUNMAP:
		case QCOW2_OP_DISCARD:
			ret = qcow2_zero_piece(r);
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

/*
 * A finished request keeps its scratch buffers for the next one unless the
 * requests together hold more than QCOW2_SCRATCH_KEEP: then it gives them
 * back, so memory stays bounded whatever the depth and cluster size.
 */
static void req_trim_scratch(struct qcow2_req *r)
{
	struct qcow2 *img = r->img;
	size_t cs = img->cluster_size;

	if (img->scratch_bytes <= QCOW2_SCRATCH_KEEP)
		return;
	if (r->cow)
		img->scratch_bytes -= 2 * cs;
	if (r->cbuf)
		img->scratch_bytes -= 2 * cs + 2 * QCOW2_DIO_ALIGN;
	if (r->dbuf)
		img->scratch_bytes -= cs;
	img->scratch_bytes -= r->crypt_buf_len;
	free(r->cow);
	free(r->cbuf);
	free(r->dbuf);
	free(r->crypt_buf);
	r->cow = r->cbuf = r->dbuf = r->crypt_buf = NULL;
	r->crypt_buf_len = 0;
}

void qcow2_req_step(struct qcow2_req *r)
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
		req_trim_scratch(r);
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
	/* No scratch accounting here: front ends free requests after qcow2_close(). */
	qcow2_req_free(r->sub[0]);
	qcow2_req_free(r->sub[1]);
	free(r->cow);
	free(r->cbuf);
	free(r->dbuf);
	free(r->crypt_buf);
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
	r->data = buf;
	r->fetch = op == QCOW2_OP_WRITE ? r->fetch_next : NULL;
	r->fetch_next = NULL;
	r->fetching = false;
	r->opaque = (op == QCOW2_OP_READ || op == QCOW2_OP_WRITE) && r->opaque_next;
	r->opaque_next = false;
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
	} else if (op != QCOW2_OP_READ && op != QCOW2_OP_FLUSH && img->corrupt) {
		/* Found corrupt metadata: writing on could only spread the damage. */
		r->err = qcow2_error(img, -EIO, "image is corrupt: writes refused");
	} else if (img->no_data_file && op != QCOW2_OP_FLUSH &&
		   (img->h.incompatible & QCOW2_INCOMPAT_DATA_FILE || img->data_raw)) {
		r->err = qcow2_error(img, -EIO, "opened without its data file: metadata only");
	} else if (img->raw && op != QCOW2_OP_READ && op != QCOW2_OP_WRITE &&
		   op != QCOW2_OP_FLUSH) {
		/* The raw mode serves bench and backing files: no zeroing or discard. */
		r->err = qcow2_error(img, -EOPNOTSUPP,
				     "raw images take only reads, writes and flushes here");
	} else if (op != QCOW2_OP_FLUSH &&
		   (off > img->h.size || len > img->h.size - off)) {
		r->err = qcow2_error(img, -EINVAL, "request [%llu, +%llu) beyond the virtual size %llu",
				     (unsigned long long)off, (unsigned long long)len,
				     (unsigned long long)img->h.size);
	} else if (r->opaque && img->crypt) {
		/* Encryption works on the bytes in memory. */
		r->err = -EXDEV;
	} else if (img->crypt && op != QCOW2_OP_FLUSH && op != QCOW2_OP_DISCARD &&
		   ((off | len) & 511)) {
		r->err = qcow2_error(img, -EINVAL,
				     "encrypted images take 512-byte aligned requests");
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
	qcow2_req_step(r);
}

void qcow2_req_defer_data(struct qcow2_req *r, qcow2_fetch_fn fetch)
{
	r->fetch_next = fetch;
}

void qcow2_req_opaque(struct qcow2_req *r)
{
	r->opaque_next = true;
}

/*
 * Deferred data: true while the write's bytes are not here yet. The first
 * call asks for them to land at @dst; qcow2_req_data_ready() re-steps us.
 */
bool qcow2_data_wait(struct qcow2_req *r, uint8_t *dst)
{
	if (!r->fetch)
		return false;
	if (!r->fetching) {
		r->fetching = true;
		r->data = dst;
		r->fetch(r, dst, r->priv);
	}
	return r->fetching;
}

void qcow2_req_data_ready(struct qcow2_req *r, int err)
{
	r->fetching = false;
	r->fetch = NULL;
	if (err < 0 && !r->err)
		r->err = err;
	qcow2_req_step(r);
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
	if (img->crypt && ((off | len) & 511))
		return qcow2_crypt_unaligned(img, QCOW2_OP_READ, buf, len, off);
	return sync_op(img, QCOW2_OP_READ, buf, len, off);
}

int qcow2_pwrite(struct qcow2 *img, const void *buf, uint64_t len, uint64_t off)
{
	if (img->crypt && ((off | len) & 511))
		return qcow2_crypt_unaligned(img, QCOW2_OP_WRITE, (void *)buf, len, off);
	return sync_op(img, QCOW2_OP_WRITE, (void *)buf, len, off);
}

int qcow2_write_zeroes(struct qcow2 *img, uint64_t len, uint64_t off, bool unmap)
{
	enum qcow2_op op = unmap ? QCOW2_OP_WRITE_ZEROES : QCOW2_OP_WRITE_ZEROES_NOUNMAP;

	if (img->crypt && ((off | len) & 511))
		return qcow2_crypt_unaligned(img, op, NULL, len, off);
	return sync_op(img, op, NULL, len, off);
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
