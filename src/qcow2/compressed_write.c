// SPDX-License-Identifier: MIT
/*
 * Compressed writes (convert -c), offline and blocking, laid out as QEMU
 * lays them out: the compressed bytes of consecutive clusters are packed
 * byte after byte into host clusters, a compressed cluster may run from one
 * host cluster into the next when that one is allocated right after it,
 * and every host cluster holds one reference per compressed cluster that
 * touches it.
 *
 * Ordering: the refcounts are raised in the cache and the compressed bytes
 * are on disk before the L2 entry is set; flush.c writes refcounts before
 * L2 tables. The old entry, if any, is released after the next flush.
 */
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"

/* Bits of a compressed descriptor that hold the host offset. */
static uint32_t csize_shift(const struct qcow2 *img)
{
	return 62 - (img->h.cluster_bits - 8);
}

/*
 * Reserve @size bytes for compressed data (QEMU's qcow2_alloc_bytes): after
 * the previous compressed cluster if it fits there, or in the next free
 * cluster, continuing across the boundary when that cluster directly
 * follows. Returns 0 with the host byte offset in *@out, or -errno.
 */
static int alloc_bytes(struct qcow2 *img, uint32_t size, uint64_t *out)
{
	uint64_t cs = img->cluster_size, off = img->free_byte_off, fresh = 0;
	uint64_t rc, host, got, c, first, last;
	struct qcow2_sync s;
	int ret;

	qcow2_sync_init(&s);
	if (off) {
		ret = QCOW2_SYNC(img, &s, qcow2_refcount_get(img, off >> img->h.cluster_bits,
							   &s.w, &rc));
		if (ret < 0)
			return ret;
		/* A full refcount cannot take another reference. */
		if (rc == 0 || rc >= img->refcount_max)
			off = 0;
	}
	if (!off || cs - (off & (cs - 1)) < size) {
		ret = QCOW2_SYNC(img, &s, qcow2_alloc_clusters(img, 1, &s.w, &host, &got));
		if (ret < 0)
			return ret;
		fresh = host;
		if (!off || ((off + cs - 1) & ~(cs - 1)) != host)
			off = host;
	}
	if (off + size > (1ull << csize_shift(img))) {
		ret = qcow2_error(img, -ENOSPC,
				  "compressed data would lie beyond what a descriptor can address");
		goto fail;
	}
	/* The fresh cluster got its reference when it was allocated. */
	first = off >> img->h.cluster_bits;
	last = (off + size - 1) >> img->h.cluster_bits;
	for (c = first; c <= last; c++) {
		if (fresh && c == fresh >> img->h.cluster_bits)
			continue;
		ret = QCOW2_SYNC(img, &s, qcow2_refcount_add(img, c, 1, &s.w));
		if (ret < 0)
			goto fail;
	}
	img->free_byte_off = (off + size) & (cs - 1) ? off + size : 0;
	*out = off;
	return 0;
fail:
	img->free_byte_off = 0;
	if (fresh)
		qcow2_free_clusters(img, fresh, 1);
	return ret;
}

/* Release the references alloc_bytes took for [@off, @off + @size). */
static void free_bytes(struct qcow2 *img, uint64_t off, uint32_t size)
{
	uint64_t first = off >> img->h.cluster_bits;
	uint64_t last = (off + size - 1) >> img->h.cluster_bits;

	img->free_byte_off = 0;
	qcow2_free_clusters(img, first << img->h.cluster_bits, last - first + 1);
}

/*
 * Point the L2 entry of guest @off at compressed bytes [@host, @host + @size)
 * (the sector count field counts the sectors after the first). 0 with the
 * replaced entry in *@old, or -errno with nothing changed.
 */
static int link_entry(struct qcow2 *img, uint64_t l2_off, uint64_t off, uint64_t host,
		      uint32_t size, uint64_t *old)
{
	uint64_t nr_sectors = ((host + size - 1) >> 9) - (host >> 9);
	uint64_t slice_off, idx, old_host;
	struct qcow2_slice *sl;
	struct qcow2_sync s;
	enum l2_type type;
	int ret;

	qcow2_sync_init(&s);
	qcow2_l2_locate(img, l2_off, off, &slice_off, &idx);
	ret = QCOW2_SYNC(img, &s, qcow2_cache_get(&img->l2_cache, slice_off, QCOW2_CACHE_MODIFY,
						  &s.w, &sl));
	if (ret < 0)
		return ret;
	*old = qcow2_l2_get(sl, idx);
	ret = qcow2_l2_classify(img, *old, &type, &old_host);
	if (!ret) {
		qcow2_l2_set(sl, idx, host | L2E_COMPRESSED | (nr_sectors << csize_shift(img)));
		if (img->l2_entry_bytes == 16)
			qcow2_l2_set_bitmap(sl, idx, 0);	/* unused for compressed clusters */
		qcow2_cache_mark_dirty(sl);
	}
	qcow2_cache_put(sl);
	return ret;
}

/* QEMU aligns the file end to a sector after a run of compressed writes. */
static int align_file_end(struct qcow2 *img)
{
	off_t end = lseek(img->fd, 0, SEEK_END);

	if (end < 0)
		return qcow2_error(img, -errno, "cannot find the end of the file: %s",
				   strerror(errno));
	if (!(end & 511))
		return 0;
	if (ftruncate(img->fd, (end + 511) & ~511) < 0)
		return qcow2_error(img, -errno, "cannot extend the file: %s", strerror(errno));
	return 0;
}

int qcow2_pwrite_compressed(struct qcow2 *img, const void *buf, uint64_t len, uint64_t off)
{
	uint64_t cs = img->cluster_size, l2_off = 0, host = 0, old = 0;
	uint8_t *out, *padded = NULL;
	const uint8_t *src = buf;
	int ret, clen;

	if (img->raw || img->read_only)
		return qcow2_error(img, -EROFS, "compressed writes need a writable qcow2 image");
	if (qcow2_busy(img))
		return qcow2_error(img, -EBUSY, "compressed writes need an idle image");
	if (img->data_fd >= 0)
		return qcow2_error(img, -ENOTSUP, "no compressed clusters with an external data file");
	/* QEMU stores them unencrypted (and reads them so), and refuses to write them. */
	if (img->crypt)
		return qcow2_error(img, -ENOTSUP, "no compressed clusters in an encrypted image");
	if (fcntl(img->fd, F_GETFL) & O_DIRECT)
		return qcow2_error(img, -EINVAL, "compressed writes need an image opened without direct I/O");
	if (!len)
		return align_file_end(img);
	if (!qcow2_aligned(img, off) || off >= img->h.size || len > img->h.size - off ||
	    (len != cs && off + len != img->h.size) || len > cs)
		return qcow2_error(img, -EINVAL,
				   "compressed write of %llu bytes at %llu is not one whole cluster",
				   (unsigned long long)len, (unsigned long long)off);
	out = malloc(2 * cs);
	if (!out)
		return -ENOMEM;
	if (len < cs) {
		/* The last cluster of the disk: compressed as a whole, zero padded. */
		padded = out + cs;
		memcpy(padded, buf, len);
		memset(padded + len, 0, cs - len);
		src = padded;
	}
	/* Like QEMU: only a result smaller than the cluster is worth it. */
	clen = qcow2_compress(img, src, out, cs - 1);
	if (clen == -ENOSPC) {
		free(out);
		ret = qcow2_pwrite(img, buf, len, off);
		return ret < 0 ? ret : 1;
	}
	ret = clen;
	if (ret < 0)
		goto out;
	ret = qcow2_l2_table_sync(img, off, &l2_off);
	if (ret < 0)
		goto out;
	ret = alloc_bytes(img, clen, &host);
	if (ret < 0)
		goto out;
	ret = qcow2_sync_pwrite(img, out, clen, host);
	if (!ret)
		ret = link_entry(img, l2_off, off, host, clen, &old);
	if (ret < 0) {
		free_bytes(img, host, clen);
		goto out;
	}
	/* Whatever the entry held is released once the new one is durable. */
	ret = qcow2_free_entry(img, old);
out:
	free(out);
	return ret;
}
