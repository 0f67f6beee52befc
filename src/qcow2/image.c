// SPDX-License-Identifier: MIT
/*
 * Opening and closing an image: the header, the L1 and refcount tables held
 * in memory, the caches, dirty-bit repair and autoclear handling. Also the
 * blocking I/O helpers that open, create and check use, and error messages.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "internal.h"

#define DEFAULT_L2_CACHE_MAX	(32ull << 20)
#define DEFAULT_RC_CACHE	(256u << 10)
#define MIN_SLICES		16

int qcow2_error(struct qcow2 *img, int err, const char *fmt, ...)
{
	va_list ap;
	int n;

	n = snprintf(img->errmsg, sizeof(img->errmsg), "%s: ", img->path ? img->path : "image");
	if (n < 0 || (size_t)n >= sizeof(img->errmsg))
		return err;
	va_start(ap, fmt);
	vsnprintf(img->errmsg + n, sizeof(img->errmsg) - n, fmt, ap);
	va_end(ap);
	return err;
}

int qcow2_corrupt(struct qcow2 *img, const char *fmt, ...)
{
	char msg[200];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (!img->read_only && !img->corrupt) {
		img->h.incompatible |= QCOW2_INCOMPAT_CORRUPT;
		img->header_dirty = true;
	}
	img->corrupt = true;
	return qcow2_error(img, -EIO, "image is corrupt: %s", msg);
}

const char *qcow2_errmsg(const struct qcow2 *img)
{
	return img->errmsg;
}

void qcow2_waitq_wake(struct qcow2_waitq *q, int res)
{
	struct qcow2_wait *w = q->head;

	/* Detach first: a woken waiter may park again on the same queue. */
	q->head = q->tail = NULL;
	while (w) {
		struct qcow2_wait *next = w->next;

		w->fn(w, res);
		w = next;
	}
}

/* ---- Blocking I/O through the backend ------------------------------------ */

struct sync_aio {
	struct qcow2_aio aio;
	int res;
	bool done;
};

static void sync_done(struct qcow2_aio *aio, int res)
{
	struct sync_aio *s = (struct sync_aio *)aio;

	s->res = res;
	s->done = true;
}

static int sync_one(struct qcow2_io *io, enum qcow2_aio_op op, int fd, void *buf,
		    size_t len, uint64_t off)
{
	struct iovec iov = { .iov_base = buf, .iov_len = len };
	struct sync_aio s = {
		.aio = { .op = op, .fd = fd, .iov = &iov, .iovcnt = 1, .off = off,
			 .done = sync_done },
	};
	int ret = io->submit(io, &s.aio);

	if (ret < 0)
		return ret;
	while (!s.done) {
		ret = io->wait(io);
		if (ret < 0 && ret != -EAGAIN)
			return ret;
	}
	return s.res;
}

int qcow2_io_pread(struct qcow2_io *io, int fd, void *buf, size_t len, uint64_t off)
{
	uint8_t *p = buf;

	while (len) {
		int n = sync_one(io, QCOW2_AIO_READ, fd, p, len, off);

		if (n < 0)
			return n;
		if (n == 0) {
			memset(p, 0, len);	/* past the end of the file */
			return 0;
		}
		p += n;
		off += n;
		len -= n;
	}
	return 0;
}

int qcow2_io_pwrite(struct qcow2_io *io, int fd, const void *buf, size_t len, uint64_t off)
{
	const uint8_t *p = buf;

	while (len) {
		int n = sync_one(io, QCOW2_AIO_WRITE, fd, (void *)p, len, off);

		if (n < 0)
			return n;
		if (n == 0)
			return -EIO;
		p += n;
		off += n;
		len -= n;
	}
	return 0;
}

int qcow2_io_fsync(struct qcow2_io *io, int fd)
{
	int ret = sync_one(io, QCOW2_AIO_FSYNC, fd, NULL, 0, 0);

	return ret < 0 ? ret : 0;
}

/* ---- Open and close ------------------------------------------------------ */

static void *alloc_aligned(size_t len)
{
	void *p;

	if (posix_memalign(&p, 4096, len ? len : 1))
		return NULL;
	memset(p, 0, len);
	return p;
}

/* A bitmap of the pieces of a table of @entries: what a flush writes of it. */
static int pieces_init(struct qcow2_pieces *p, uint64_t entries)
{
	p->nr = (entries + QCOW2_PIECE_ENTRIES - 1) / QCOW2_PIECE_ENTRIES;
	p->nr_dirty = 0;
	p->bits = calloc((p->nr + 63) / 64 + 1, 8);
	if (!p->bits) {
		p->nr = 0;
		return -ENOMEM;
	}
	return 0;
}

/* Only the table's nonzero chunks take memory, whatever its size on disk. */
#define LOAD_BUF_BYTES	(64u << 10)
int qcow2_table_load(struct qcow2 *img, uint64_t off, uint64_t entries, struct qcow2_table *t)
{
	uint64_t *buf, done, n;
	int ret;

	ret = qcow2_table_init(t, entries);
	if (ret < 0)
		return ret;
	if (!entries)
		return 0;
	buf = alloc_aligned(LOAD_BUF_BYTES);
	if (!buf)
		return -ENOMEM;
	for (done = 0; done < entries; done += n) {
		n = entries - done < LOAD_BUF_BYTES / 8 ? entries - done : LOAD_BUF_BYTES / 8;
		ret = qcow2_io_pread(img->io, img->fd, buf, (n * 8 + 4095) & ~4095ull,
				     off + done * 8);
		if (ret < 0) {
			ret = qcow2_error(img, ret, "cannot read table at 0x%llx: %s",
					  (unsigned long long)off, strerror(-ret));
			break;
		}
		ret = qcow2_table_load_be(t, done, buf, n);
		if (ret < 0)
			break;
	}
	free(buf);
	return ret;
}

/* Write the header cluster's used part and fdatasync. */
static int write_header(struct qcow2 *img)
{
	uint8_t *buf = alloc_aligned(img->cluster_size);
	int n, ret;

	if (!buf)
		return -ENOMEM;
	n = qcow2_header_serialize(img, buf, img->cluster_size);
	if (n < 0) {
		free(buf);
		return qcow2_error(img, n, "header extensions do not fit in the header cluster");
	}
	ret = qcow2_overlap_check(img, QCOW2_OL_HEADER, 0, (n + 511) & ~511);
	if (ret < 0) {
		free(buf);
		return ret;
	}
	ret = qcow2_io_pwrite(img->io, img->fd, buf, (n + 511) & ~511, 0);
	if (!ret)
		ret = qcow2_io_fsync(img->io, img->fd);
	free(buf);
	if (ret < 0)
		return qcow2_error(img, ret, "cannot write header: %s", strerror(-ret));
	img->header_dirty = false;
	return 0;
}

int qcow2_header_write(struct qcow2 *img)
{
	return write_header(img);
}

static int init_caches(struct qcow2 *img, const struct qcow2_opts *opts)
{
	uint32_t slice = opts->slice_bytes ? opts->slice_bytes : 4096;
	uint64_t l2_bytes = opts->l2_cache_bytes, rc_bytes = opts->refcount_cache_bytes;
	uint64_t nr_l2, nr_rc;
	int ret;

	if (slice > img->cluster_size)
		slice = img->cluster_size;
	if (slice < 512 || (slice & (slice - 1)))
		return qcow2_error(img, -EINVAL, "invalid cache slice size %u", slice);
	if (l2_bytes > QCOW2_MAX_CACHE_BYTES)
		return qcow2_error(img, -EINVAL, "cache size %llu too large (at most %llu)",
				   (unsigned long long)l2_bytes, QCOW2_MAX_CACHE_BYTES);
	if (l2_bytes) {
		/*
		 * A size asked for bounds the metadata memory: what the L1
		 * and refcount tables hold at open (their nonzero chunks)
		 * counts against it, the rest caches L2 slices. Never less
		 * than a quarter of it, though: a few slices would flush for
		 * room every few allocations.
		 */
		uint64_t tables = qcow2_table_bytes(&img->l1) + qcow2_table_bytes(&img->reftable);

		l2_bytes = tables + l2_bytes / 4 < l2_bytes ? l2_bytes - tables : l2_bytes / 4;
	} else {
		/* Enough to map the whole disk, at most 32 MiB (QEMU's default). */
		l2_bytes = ((img->h.size + img->cluster_size - 1) >> img->h.cluster_bits) * 8;
		if (l2_bytes > DEFAULT_L2_CACHE_MAX)
			l2_bytes = DEFAULT_L2_CACHE_MAX;
	}
	if (!rc_bytes)
		rc_bytes = DEFAULT_RC_CACHE;
	nr_l2 = l2_bytes / slice;
	nr_rc = rc_bytes / slice;
	if (nr_l2 < MIN_SLICES)
		nr_l2 = MIN_SLICES;
	if (nr_rc < MIN_SLICES)
		nr_rc = MIN_SLICES;
	if (nr_l2 > (1u << 24) || nr_rc > (1u << 24))
		return qcow2_error(img, -EINVAL, "cache size too large");
	ret = qcow2_cache_init(&img->l2_cache, img, "L2", nr_l2, slice);
	if (ret < 0)
		return ret;
	return qcow2_cache_init(&img->rc_cache, img, "refcount", nr_rc, slice);
}

static void image_free(struct qcow2 *img)
{
	if (img->backing)
		qcow2_close(img->backing);
	if (img->fd >= 0)
		close(img->fd);
	if (img->data_fd >= 0)
		close(img->data_fd);
	qcow2_cache_destroy(&img->l2_cache);
	qcow2_cache_destroy(&img->rc_cache);
	qcow2_flush_free(img);
	qcow2_refcount_free(img);
	qcow2_crypt_free(img);
	qcow2_overlap_free(img);
	if (img->zero_buf)
		munmap(img->zero_buf, 1u << QCOW2_MAX_CLUSTER_BITS);
	qcow2_table_free(&img->l1);
	qcow2_table_free(&img->reftable);
	free(img->l1_pieces.bits);
	free(img->rt_pieces.bits);
	free(img->frees);
	free(img->backing_file);
	free(img->backing_fmt);
	free(img->data_file);
	free(img->unknown_exts);
	free(img->path);
	free(img);
}

/*
 * tmpfs files lack FMODE_NOWAIT, so io_uring would hand every read and write
 * on them to a worker thread; O_NONBLOCK makes it try them inline, where they
 * are a memory copy (the rare one that would block is still punted).
 */
static bool on_tmpfs(int fd)
{
	struct statfs sf;

	return fstatfs(fd, &sf) == 0 && sf.f_type == TMPFS_MAGIC;
}

static void nowait_on_tmpfs(int fd)
{
	int fl;

	if (on_tmpfs(fd)) {
		fl = fcntl(fd, F_GETFL);
		if (fl >= 0)
			(void)fcntl(fd, F_SETFL, fl | O_NONBLOCK);
	}
}

/*
 * A writable data file may not be the image itself: guest writes would
 * land on the metadata (qemu's locks refuse such an image for writing; it
 * reads it).
 */
static int data_file_ready(struct qcow2 *img, int flags)
{
	struct stat a, b;

	if ((flags & O_ACCMODE) != O_RDONLY && fstat(img->fd, &a) == 0 &&
	    fstat(img->data_fd, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino) {
		close(img->data_fd);
		img->data_fd = -1;
		return qcow2_error(img, -EINVAL, "the data file %s is the image itself",
				   img->data_file);
	}
	nowait_on_tmpfs(img->data_fd);
	return 0;
}

/*
 * The external data file: its name as QEMU takes it (relative to the current
 * directory), else relative to the image's directory (a daemon that left its
 * working directory, an image opened from elsewhere).
 */
static int open_data_file(struct qcow2 *img, int flags)
{
	char *path;
	int err;

	if (img->h.nb_snapshots)
		return qcow2_error(img, -EINVAL, "internal snapshots in an image with a data file");
	img->data_fd = open(img->data_file, flags);
	err = img->data_fd >= 0 ? 0 : -errno;
	if (err == -ENOENT && img->data_file[0] != '/') {
		path = qcow2_relative_path(img->path, img->data_file);
		if (!path)
			return -ENOMEM;
		img->data_fd = open(path, flags);
		err = img->data_fd >= 0 ? 0 : -errno;
		free(path);
	}
	if (err)
		return qcow2_error(img, err, "cannot open data file %s: %s", img->data_file,
				   strerror(-err));
	return data_file_ready(img, flags);
}

/* Clear what we cannot keep consistent, repair a dirty image. */
static int open_writable(struct qcow2 *img, const struct qcow2_opts *opts)
{
	uint64_t keep = img->h.autoclear & QCOW2_AUTOCLEAR_DATA_FILE_RAW;
	int ret;

	if (img->h.autoclear != keep) {
		img->h.autoclear = keep;
		ret = write_header(img);
		if (ret < 0)
			return ret;
	}
	if ((img->h.incompatible & QCOW2_INCOMPAT_DIRTY) && !opts->no_repair) {
		struct qcow2_check_result res;

		ret = qcow2_check(img, QCOW2_FIX_LEAKS | QCOW2_FIX_ERRORS, &res, NULL, NULL);
		if (ret < 0)
			return ret;
		if (res.corruptions)
			return qcow2_error(img, -EIO, "dirty image could not be repaired");
		img->h.incompatible &= ~QCOW2_INCOMPAT_DIRTY;
		ret = write_header(img);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* Is @path already in the chain? Then the chain loops. */
static int chain_add(struct qcow2 *img, struct qcow2_chain *chain, const struct stat *st)
{
	unsigned int i;

	for (i = 0; i < chain->n; i++)
		if (chain->dev[i] == st->st_dev && chain->ino[i] == st->st_ino)
			return qcow2_error(img, -ELOOP, "backing chain loops back to this file");
	if (chain->n > QCOW2_MAX_CHAIN)
		return qcow2_error(img, -EMLINK, "backing chain longer than %d images",
				   QCOW2_MAX_CHAIN);
	chain->dev[chain->n] = st->st_dev;
	chain->ino[chain->n] = st->st_ino;
	chain->n++;
	return 0;
}

int qcow2_open(struct qcow2 **out, const char *path, const struct qcow2_opts *opts,
	       struct qcow2_io *io, char *err, size_t errlen)
{
	struct qcow2_chain chain = { .n = 0 };

	return qcow2_open_chain(out, path, opts, io, err, errlen, &chain);
}

int qcow2_open_chain(struct qcow2 **out, const char *path, const struct qcow2_opts *opts,
		     struct qcow2_io *io, char *err, size_t errlen, struct qcow2_chain *chain)
{
	static const struct qcow2_opts defaults;
	struct qcow2 *img = calloc(1, sizeof(*img));
	uint8_t *hbuf = NULL;
	struct stat st;
	size_t hlen;
	int flags, ret;

	if (!opts)
		opts = &defaults;
	if (!img) {
		snprintf(err, errlen, "%s: out of memory", path);
		return -ENOMEM;
	}
	img->io = io;
	img->fd = -1;
	img->data_fd = -1;
	img->read_only = opts->read_only || opts->snapshot;
	img->no_data_file = opts->no_data_file;
	img->path = strdup(path);
	if (!img->path) {
		ret = -ENOMEM;
		goto fail;
	}
	flags = (img->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC | (opts->direct ? O_DIRECT : 0);
	img->fd = open(path, flags);
	if (img->fd < 0) {
		ret = qcow2_error(img, -errno, "cannot open: %s", strerror(errno));
		goto fail;
	}
	if (fstat(img->fd, &st) < 0) {
		ret = qcow2_error(img, -errno, "cannot stat: %s", strerror(errno));
		goto fail;
	}
	nowait_on_tmpfs(img->fd);
	/*
	 * Growing the file ahead (refcount.c) helps O_DIRECT writes; on tmpfs
	 * fallocate takes memory and saves nothing.
	 */
	img->grow_ok = opts->direct && !img->read_only && !on_tmpfs(img->fd);
	img->file_size = st.st_size;
	img->file_end = st.st_size;
	ret = chain_add(img, chain, &st);
	if (ret < 0)
		goto fail;
	if (opts->format && strcmp(opts->format, "qcow2") && strcmp(opts->format, "raw") &&
	    strcmp(opts->format, "probe")) {
		ret = qcow2_error(img, -EINVAL, "unknown format '%s'", opts->format);
		goto fail;
	}
	if (opts->format && !strcmp(opts->format, "raw"))
		goto raw;

	hlen = img->file_size < (1u << QCOW2_MAX_CLUSTER_BITS) ? img->file_size
							       : (1u << QCOW2_MAX_CLUSTER_BITS);
	hbuf = alloc_aligned((hlen + 4095) & ~4095ul);
	if (!hbuf) {
		ret = -ENOMEM;
		goto fail;
	}
	ret = qcow2_io_pread(io, img->fd, hbuf, (hlen + 4095) & ~4095ul, 0);
	if (ret < 0) {
		ret = qcow2_error(img, ret, "cannot read header: %s", strerror(-ret));
		goto fail;
	}
	if (opts->format && !strcmp(opts->format, "probe") &&
	    (hlen < 4 || get_be32(hbuf) != QCOW2_MAGIC)) {
		/* No format named and no qcow2 magic: a raw file. */
		free(hbuf);
		hbuf = NULL;
		goto raw;
	}
	ret = qcow2_header_parse(img, hbuf, hlen, img->file_size);
	if (ret < 0)
		goto fail;
	if (img->snaps_past_eof && !opts->no_repair) {
		/* check -r all rewrites such a table only where its entries read incomplete (v3). */
		ret = qcow2_error(img, -EINVAL, "snapshot table (0x%llx) lies beyond the end of the "
				  "file%s", (unsigned long long)img->h.snapshots_offset,
				  img->h.version >= 3 ? " (repair it with 'check -r all')" : "");
		goto fail;
	}
	ret = qcow2_backing_allowed(img, opts);
	if (ret < 0)
		goto fail;
	if ((img->h.incompatible & QCOW2_INCOMPAT_CORRUPT) && !opts->read_only &&
	    !opts->no_repair) {
		ret = qcow2_error(img, -EROFS,
				  "image is marked corrupt: open it read-only or repair it with 'check -r all'");
		goto fail;
	}
	img->corrupt = img->h.incompatible & QCOW2_INCOMPAT_CORRUPT;
	if (opts->snapshot) {
		ret = qcow2_snapshot_select(img, opts->snapshot);
		if (ret < 0)
			goto fail;
	}
	ret = qcow2_crypt_open(img, opts);
	if (ret < 0)
		goto fail;
	if ((img->h.incompatible & QCOW2_INCOMPAT_DATA_FILE) && !img->no_data_file) {
		ret = open_data_file(img, flags);
		if (ret < 0)
			goto fail;
	}

	ret = qcow2_table_load(img, img->h.l1_table_offset, img->h.l1_size, &img->l1);
	if (ret < 0)
		goto fail;
	ret = qcow2_table_load(img, img->h.refcount_table_offset,
			 ((uint64_t)img->h.refcount_table_clusters * img->cluster_size) / 8,
			 &img->reftable);
	if (ret < 0)
		goto fail;
	ret = pieces_init(&img->l1_pieces, img->l1.nr);
	if (!ret)
		ret = pieces_init(&img->rt_pieces, img->reftable.nr);
	if (ret < 0)
		goto fail;
	ret = init_caches(img, opts);
	if (ret < 0)
		goto fail;
	img->zero_buf = mmap(NULL, 1u << QCOW2_MAX_CLUSTER_BITS, PROT_READ,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (img->zero_buf == MAP_FAILED) {
		img->zero_buf = NULL;
		ret = -ENOMEM;
		goto fail;
	}
	/*
	 * The snapshot table is validated at every open, as QEMU does: a
	 * broken one is an error up front, not at some later command. Where
	 * its L1 tables lie feeds the overlap checks of writes.
	 */
	ret = qcow2_overlap_load(img);
	if (ret < 0)
		goto fail;
	if (!img->read_only) {
		ret = open_writable(img, opts);
		if (ret < 0)
			goto fail;
	}
	ret = qcow2_backing_open(img, opts, chain);
	if (ret < 0)
		goto fail;
	free(hbuf);
	*out = img;
	return 0;

raw:
	if (opts->snapshot) {
		ret = qcow2_error(img, -ENOTSUP, "raw images have no snapshots");
		goto fail;
	}
	img->raw = true;
	/* Whole sectors, as QEMU's raw driver: a partial last one reads as zeros. */
	img->h.size = (img->file_size + 511) & ~511ull;
	*out = img;
	return 0;

fail:
	if (ret == -ENOMEM && !img->errmsg[0])
		qcow2_error(img, ret, "out of memory");
	snprintf(err, errlen, "%s", img->errmsg);
	free(hbuf);
	image_free(img);
	return ret;
}

int qcow2_close(struct qcow2 *img)
{
	int ret = 0;

	if (!img)
		return 0;
	if (!img->read_only && img->raw) {
		/* As QEMU closing a raw image: its data made durable. */
		ret = qcow2_flush(img);
	} else if (!img->read_only) {
		/* A flush applies queued frees at its end: the next one writes them. */
		uint64_t end;
		int i;

		for (i = 0; i < 1000 && !ret; i++) {
			ret = qcow2_flush(img);
			if (!img->rc_cache.nr_dirty && !img->nr_frees && !img->header_dirty)
				break;
		}
		/* Give back what grow_ahead() (refcount.c) reserved and nothing used. */
		end = (img->file_end + img->cluster_size - 1) & ~((uint64_t)img->cluster_size - 1);
		if (img->grow_end > end && ftruncate(img->fd, (off_t)end) < 0 && !ret)
			ret = -errno;
	}
	image_free(img);
	return ret;
}

void qcow2_get_info(const struct qcow2 *img, struct qcow2_info *info)
{
	memset(info, 0, sizeof(*info));
	info->version = img->h.version;
	info->cluster_bits = img->h.cluster_bits;
	info->refcount_bits = img->refcount_bits;
	info->virtual_size = img->h.size;
	info->incompatible = img->h.incompatible;
	info->compatible = img->h.compatible;
	info->autoclear = img->h.autoclear;
	info->l1_size = img->h.l1_size;
	info->nb_snapshots = img->h.nb_snapshots;
	info->lazy_refcounts = img->h.compatible & QCOW2_COMPAT_LAZY_REFCOUNTS;
	info->corrupt = img->corrupt;
	info->dirty = img->h.incompatible & QCOW2_INCOMPAT_DIRTY;
	info->extended_l2 = img->h.incompatible & QCOW2_INCOMPAT_EXTL2;
	info->compression_type = img->h.compression_type;
	info->backing_file = img->backing_file;
	info->backing_fmt = img->backing_fmt;
	info->data_file = img->data_file;
	info->file_size = img->file_size;
	info->raw = img->raw;
	info->filename = img->path;
	info->backing = img->backing;
	info->encrypted = img->crypt != NULL;
}
