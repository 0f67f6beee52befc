// SPDX-License-Identifier: MIT
/*
 * convert: copy what an image (through its backing chain) shows into a new
 * raw or qcow2 image. Block status decides what is read: unallocated and
 * zero runs are skipped, and so are all-zero blocks of the data read, so
 * the copy stays sparse. With -c the qcow2 target gets compressed clusters,
 * written one cluster at a time.
 */
#include <errno.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cmds.h"
#include "util.h"

#define CHUNK_BYTES	(2u << 20)
#define NR_SLOTS	8
#define ZERO_BLOCK	4096u		/* qemu-img convert's default -S */

static void convert_usage(void)
{
	printf(
		"usage: " UQ_PROG " convert [-p] [-q] [-f FMT] [-O raw|qcow2] [-o OPT=VAL,...]\n"
		"                   [-c] [-l SNAPSHOT_PARAM | -s SNAPSHOT] [--no-backing] SRC DST\n"
		"\n"
		"Copy SRC (with its backing chain) into DST, created anew (an existing\n"
		"file is truncated). Unallocated and zero ranges are not written.\n"
		"\n"
		"  -f FMT          SRC's format: qcow2 or raw (default: detected)\n"
		"  -O FMT          DST's format: raw (default) or qcow2\n"
		"  -o OPTIONS      creation options for DST, as for create\n"
		"  -l PARAM        copy SRC's internal snapshot: snapshot.name=NAME,\n"
		"                  snapshot.id=ID or NAME, as qemu-img\n"
		"  -s SNAPSHOT     copy SRC's internal snapshot SNAPSHOT (id or name)\n"
		"  -c              compress DST's clusters (qcow2 only)\n"
		"  -p              show progress on stderr\n"
		"  -q              quiet\n"
		UQ_KEY_HELP
		UQ_NO_BACKING_HELP
		"  -h, --help      show this help\n");
}

enum slot_state {
	SLOT_FREE,
	SLOT_READING,
	SLOT_READY,			/* data in @buf, some left to write */
	SLOT_WRITING,
};

/* One chunk on its way: read from the source, then written in runs. */
struct slot {
	enum slot_state state;
	uint8_t *buf;
	uint64_t off, len;		/* the guest range in @buf */
	uint64_t pos;			/* next guest byte to consider writing */
	struct uq_image *img;		/* the image @req runs on */
	struct qcow2_req *req;		/* NULL for raw files, done at once */
	bool done;
	int res;
};

struct convert {
	struct uq_image *src, *dst;
	struct qcow2_io *io;		/* shared by source and target */
	struct slot slots[NR_SLOTS];
	uint64_t off;			/* next source byte to look at */
	struct uq_status st;		/* the source run [st_off, st_off + st.len) */
	uint64_t st_off;
	uint32_t zero_block;		/* skip all-zero blocks of this size */
	struct uq_progress progress;
};

static void slot_done(struct qcow2_req *req, int res, void *priv)
{
	struct slot *s = priv;

	(void)req;
	s->res = res;
	s->done = true;
}

/* Start @op for @s on @img (raw files complete before this returns). 0 or -errno. */
static int slot_submit(struct slot *s, enum slot_state state, struct uq_image *img,
		       enum qcow2_op op, uint8_t *buf, uint64_t len, uint64_t off)
{
	s->img = img;
	s->done = false;
	if (!img->qcow2) {
		s->res = op == QCOW2_OP_READ ? uq_image_pread(img, buf, len, off)
					     : uq_image_pwrite(img, buf, len, off);
		s->done = true;
	} else {
		s->req = qcow2_req_new(img->qcow2);
		if (!s->req)
			return uq_image_fail(img, -ENOMEM);
		qcow2_req_submit(s->req, op, off, len, buf, slot_done, s);
	}
	s->state = state;
	return 0;
}

static bool all_zero(const uint8_t *p, size_t len)
{
	return !p[0] && !memcmp(p, p + 1, len - 1);
}

static uint64_t block_end(const struct convert *cv, const struct slot *s, uint64_t pos)
{
	uint64_t next = (pos / cv->zero_block + 1) * cv->zero_block;

	return next < s->off + s->len ? next : s->off + s->len;
}

static bool block_zero(const struct convert *cv, const struct slot *s, uint64_t pos)
{
	return all_zero(s->buf + (pos - s->off), block_end(cv, s, pos) - pos);
}

/* The next run [*start, *end) of blocks of @s that are not all zeros. */
static bool next_run(const struct convert *cv, struct slot *s, uint64_t *start, uint64_t *end)
{
	uint64_t pos = s->pos, stop = s->off + s->len;

	while (pos < stop && block_zero(cv, s, pos))
		pos = block_end(cv, s, pos);
	*start = pos;
	while (pos < stop && !block_zero(cv, s, pos))
		pos = block_end(cv, s, pos);
	*end = s->pos = pos;
	return *start < *end;
}

/*
 * Whether a slot holds source bytes before @s's still unwritten. Writes go
 * in guest order, as qemu-img convert's (without -W): the target's clusters
 * are then allocated in that order too, and its map reads as qemu-img's.
 */
static bool earlier_pending(const struct convert *cv, const struct slot *s)
{
	int i;

	for (i = 0; i < NR_SLOTS; i++)
		if (cv->slots[i].state != SLOT_FREE && cv->slots[i].off < s->off)
			return true;
	return false;
}

/* Move @s on as far as it goes without waiting; *@moved if it did. 0 or -errno. */
static int slot_advance(struct convert *cv, struct slot *s, bool *moved)
{
	uint64_t start, end;
	int ret;

	for (;;) {
		switch (s->state) {
		case SLOT_FREE:
			return 0;
		case SLOT_READING:
		case SLOT_WRITING:
			if (!s->done)
				return 0;
			*moved = true;
			qcow2_req_free(s->req);
			s->req = NULL;
			if (s->res < 0)
				return uq_image_fail(s->img, s->res);
			s->state = SLOT_READY;
			break;
		case SLOT_READY:
			if (earlier_pending(cv, s))
				return 0;
			if (!next_run(cv, s, &start, &end)) {
				s->state = SLOT_FREE;
				return 0;
			}
			ret = slot_submit(s, SLOT_WRITING, cv->dst, QCOW2_OP_WRITE,
					  s->buf + (start - s->off), end - start, start);
			if (ret < 0)
				return ret;
			break;
		}
	}
}

/*
 * Fill free slots with the next data the source shows, a chunk each; zero
 * and unallocated runs are skipped here. A run is asked for as a whole and
 * cut into chunks: a status query may cost as much as the run is long
 * (SEEK_HOLE on tmpfs). 0 or -errno.
 */
static int fill_slots(struct convert *cv, bool *moved)
{
	uint64_t size = cv->src->size;
	int i, ret;

	for (i = 0; i < NR_SLOTS && cv->off < size; i++) {
		struct slot *s = &cv->slots[i];

		while (s->state == SLOT_FREE && cv->off < size) {
			uint64_t end = (cv->off / CHUNK_BYTES + 1) * CHUNK_BYTES;

			if (cv->off >= cv->st_off + cv->st.len) {
				cv->st_off = cv->off;
				ret = uq_image_status(cv->src, cv->off, size - cv->off, &cv->st);
				if (ret < 0)
					return ret;
			}
			if (end > cv->st_off + cv->st.len)
				end = cv->st_off + cv->st.len;
			if (cv->st.data && !cv->st.zero) {
				uint64_t len = end - cv->off;

				s->off = s->pos = cv->off;
				/* The target is whole sectors (encrypted ones need them):
				 * a source ending mid-sector is written zero-padded. */
				s->len = (len + 511) & ~511ull;
				memset(s->buf + len, 0, s->len - len);
				ret = slot_submit(s, SLOT_READING, cv->st.img, QCOW2_OP_READ,
						  s->buf, len, s->off);
				if (ret < 0)
					return ret;
			}
			cv->off = end;
			*moved = true;
			uq_progress_update(&cv->progress, cv->off, size);
		}
	}
	return 0;
}

/* Wait for the requests still in flight, after a failure. */
static void drain(struct convert *cv)
{
	int i;

	for (i = 0; i < NR_SLOTS; i++) {
		struct slot *s = &cv->slots[i];

		while (s->req && !s->done)
			if (cv->io->wait(cv->io) < 0)
				return;		/* the requests cannot be freed: leak them */
		qcow2_req_free(s->req);
		s->req = NULL;
	}
}

/*
 * Copy with up to NR_SLOTS chunks in flight: source reads and target writes
 * overlap through the one io_uring both images share.
 */
static int copy(struct convert *cv)
{
	bool moved, busy;
	int i, ret;

	uq_progress_update(&cv->progress, 0, cv->src->size);
	for (;;) {
		moved = busy = false;
		for (i = 0; i < NR_SLOTS; i++) {
			ret = slot_advance(cv, &cv->slots[i], &moved);
			if (ret < 0)
				goto fail;
		}
		ret = fill_slots(cv, &moved);
		if (ret < 0)
			goto fail;
		for (i = 0; i < NR_SLOTS; i++)
			busy |= cv->slots[i].state != SLOT_FREE;
		if (!busy)
			break;
		if (moved)
			continue;
		ret = cv->io->wait(cv->io);
		if (ret == -EAGAIN)
			ret = uq_image_fail(cv->dst, -EIO);	/* nothing in flight: stalled */
		if (ret < 0)
			goto fail;
	}
	uq_progress_done(&cv->progress);
	return uq_image_flush(cv->dst);

fail:
	drain(cv);
	return ret;
}

/* Read the source's [@off, @end) through block status: levels or zeros. 0 or -errno. */
static int read_range(struct convert *cv, uint8_t *buf, uint64_t off, uint64_t end)
{
	struct uq_status st;
	uint64_t pos;
	int ret;

	for (pos = off; pos < end; pos += st.len) {
		ret = uq_image_status(cv->src, pos, end - pos, &st);
		if (ret < 0)
			return ret;
		ret = uq_status_read(&st, buf + (pos - off), pos);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/*
 * convert -c: cluster by cluster, in order, as qemu-img convert -c writes
 * them: clusters that read as zeros stay unallocated, the others go through
 * the engine's compressed write (which stores a cluster that does not
 * compress as it is).
 */
static int copy_compressed(struct convert *cv)
{
	uint64_t size = cv->src->size, cs, off, end, dst_end, src_end;
	struct qcow2 *q = cv->dst->qcow2;
	uint8_t *buf = cv->slots[0].buf;
	struct qcow2_info info;
	struct uq_status st;
	int ret;

	qcow2_get_info(q, &info);
	cs = 1ull << info.cluster_bits;

	uq_progress_update(&cv->progress, 0, size);
	for (off = 0; off < size; off = end) {
		end = off + cs < size ? off + cs : size;
		ret = uq_image_status(cv->src, off, size - off, &st);
		if (ret < 0)
			return ret;
		if ((!st.data || st.zero) && off + st.len >= end) {
			/* Skip every whole cluster the zero run covers. */
			end = off + st.len >= size ? size : (off + st.len) & ~(cs - 1);
			continue;
		}
		/* The target's size is the source's rounded up to a sector. */
		src_end = end;
		dst_end = off + cs < cv->dst->size ? off + cs : cv->dst->size;
		memset(buf + (src_end - off), 0, dst_end - src_end);
		ret = read_range(cv, buf, off, src_end);
		if (ret < 0)
			return ret;
		uq_progress_update(&cv->progress, end, size);
		if (all_zero(buf, dst_end - off))
			continue;
		ret = qcow2_pwrite_compressed(q, buf, dst_end - off, off);
		if (ret < 0)
			return uq_image_fail(cv->dst, ret);
	}
	ret = qcow2_pwrite_compressed(q, NULL, 0, 0);
	if (ret < 0)
		return uq_image_fail(cv->dst, ret);
	uq_progress_done(&cv->progress);
	return uq_image_flush(cv->dst);
}

/* Whether @path is the file @st describes. */
static bool same_file(const char *path, const struct stat *st)
{
	struct stat s;

	return stat(path, &s) == 0 && s.st_dev == st->st_dev && s.st_ino == st->st_ino;
}

/*
 * The file of the source chain (an image, a backing file, a data file)
 * that @path names, or NULL. Creating the target over one of them would
 * destroy the data being copied; qemu-img's image locks refuse it too.
 */
static const char *source_file_at(struct uq_image *src, const char *path)
{
	struct uq_image *img;
	struct stat st;

	for (img = src; img; img = img->backing) {
		struct qcow2_info info;
		char *rel;
		bool hit;

		if (fstat(img->fd, &st) == 0 && same_file(path, &st))
			return img->path;
		if (!img->qcow2)
			continue;
		qcow2_get_info(img->qcow2, &info);
		if (!info.data_file || stat(path, &st) < 0)
			continue;
		/* The engine's two places for it: the current directory, the image's. */
		rel = uq_backing_path(img->path, info.data_file);
		hit = same_file(info.data_file, &st) || (rel && same_file(rel, &st));
		free(rel);
		if (hit)
			return info.data_file;
	}
	return NULL;
}

int cmd_convert(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		UQ_KEY_LONGOPTS,
		UQ_NO_BACKING_LONGOPT,
		{ NULL, 0, NULL, 0 },
	};
	struct convert cv = { .progress.last = -1 };
	struct uq_create c = { .fmt = UQ_FMT_RAW };
	const char *src_fmt = NULL, *dst_fmt = "raw", *src_path, *dst_path, *snapshot = NULL;
	bool compress = false, existed;
	char *lists[16], err[512];
	uint8_t *bufs;
	int nr_lists = 0, i, opt, ret, status = 1;
	struct stat sb;

	while ((opt = uq_getopt(argc, argv, ":f:O:o:l:s:cpqh", longopts)) != -1) {
		switch (opt) {
		case 'f':
			src_fmt = optarg;
			break;
		case 'O':
			dst_fmt = optarg;
			break;
		case 'o':
			if (nr_lists == (int)(sizeof(lists) / sizeof(lists[0]))) {
				uq_err("convert: too many -o options");
				return 1;
			}
			lists[nr_lists++] = optarg;
			break;
		case 'c':
			compress = true;
			break;
		case 'l':
		case 's':
			/* qemu-img's -l snapshot.name=/snapshot.id=, or a bare id or name. */
			snapshot = optarg;
			if (opt == 'l' && !strncmp(optarg, "snapshot.name=", 14))
				snapshot = optarg + 14;
			else if (opt == 'l' && !strncmp(optarg, "snapshot.id=", 12))
				snapshot = optarg + 12;
			if (strchr(snapshot, ',')) {
				uq_err("convert: one of snapshot.name or snapshot.id only");
				return 1;
			}
			break;
		case 'p':
			cv.progress.on = true;
			break;
		case 'q':
			cv.progress.on = false;
			break;
		case UQ_OPT_FAILED:
			return 1;
		case 'h':
			convert_usage();
			return 0;
		default:
			return uq_usage_error("convert", argv, opt);
		}
	}
	if (argc - optind != 2)
		return uq_usage_args("convert", "SRC and DST");
	src_path = argv[optind];
	dst_path = argv[optind + 1];
	if (uq_fmt_parse(dst_fmt, &c.fmt) < 0) {
		uq_err("%s: unsupported format '%s' (use raw or qcow2)", dst_path, dst_fmt);
		return 1;
	}
	for (i = 0; i < nr_lists; i++) {
		ret = uq_create_parse(&c, dst_path, lists[i]);
		if (ret)
			return ret > 0 ? 0 : 1;
	}
	if (compress && c.fmt != UQ_FMT_QCOW2) {
		uq_err("%s: compression is only supported for qcow2 targets", dst_path);
		return 1;
	}
	if (compress && c.enc.format) {
		uq_err("%s: compression and encryption cannot be used together", dst_path);
		return 1;
	}
	if (compress && c.o.prealloc != QCOW2_PREALLOC_OFF) {
		uq_err("%s: compression and preallocation cannot be used together", dst_path);
		return 1;
	}
	if (c.o.backing_file) {
		uq_err("%s: convert does not give the new image a backing file", dst_path);
		return 1;
	}

	cv.io = qcow2_uring_new(64);
	if (!cv.io) {
		uq_err("%s: cannot set up io_uring", src_path);
		return 1;
	}
	if (snapshot)
		ret = uq_image_open_snapshot(&cv.src, src_path, src_fmt, snapshot,
					     UQ_OPEN_CHAIN, cv.io, err, sizeof(err));
	else
		ret = uq_image_open_io(&cv.src, src_path, src_fmt, UQ_OPEN_RDONLY | UQ_OPEN_CHAIN,
				       cv.io, err, sizeof(err));
	if (ret < 0) {
		uq_err("%s", err);
		goto out_io;
	}
	c.o.size = cv.src->size;
	c.size_set = true;
	for (i = 0; i < 2; i++) {
		const char *t = i ? c.o.data_file : dst_path, *hit = t ? source_file_at(cv.src, t) : NULL;

		if (hit) {
			uq_err("%s: cannot overwrite %s: the source reads it", dst_path, hit);
			goto out_src;
		}
	}
	existed = stat(dst_path, &sb) == 0;
	if (uq_create_image(dst_path, &c) < 0)
		goto out_src;
	ret = uq_image_open_io(&cv.dst, dst_path, uq_fmt_name(c.fmt), UQ_OPEN_NO_BACKING, cv.io,
			       err, sizeof(err));
	if (ret < 0) {
		uq_err("%s", err);
		goto out_remove;
	}
	/* A qcow2 target allocates whole clusters: only skip whole zero clusters. */
	cv.zero_block = ZERO_BLOCK;
	if (cv.dst->qcow2) {
		struct qcow2_info info;

		qcow2_get_info(cv.dst->qcow2, &info);
		if ((1u << info.cluster_bits) > ZERO_BLOCK)
			cv.zero_block = 1u << info.cluster_bits;
	}
	if (posix_memalign((void **)&bufs, 4096, (size_t)NR_SLOTS * CHUNK_BYTES)) {
		uq_err("%s: out of memory", dst_path);
		goto out_dst;
	}
	for (i = 0; i < NR_SLOTS; i++)
		cv.slots[i].buf = bufs + (size_t)i * CHUNK_BYTES;
	ret = compress ? copy_compressed(&cv) : copy(&cv);
	if (ret < 0)
		uq_err("%s", uq_image_errmsg());
	else
		status = 0;
	free(bufs);
out_dst:
	ret = uq_image_close(cv.dst);
	if (ret < 0 && !status) {
		uq_err("%s: cannot write back: %s", dst_path, strerror(-ret));
		status = 1;
	}
out_remove:
	if (status && !existed)
		unlink(dst_path);
out_src:
	uq_image_close(cv.src);
out_io:
	qcow2_uring_free(cv.io);
	return status;
}
