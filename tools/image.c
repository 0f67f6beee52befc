// SPDX-License-Identifier: MIT
/*
 * The subcommands' view of an image: qcow2 through the engine's public API
 * or raw through plain file I/O, its backing chain, and block status in
 * qemu-img's terms. The qcow2 format itself stays behind qcow2.h.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "image.h"
#include "util.h"

#define IO_DEPTH	64
#define MAX_CHAIN	64

/* The message of the last failed operation (uq_image_errmsg). */
static char errbuf[512];

int uq_fmt_parse(const char *name, enum uq_fmt *fmt)
{
	if (!strcmp(name, "raw"))
		*fmt = UQ_FMT_RAW;
	else if (!strcmp(name, "qcow2"))
		*fmt = UQ_FMT_QCOW2;
	else
		return -EINVAL;
	return 0;
}

const char *uq_fmt_name(enum uq_fmt fmt)
{
	return fmt == UQ_FMT_QCOW2 ? "qcow2" : "raw";
}

int uq_probe(const char *path, enum uq_fmt *fmt, char *err, size_t errlen)
{
	static const unsigned char qcow2_magic[4] = { 'Q', 'F', 'I', 0xfb };
	unsigned char buf[4];
	ssize_t n;
	int fd, ret;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
		return ret;
	}
	n = pread(fd, buf, sizeof(buf), 0);
	ret = n < 0 ? -errno : 0;
	close(fd);
	if (ret < 0) {
		snprintf(err, errlen, "%s: cannot read: %s", path, strerror(-ret));
		return ret;
	}
	*fmt = n == sizeof(buf) && !memcmp(buf, qcow2_magic, sizeof(buf)) ? UQ_FMT_QCOW2
									  : UQ_FMT_RAW;
	return 0;
}

static int open_raw(struct uq_image *img, char *err, size_t errlen)
{
	off_t end;
	int ret;

	img->fd = open(img->path, (img->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
	if (img->fd < 0) {
		ret = -errno;
		snprintf(err, errlen, "%s: cannot open: %s", img->path, strerror(-ret));
		return ret;
	}
	end = lseek(img->fd, 0, SEEK_END);
	if (end < 0) {
		ret = -errno;
		snprintf(err, errlen, "%s: cannot get the size: %s", img->path, strerror(-ret));
		return ret;
	}
	/* Whole sectors, as QEMU's raw driver: a partial last one reads as zeros. */
	img->size = ((uint64_t)end + 511) & ~511ull;
	return 0;
}

/*
 * QEMU's block status looks for holes in the image file under data
 * clusters only when it takes the image for metadata-preallocated: when
 * clearly more clusters are in use than the file has blocks allocated
 * (qcow2_detect_metadata_preallocation). It counts clusters with a nonzero
 * refcount; every cluster up to the end of the file stands in for that here
 * (the same unless clusters were freed).
 */
static bool looks_preallocated(struct uq_image *img, const struct qcow2_info *info)
{
	uint64_t cs = 1ull << info->cluster_bits, real, threshold, used;
	struct stat st;

	if (fstat(img->fd, &st) < 0)
		return false;
	real = (uint64_t)st.st_blocks * 512 / cs;
	threshold = real * 10 / 9 > real + 2 ? real * 10 / 9 : real + 2;
	used = ((uint64_t)st.st_size + cs - 1) / cs;
	return used >= threshold;
}

/* The snapshot uq_image_open_snapshot has the top level (the next qcow2 open) read. */
static const char *next_snapshot;

static int open_qcow2(struct uq_image *img, unsigned int flags, struct qcow2_io *io,
		      char *err, size_t errlen)
{
	struct qcow2_opts opts = {
		.read_only = img->read_only,
		.no_repair = flags & UQ_OPEN_NO_REPAIR,
		.no_backing = flags & (UQ_OPEN_NO_BACKING | UQ_OPEN_CHAIN),
		.format = "qcow2",
		.snapshot = next_snapshot,
		.no_key = flags & UQ_OPEN_NO_KEY,
		.no_data_file = flags & UQ_OPEN_NO_DATA_FILE,
		.max_backing = uq_max_backing(flags),
	};
	struct qcow2_crypt_info ci;
	struct qcow2_info info;
	int ret;

	next_snapshot = NULL;
	/* Metadata only (info, check): no key needed, none tried. */
	if (!opts.no_key)
		opts.nr_keys = uq_keys_get(&opts.keys);
	img->io = io;
	if (!img->io) {
		img->io = qcow2_uring_new(IO_DEPTH);
		img->own_io = true;
	}
	if (!img->io) {
		snprintf(err, errlen, "%s: cannot set up io_uring", img->path);
		return -ENOMEM;
	}
	ret = qcow2_open(&img->qcow2, img->path, &opts, img->io, err, errlen);
	if (ret < 0)
		return ret;
	/* Only for SEEK_DATA/SEEK_HOLE: block status looks through to the file. */
	img->fd = open(img->path, O_RDONLY | O_CLOEXEC);
	if (img->fd < 0) {
		ret = -errno;
		snprintf(err, errlen, "%s: cannot open: %s", img->path, strerror(-ret));
		return ret;
	}
	qcow2_get_info(img->qcow2, &info);
	img->size = info.virtual_size;
	/*
	 * Encrypted data never looks through to the file in QEMU's block
	 * status: a hole there decrypts to noise, not zeros.
	 */
	img->file_holes = qcow2_get_crypt_info(img->qcow2, &ci) == -ENOENT &&
			  looks_preallocated(img, &info);
	return 0;
}

/* The files of the chain opened so far, top first, to refuse loops. */
struct chain_ids {
	dev_t dev[MAX_CHAIN + 1];
	ino_t ino[MAX_CHAIN + 1];
};

static int open_level(struct uq_image **out, const char *path, const char *fmt_name,
		      unsigned int flags, struct qcow2_io *io, int depth,
		      struct chain_ids *ids, char *err, size_t errlen);

static int open_backing(struct uq_image *img, unsigned int flags, int depth,
			struct chain_ids *ids, char *err, size_t errlen)
{
	struct qcow2_info info;
	char *path, inner[512];
	struct stat st;
	int i, ret;

	qcow2_get_info(img->qcow2, &info);
	if (!info.backing_file)
		return 0;
	if (depth >= MAX_CHAIN) {
		snprintf(err, errlen, "%s: backing chain longer than %d images", img->path,
			 MAX_CHAIN);
		return -EMLINK;
	}
	path = uq_backing_path(img->path, info.backing_file);
	if (!path) {
		snprintf(err, errlen, "%s: out of memory", img->path);
		return -ENOMEM;
	}
	if (fstat(img->fd, &st) == 0) {
		ids->dev[depth] = st.st_dev;
		ids->ino[depth] = st.st_ino;
	}
	if (stat(path, &st) == 0) {
		for (i = 0; i <= depth; i++) {
			if (ids->dev[i] != st.st_dev || ids->ino[i] != st.st_ino)
				continue;
			snprintf(err, errlen, "%s: backing file '%s' makes the chain loop",
				 img->path, info.backing_file);
			free(path);
			return -ELOOP;
		}
	}
	ret = open_level(&img->backing, path, info.backing_fmt,
			 (flags & ~(UQ_OPEN_NO_REPAIR | UQ_OPEN_OVERLAY)) | UQ_OPEN_RDONLY,
			 img->io, depth + 1,
			 ids, inner, sizeof(inner));
	free(path);
	/* Said once, for the image the user named, not once per level. */
	if (ret == -EMLINK)
		snprintf(err, errlen, "%s: backing chain longer than %d images", img->path,
			 MAX_CHAIN);
	else if (ret < 0)
		snprintf(err, errlen, "%s: cannot open backing file: %s", img->path, inner);
	return ret;
}

static int open_level(struct uq_image **out, const char *path, const char *fmt_name,
		      unsigned int flags, struct qcow2_io *io, int depth,
		      struct chain_ids *ids, char *err, size_t errlen)
{
	struct uq_image *img = calloc(1, sizeof(*img));
	int ret;

	if (!img) {
		snprintf(err, errlen, "%s: out of memory", path);
		return -ENOMEM;
	}
	img->fd = -1;
	img->read_only = flags & UQ_OPEN_RDONLY;
	img->path = strdup(path);
	if (!img->path) {
		snprintf(err, errlen, "%s: out of memory", path);
		ret = -ENOMEM;
		goto fail;
	}
	if (fmt_name) {
		ret = uq_fmt_parse(fmt_name, &img->fmt);
		if (ret < 0) {
			snprintf(err, errlen, "%s: unsupported format '%s'", path, fmt_name);
			goto fail;
		}
	} else {
		ret = uq_probe(path, &img->fmt, err, errlen);
		if (ret < 0)
			goto fail;
	}
	if (img->fmt == UQ_FMT_RAW && next_snapshot) {
		snprintf(err, errlen, "%s: raw images have no snapshots", path);
		ret = -ENOTSUP;
	} else if (img->fmt == UQ_FMT_RAW) {
		ret = open_raw(img, err, errlen);
	} else {
		ret = open_qcow2(img, flags, io, err, errlen);
		if (!ret && (flags & UQ_OPEN_CHAIN))
			ret = open_backing(img, flags, depth, ids, err, errlen);
	}
	if (ret < 0)
		goto fail;
	uq_debug("opened %s: %s, %llu bytes, %s, chain depth %d", path, uq_fmt_name(img->fmt),
		 (unsigned long long)img->size, img->read_only ? "read-only" : "read-write", depth);
	*out = img;
	return 0;

fail:
	uq_image_close(img);
	return ret;
}

int uq_image_open(struct uq_image **out, const char *path, const char *fmt,
		  unsigned int flags, char *err, size_t errlen)
{
	struct chain_ids ids = { 0 };

	return open_level(out, path, fmt, flags, NULL, 0, &ids, err, errlen);
}

int uq_image_open_io(struct uq_image **out, const char *path, const char *fmt,
		     unsigned int flags, struct qcow2_io *io, char *err, size_t errlen)
{
	struct chain_ids ids = { 0 };

	return open_level(out, path, fmt, flags, io, 0, &ids, err, errlen);
}

int uq_image_open_snapshot(struct uq_image **out, const char *path, const char *fmt,
			   const char *snapshot, unsigned int flags, struct qcow2_io *io,
			   char *err, size_t errlen)
{
	struct chain_ids ids = { 0 };
	int ret;

	next_snapshot = snapshot;
	ret = open_level(out, path, fmt, flags | UQ_OPEN_RDONLY, io, 0, &ids, err, errlen);
	next_snapshot = NULL;
	return ret;
}

int uq_image_close(struct uq_image *img)
{
	int ret = 0, r;

	if (!img)
		return 0;
	if (img->qcow2)
		ret = qcow2_close(img->qcow2);
	else if (img->fd >= 0 && !img->read_only && fdatasync(img->fd) < 0)
		ret = -errno;
	if (img->fd >= 0)
		close(img->fd);
	/* The backing levels may share the top's io: close them first. */
	r = uq_image_close(img->backing);
	if (img->own_io)
		qcow2_uring_free(img->io);
	free(img->path);
	free(img);
	return ret ? ret : r;
}

const char *uq_image_errmsg(void)
{
	return errbuf;
}

int uq_image_fail(struct uq_image *img, int ret)
{
	if (ret >= 0)
		return ret;
	if (img->qcow2 && qcow2_errmsg(img->qcow2)[0])
		snprintf(errbuf, sizeof(errbuf), "%s", qcow2_errmsg(img->qcow2));
	else
		snprintf(errbuf, sizeof(errbuf), "%s: %s", img->path, strerror(-ret));
	return ret;
}

/* ---- Raw files ------------------------------------------------------------ */

static int raw_check(struct uq_image *img, uint64_t len, uint64_t off)
{
	if (off > img->size || len > img->size - off) {
		snprintf(errbuf, sizeof(errbuf), "%s: request [%llu, +%llu) beyond the size %llu",
			 img->path, (unsigned long long)off, (unsigned long long)len,
			 (unsigned long long)img->size);
		return -EINVAL;
	}
	return 0;
}

static int raw_rw(struct uq_image *img, bool write, void *buf, uint64_t len, uint64_t off)
{
	uint8_t *p = buf;
	int ret = raw_check(img, len, off);

	while (!ret && len) {
		size_t chunk = len > (1u << 30) ? 1u << 30 : len;
		ssize_t n = write ? pwrite(img->fd, p, chunk, off) : pread(img->fd, p, chunk, off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return uq_image_fail(img, -errno);
		if (n == 0) {
			if (write)
				return uq_image_fail(img, -EIO);
			memset(p, 0, len);	/* the file shrank under us */
			return 0;
		}
		p += n;
		off += n;
		len -= n;
	}
	return ret;
}

static int raw_fallocate(struct uq_image *img, int mode, uint64_t len, uint64_t off)
{
	int ret = raw_check(img, len, off);

	if (ret < 0 || !len)
		return ret;
	/*
	 * Zeroing may grow the file over the partial last sector, as QEMU's
	 * does (its zero range keeps no size); punching holes never grows it.
	 */
	if (mode & FALLOC_FL_PUNCH_HOLE)
		mode |= FALLOC_FL_KEEP_SIZE;
	if (fallocate(img->fd, mode, off, len) < 0)
		return uq_image_fail(img, -errno);
	return 0;
}

/* ---- Data I/O ---------------------------------------------------------------- */

int uq_image_pread(struct uq_image *img, void *buf, uint64_t len, uint64_t off)
{
	if (img->qcow2)
		return uq_image_fail(img, qcow2_pread(img->qcow2, buf, len, off));
	return raw_rw(img, false, buf, len, off);
}

int uq_image_pwrite(struct uq_image *img, const void *buf, uint64_t len, uint64_t off)
{
	if (img->qcow2)
		return uq_image_fail(img, qcow2_pwrite(img->qcow2, buf, len, off));
	return raw_rw(img, true, (void *)buf, len, off);
}

int uq_image_write_zeroes(struct uq_image *img, uint64_t len, uint64_t off, bool unmap)
{
	uint8_t *zeros;
	int ret;

	if (img->qcow2)
		return uq_image_fail(img, qcow2_write_zeroes(img->qcow2, len, off, unmap));
	ret = raw_fallocate(img, FALLOC_FL_ZERO_RANGE, len, off);
	if (ret != -EOPNOTSUPP)
		return ret;
	/* No ZERO_RANGE here: write them. */
	zeros = calloc(1, len > (1u << 20) ? 1u << 20 : len);
	if (!zeros)
		return uq_image_fail(img, -ENOMEM);
	for (ret = 0; !ret && len; ) {
		uint64_t n = len > (1u << 20) ? 1u << 20 : len;

		ret = raw_rw(img, true, zeros, n, off);
		off += n;
		len -= n;
	}
	free(zeros);
	return ret;
}

int uq_image_discard(struct uq_image *img, uint64_t len, uint64_t off)
{
	int ret;

	if (img->qcow2)
		return uq_image_fail(img, qcow2_discard(img->qcow2, len, off));
	ret = raw_fallocate(img, FALLOC_FL_PUNCH_HOLE, len, off);
	/* Discard is advisory: a file system without hole punching keeps the data. */
	return ret == -EOPNOTSUPP ? 0 : ret;
}

int uq_image_flush(struct uq_image *img)
{
	if (img->qcow2)
		return uq_image_fail(img, qcow2_flush(img->qcow2));
	if (!img->read_only && fdatasync(img->fd) < 0)
		return uq_image_fail(img, -errno);
	return 0;
}

/* ---- Block status -------------------------------------------------------------- */

/*
 * Whether the file has data at @off and for how long (at most @len), as
 * SEEK_DATA/SEEK_HOLE tell; past the end of the file is a hole. Without
 * hole support everything is data.
 */
static void file_run(int fd, uint64_t off, uint64_t len, bool *data, uint64_t *run)
{
	off_t d = lseek(fd, off, SEEK_DATA), h;

	*data = true;
	*run = len;
	if (d < 0) {
		if (errno == ENXIO)
			*data = false;
		return;
	}
	if ((uint64_t)d > off) {
		*data = false;
		if ((uint64_t)d - off < len)
			*run = d - off;
		return;
	}
	h = lseek(fd, off, SEEK_HOLE);
	if (h > 0 && (uint64_t)h > off && (uint64_t)h - off < len)
		*run = h - off;
}

/* Status of one level, without looking at its backing file. */
static int level_status(struct uq_image *img, uint64_t off, uint64_t len, struct uq_status *st)
{
	struct qcow2_extent ext;
	bool file_data;
	int ret;

	memset(st, 0, sizeof(*st));
	st->img = img;
	if (img->fmt == UQ_FMT_RAW) {
		file_run(img->fd, off, len, &file_data, &st->len);
		st->present = true;
		st->data = file_data;
		st->zero = !file_data;
		st->has_offset = true;
		st->offset = off;
		return 0;
	}
	ret = qcow2_map(img->qcow2, off, len, &ext);
	if (ret < 0)
		return uq_image_fail(img, ret);
	st->len = ext.len;
	switch (ext.type) {
	case QCOW2_EXTENT_UNALLOCATED:
		/* A subcluster not in use in an allocated cluster keeps its offset. */
		st->has_offset = ext.has_host;
		st->offset = ext.host_off;
		break;
	case QCOW2_EXTENT_ZERO:
		st->present = true;
		st->zero = true;
		/* Preallocated zero clusters keep their host offset. */
		st->has_offset = ext.has_host;
		st->offset = ext.host_off;
		break;
	case QCOW2_EXTENT_DATA:
		st->present = true;
		st->data = true;
		st->has_offset = true;
		st->offset = ext.host_off;
		if (img->file_holes) {
			file_run(img->fd, ext.host_off, ext.len, &file_data, &st->len);
			st->zero = !file_data;
		}
		break;
	case QCOW2_EXTENT_COMPRESSED:
		st->present = true;
		st->data = true;
		break;
	}
	/* QEMU gives no host offsets of encrypted images (the file holds ciphertext). */
	if (st->has_offset) {
		struct qcow2_info info;

		qcow2_get_info(img->qcow2, &info);
		st->has_offset = !info.encrypted;
	}
	return 0;
}

int uq_image_status(struct uq_image *img, uint64_t off, uint64_t len, struct uq_status *st)
{
	unsigned int depth;
	int ret;

	for (depth = 0;; depth++) {
		struct qcow2_info info;

		if (len > img->size - off)
			len = img->size - off;
		ret = level_status(img, off, len, st);
		if (ret < 0)
			return ret;
		st->depth = depth;
		if (st->present)
			return 0;
		qcow2_get_info(img->qcow2, &info);
		if (!info.backing_file) {
			st->zero = true;
			return 0;
		}
		/* Not opened: unknown contents, neither zero nor data. */
		if (!img->backing)
			return 0;
		if (off >= img->backing->size) {
			st->zero = true;
			return 0;
		}
		len = st->len;
		img = img->backing;
	}
}

int uq_status_read(const struct uq_status *st, void *buf, uint64_t off)
{
	if (st->data && !st->zero)
		return uq_image_pread(st->img, buf, st->len, off);
	memset(buf, 0, st->len);
	return 0;
}

/* ---- Secrets ------------------------------------------------------------------ */

#define MAX_SECRETS	16
#define MAX_SECRET_BYTES (64u << 10)

struct secret {
	char *id;
	char *data;
	size_t len;
};

static struct secret secrets[MAX_SECRETS];
static unsigned int nr_secrets;
static struct secret key_opts[MAX_SECRETS];	/* --key-secret / --key-file, in order */
static unsigned int nr_key_opts;

/* Read a whole (small) file, as QEMU's secret file= does: bytes as they are. */
static int read_secret_file(const char *path, struct secret *s)
{
	char *buf = malloc(MAX_SECRET_BYTES + 1);
	size_t len = 0;
	ssize_t n;
	int fd, ret = 0;

	if (!buf)
		return -ENOMEM;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		uq_err("%s: cannot open key file: %s", path, strerror(-ret));
		free(buf);
		return ret;
	}
	while ((n = read(fd, buf + len, MAX_SECRET_BYTES + 1 - len)) > 0)
		len += n;
	if (n < 0)
		ret = -errno;
	close(fd);
	if (!ret && len > MAX_SECRET_BYTES)
		ret = -EFBIG;
	if (ret < 0) {
		uq_err("%s: cannot read key file: %s", path, strerror(-ret));
		free(buf);
		return ret;
	}
	buf[len] = '\0';
	free(s->data);
	s->data = buf;
	s->len = len;
	return 0;
}

static int set_data(struct secret *s, const char *data)
{
	free(s->data);
	s->data = strdup(data);
	s->len = s->data ? strlen(data) : 0;
	return s->data ? 0 : -ENOMEM;
}

struct object_ctx {
	const char *spec;
	bool secret;
	const char *id, *data, *file;
};

static int object_pair(void *opaque, const char *key, const char *val)
{
	struct object_ctx *o = opaque;

	if (!val && !*key) {
		/* "secret,id=x," as qemu-img's --object takes it */
	} else if (!val && !strcmp(key, "secret")) {
		o->secret = true;
	} else if (val && !strcmp(key, "qom-type")) {
		o->secret = !strcmp(val, "secret");
	} else if (val && !strcmp(key, "id")) {
		o->id = val;
	} else if (val && !strcmp(key, "data")) {
		o->data = val;
	} else if (val && !strcmp(key, "file")) {
		o->file = val;
	} else if (val && !strcmp(key, "format") && !strcmp(val, "raw")) {
		/* the default */
	} else {
		uq_err("--object %s: unsupported property '%s'", o->spec, key);
		return -EINVAL;
	}
	return 0;
}

static int add_object(const char *arg)
{
	struct object_ctx o = { .spec = arg };
	char *copy = strdup(arg);
	struct secret *s;
	int ret;

	if (!copy)
		return -ENOMEM;
	ret = uq_parse_opts(copy, object_pair, &o);
	if (ret)
		goto out;
	ret = -EINVAL;
	if (!o.secret) {
		uq_err("--object %s: only 'secret' objects are supported", arg);
		goto out;
	}
	if (!o.id || !!o.data == !!o.file) {
		uq_err("--object %s: a secret needs id= and one of data= or file=", arg);
		goto out;
	}
	if (nr_secrets == MAX_SECRETS) {
		uq_err("--object %s: too many secrets", arg);
		goto out;
	}
	s = &secrets[nr_secrets];
	s->id = strdup(o.id);
	ret = s->id ? 0 : -ENOMEM;
	if (!ret)
		ret = o.data ? set_data(s, o.data) : read_secret_file(o.file, s);
	if (ret < 0) {
		free(s->id);
		s->id = NULL;
		goto out;
	}
	nr_secrets++;
out:
	free(copy);
	return ret;
}

/* Take --key-secret or --key-file. 0, or -errno with one error line printed. */
static int key_option(int opt, const char *arg)
{
	struct secret *s;
	int ret;

	if (nr_key_opts == MAX_SECRETS) {
		uq_err("more than %d --key-secret/--key-file options", MAX_SECRETS);
		return -EINVAL;
	}
	s = &key_opts[nr_key_opts];
	if (opt == UQ_OPT_KEY_FILE) {
		ret = read_secret_file(arg, s);
	} else {
		ret = set_data(s, arg);
		if (ret < 0)
			uq_err("out of memory");
	}
	if (!ret)
		nr_key_opts++;
	return ret;
}

bool uq_no_backing;

int uq_getopt(int argc, char **argv, const char *shortopts, const struct option *longopts)
{
	int opt, ret;

	for (;;) {
		opt = getopt_long(argc, argv, shortopts, longopts, NULL);
		switch (opt) {
		case UQ_OPT_OBJECT:
			ret = add_object(optarg);
			break;
		case UQ_OPT_KEY_SECRET:
		case UQ_OPT_KEY_FILE:
			ret = key_option(opt, optarg);
			break;
		case UQ_OPT_NO_BACKING:
			uq_no_backing = true;
			ret = 0;
			break;
		default:
			return opt;
		}
		if (ret < 0)
			return UQ_OPT_FAILED;
	}
}

unsigned int uq_keys_get(const struct qcow2_key **keys)
{
	static struct qcow2_key list[MAX_SECRETS];
	const struct secret *from = nr_key_opts ? key_opts : secrets;
	unsigned int i, n = nr_key_opts ? nr_key_opts : nr_secrets;

	for (i = 0; i < n; i++)
		list[i] = (struct qcow2_key){ .data = from[i].data, .len = from[i].len };
	*keys = list;
	return n;
}

const char *uq_secret_lookup(const char *id, size_t *len)
{
	unsigned int i;

	for (i = 0; i < nr_secrets; i++) {
		if (!strcmp(secrets[i].id, id)) {
			*len = secrets[i].len;
			return secrets[i].data;
		}
	}
	return NULL;
}
