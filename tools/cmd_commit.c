// SPDX-License-Identifier: MIT
/*
 * commit: write what a qcow2 image holds into its backing file (qcow2 or
 * raw), or into a deeper image of its chain with -b, then empty the image as
 * qemu-img commit does. Which ranges an image holds is block status through
 * the chain; the data is read level by level and written through the base's
 * own read-write open.
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

static void commit_usage(void)
{
	printf(
		"usage: " UQ_PROG " commit [-f qcow2] [-p] [-q] [-d] [-b BASE] [--key-secret PW]... IMAGE\n"
		"\n"
		"Write what IMAGE holds into its backing file, then empty IMAGE (its content\n"
		"stays the same through the chain). A raw backing file smaller than IMAGE\n"
		"grows to IMAGE's size.\n"
		"\n"
		"  -b BASE     commit into BASE, an image deeper in IMAGE's backing chain:\n"
		"              every image above BASE is written into it (implies -d)\n"
		"  -d          leave IMAGE as it is (not emptied)\n"
		"  -f qcow2    IMAGE's format\n"
		"  -p          show progress on stderr\n"
		"  -q          quiet\n"
		UQ_KEY_HELP
		"  -h, --help  show this help\n");
}

struct commit {
	const char *path;
	const char *base_arg;		/* -b, or NULL */
	bool keep;			/* -d */
	struct uq_image *chain;		/* IMAGE, read-only, each level opened (status) */
	struct uq_image *base;		/* read-write */
	unsigned int base_depth;	/* its level in @chain (1: the backing file) */
	struct uq_progress progress;	/* -p: through the guest range copied down */
};

/* Find the base in the chain: the backing file, or the level that is -b's file. */
static int find_base(struct commit *c, struct uq_image **out)
{
	struct uq_image *lvl;
	struct stat want, st;
	unsigned int depth;

	if (!c->chain->backing) {
		uq_err("%s: image does not have a backing file", c->path);
		return -ENOENT;
	}
	if (!c->base_arg) {
		c->base_depth = 1;
		*out = c->chain->backing;
		return 0;
	}
	if (stat(c->base_arg, &want) < 0) {
		int ret = -errno;

		uq_err("%s: cannot open: %s", c->base_arg, strerror(-ret));
		return ret;
	}
	for (lvl = c->chain->backing, depth = 1; lvl; lvl = lvl->backing, depth++) {
		if (!stat(lvl->path, &st) && st.st_dev == want.st_dev && st.st_ino == want.st_ino) {
			c->base_depth = depth;
			*out = lvl;
			return 0;
		}
	}
	uq_err("%s: '%s' is not in the backing chain of this image", c->path, c->base_arg);
	return -ENOENT;
}

/* Open the base read-write (its own chain too), grown to IMAGE's size if raw. */
static int open_base(struct commit *c)
{
	struct uq_image *lvl = NULL;
	char err[512];
	int ret;

	ret = find_base(c, &lvl);
	if (ret < 0)
		return ret;
	ret = uq_image_open(&c->base, lvl->path, uq_fmt_name(lvl->fmt), 0, err, sizeof(err));
	if (ret < 0) {
		uq_err("%s", err);
		return ret;
	}
	if (c->base->size >= c->chain->size)
		return 0;
	if (c->base->fmt != UQ_FMT_RAW) {
		uq_err("%s: smaller than '%s' (%llu < %llu bytes): "
		       "growing a qcow2 base is not supported",
		       c->base->path, c->path, (unsigned long long)c->base->size,
		       (unsigned long long)c->chain->size);
		return -ENOTSUP;
	}
	if (ftruncate(c->base->fd, c->chain->size) < 0) {
		ret = -errno;
		uq_err("%s: cannot grow to %llu bytes: %s", c->base->path,
		       (unsigned long long)c->chain->size, strerror(-ret));
		return ret;
	}
	c->base->size = c->chain->size;
	return 0;
}

/* Write every range some image above the base holds into the base. */
static int copy_down(struct commit *c)
{
	uint8_t *buf = malloc(CHUNK_BYTES);
	struct uq_status st;
	uint64_t off, len;
	int ret = 0;

	if (!buf) {
		uq_err("%s: out of memory", c->path);
		return -ENOMEM;
	}
	for (off = 0; off < c->chain->size; off += st.len) {
		uq_progress_update(&c->progress, off, c->chain->size);
		len = c->chain->size - off < CHUNK_BYTES ? c->chain->size - off : CHUNK_BYTES;
		ret = uq_image_status(c->chain, off, len, &st);
		if (ret < 0)
			break;
		if (!st.present || st.depth >= c->base_depth)
			continue;
		if (st.zero && !st.data) {
			ret = uq_image_write_zeroes(c->base, st.len, off, true);
		} else {
			ret = uq_status_read(&st, buf, off);
			if (!ret)
				ret = uq_image_pwrite(c->base, buf, st.len, off);
		}
		if (ret < 0)
			break;
	}
	if (!ret)
		ret = uq_image_flush(c->base);
	if (ret < 0)
		uq_err("%s", uq_image_errmsg());
	free(buf);
	return ret;
}

/* What qemu-img commit leaves: an image whose every cluster shows the backing file. */
static int empty_image(struct commit *c)
{
	struct uq_image *img;
	char err[512];
	int ret;

	ret = uq_image_open(&img, c->path, "qcow2", UQ_OPEN_NO_BACKING, err, sizeof(err));
	if (ret < 0) {
		uq_err("%s", err);
		return ret;
	}
	ret = qcow2_make_empty(img->qcow2);
	if (ret < 0)
		uq_err("%s", qcow2_errmsg(img->qcow2));
	if (uq_image_close(img) < 0 && !ret) {
		uq_err("%s: cannot close: %s", c->path, uq_image_errmsg());
		ret = -EIO;
	}
	return ret;
}

static int commit_run(struct commit *c)
{
	char err[512];
	int ret;

	ret = uq_image_open(&c->chain, c->path, "qcow2", UQ_OPEN_RDONLY | UQ_OPEN_CHAIN,
			    err, sizeof(err));
	if (ret < 0) {
		uq_err("%s", err);
		return ret;
	}
	ret = open_base(c);
	if (!ret)
		ret = copy_down(c);
	if (c->base) {
		int r = uq_image_close(c->base);

		if (r < 0 && !ret) {
			uq_err("%s: cannot flush the backing file: %s", c->path, strerror(-r));
			ret = r;
		}
		c->base = NULL;
	}
	uq_image_close(c->chain);
	c->chain = NULL;
	if (!ret && !c->keep)
		ret = empty_image(c);
	if (!ret)
		uq_progress_done(&c->progress);
	return ret;
}

int cmd_commit(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		UQ_KEY_LONGOPTS,
		{ NULL, 0, NULL, 0 },
	};
	struct commit c = { .progress.last = -1 };
	char err[512];
	enum uq_fmt f;
	bool quiet = false;
	int opt;

	while ((opt = uq_getopt(argc, argv, ":f:db:pqh", longopts)) != -1) {
		switch (opt) {
		case 'f':
			if (strcmp(optarg, "qcow2")) {
				uq_err("commit: only qcow2 images have a backing file, not '%s'",
				       optarg);
				return 1;
			}
			break;
		case 'p':
			c.progress.on = true;
			break;
		case 'q':
			quiet = true;
			break;
		case 'd':
			c.keep = true;
			break;
		case 'b':
			c.base_arg = optarg;
			c.keep = true;		/* as qemu-img: the images between go stale */
			break;
		case UQ_OPT_FAILED:
			return 1;
		case 'h':
			commit_usage();
			return 0;
		default:
			return uq_usage_error("commit", argv, opt);
		}
	}
	if (argc - optind != 1)
		return uq_usage_args("commit", "one IMAGE");
	if (quiet)
		c.progress.on = false;	/* as qemu-img: -q wins */
	c.path = argv[optind];
	if (uq_probe(c.path, &f, err, sizeof(err)) < 0) {
		uq_err("%s", err);
		return 1;
	}
	if (f != UQ_FMT_QCOW2) {
		uq_err("%s: image does not have a backing file (not a qcow2 image)", c.path);
		return 1;
	}
	if (commit_run(&c) < 0)
		return 1;
	if (!quiet)
		printf("Image committed.\n");
	return 0;
}
