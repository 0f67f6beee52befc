// SPDX-License-Identifier: MIT
/*
 * rebase: give a qcow2 image another backing file, as qemu-img rebase. Safe
 * mode first copies into the image whatever the old chain shows and the new
 * backing file does not; -u only rewrites the name in the header. The new
 * name is stored as given (relative to the image's directory).
 */
#include <errno.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cmds.h"
#include "util.h"

#define CHUNK_BYTES	(2u << 20)	/* qemu-img's IO_BUF_SIZE */
#define SECTOR		512u

static void rebase_usage(void)
{
	printf(
		"usage: " UQ_PROG " rebase [-f qcow2] [-p] [-q] [-u] [--key-secret PW]... -b BACKING\n"
		"                         [-F BACKING_FMT] IMAGE\n"
		"\n"
		"Make BACKING (\"\": none) IMAGE's backing file. BACKING is stored as given;\n"
		"a relative name is relative to IMAGE's directory.\n"
		"\n"
		"  -b BACKING      the new backing file\n"
		"  -F BACKING_FMT  its format: qcow2 or raw (default: detected)\n"
		"  -u              unsafe: only change the name; IMAGE's content is then\n"
		"                  whatever BACKING shows where IMAGE has no data\n"
		"  -f qcow2        IMAGE's format (only qcow2 has a backing file)\n"
		"  -p              show progress on stderr\n"
		"  -q              quiet (rebase prints nothing else anyway)\n"
		UQ_KEY_HELP
		"  -h, --help      show this help\n"
		"\n"
		"Without -u, what the old backing chain shows where IMAGE has no data and\n"
		"BACKING differs is first copied into IMAGE, so its content stays the same.\n");
}

struct rebase {
	const char *path;		/* IMAGE */
	const char *name;		/* new backing name as given, NULL: none */
	const char *fmt;		/* new backing format, NULL until known */
	char *fmt_alloc;
	bool unsafe;
	struct uq_image *newb;		/* safe mode: the new backing file and its chain */
	struct uq_image *img;
	struct uq_progress progress;	/* -p: through IMAGE's guest range */
};

/* Is the file @st somewhere in @q's chain (@q included)? */
static bool chain_has(const struct qcow2 *q, const struct stat *st)
{
	struct qcow2_info info;
	struct stat s;

	for (; q; q = info.backing) {
		qcow2_get_info(q, &info);
		if (!stat(info.filename, &s) && s.st_dev == st->st_dev && s.st_ino == st->st_ino)
			return true;
	}
	return false;
}

/*
 * Open the new backing file (safe mode, or to learn its format), before
 * IMAGE is opened for writing: a missing file leaves IMAGE untouched.
 */
static int open_new_backing(struct rebase *r)
{
	struct stat img_st, st;
	char *bpath, err[512];
	unsigned int flags = UQ_OPEN_RDONLY | (r->unsafe ? UQ_OPEN_NO_BACKING : 0);
	int ret;

	bpath = uq_backing_path(r->path, r->name);
	if (!bpath) {
		uq_err("%s: out of memory", r->path);
		return -ENOMEM;
	}
	ret = uq_image_open(&r->newb, bpath, r->fmt, flags, err, sizeof(err));
	if (ret < 0) {
		uq_err("%s: cannot open the new backing file: %s", r->path, err);
		goto out;
	}
	if (!r->fmt) {
		r->fmt_alloc = strdup(uq_fmt_name(r->newb->fmt));
		r->fmt = r->fmt_alloc;
		if (!r->fmt) {
			uq_err("%s: out of memory", r->path);
			ret = -ENOMEM;
			goto out;
		}
	}
	/* Unsafe mode may make loops, as qemu-img's does (it opens nothing). */
	if (!r->unsafe && !stat(r->path, &img_st) && !stat(bpath, &st) &&
	    ((st.st_dev == img_st.st_dev && st.st_ino == img_st.st_ino) ||
	     (r->newb->qcow2 && chain_has(r->newb->qcow2, &img_st)))) {
		uq_err("%s: the new backing file '%s' is this image or has it in its chain",
		       r->path, r->name);
		ret = -ELOOP;
	}
out:
	free(bpath);
	return ret;
}

/* Report the failed image operation's one line. Returns @ret. */
static int fail(int ret)
{
	uq_err("%s", uq_image_errmsg());
	return ret;
}

/*
 * Copy the differing sectors of one unallocated run [@off, @off + @len):
 * @old holds what IMAGE shows now (its old chain), the new backing file
 * shows the rest.
 */
static int copy_run(struct rebase *r, uint8_t *old, uint8_t *new, uint64_t off, uint64_t len)
{
	uint64_t new_size = r->newb ? r->newb->size : 0, i, j, in_new = 0;
	int ret;

	ret = uq_image_pread(r->img, old, len, off);
	if (ret < 0)
		return fail(ret);
	if (off < new_size)
		in_new = new_size - off < len ? new_size - off : len;
	if (in_new) {
		ret = uq_image_pread(r->newb, new, in_new, off);
		if (ret < 0)
			return fail(ret);
	}
	memset(new + in_new, 0, len - in_new);
	for (i = 0; i < len; i = j) {
		uint64_t n = len - i < SECTOR ? len - i : SECTOR;

		if (!memcmp(old + i, new + i, n)) {
			j = i + n;
			continue;
		}
		for (j = i + n; j < len; j += n) {
			n = len - j < SECTOR ? len - j : SECTOR;
			if (!memcmp(old + j, new + j, n))
				break;
		}
		ret = uq_image_pwrite(r->img, old + i, j - i, off + i);
		if (ret < 0)
			return fail(ret);
	}
	return 0;
}

/* Safe mode: make IMAGE hold everything the new backing file would change. */
static int copy_differences(struct rebase *r)
{
	uint8_t *old = malloc(CHUNK_BYTES), *new = malloc(CHUNK_BYTES);
	struct qcow2_extent ext;
	uint64_t off, len;
	int ret = 0;

	if (!old || !new) {
		uq_err("%s: out of memory", r->path);
		ret = -ENOMEM;
		goto out;
	}
	for (off = 0; off < r->img->size; off += ext.len) {
		uq_progress_update(&r->progress, off, r->img->size);
		len = r->img->size - off < CHUNK_BYTES ? r->img->size - off : CHUNK_BYTES;
		ret = qcow2_map(r->img->qcow2, off, len, &ext);
		if (ret < 0) {
			fail(uq_image_fail(r->img, ret));
			goto out;
		}
		if (ext.type != QCOW2_EXTENT_UNALLOCATED)
			continue;
		ret = copy_run(r, old, new, off, ext.len);
		if (ret < 0)
			goto out;
	}
out:
	free(old);
	free(new);
	return ret;
}

static int rebase_run(struct rebase *r)
{
	char err[512];
	int ret;

	if (r->name && (!r->unsafe || !r->fmt)) {
		ret = open_new_backing(r);
		if (ret < 0)
			return ret;
		if (r->unsafe) {
			uq_image_close(r->newb);
			r->newb = NULL;
		}
	}
	ret = uq_image_open(&r->img, r->path, "qcow2", r->unsafe ? UQ_OPEN_NO_BACKING : 0,
			    err, sizeof(err));
	if (ret < 0) {
		uq_err("%s", err);
		return ret;
	}
	if (!r->unsafe) {
		ret = copy_differences(r);
		if (ret < 0)
			return ret;
		ret = uq_image_flush(r->img);
		if (ret < 0)
			return fail(ret);
	}
	ret = qcow2_set_backing(r->img->qcow2, r->name, r->fmt);
	if (ret < 0)
		uq_err("%s", qcow2_errmsg(r->img->qcow2));
	else
		uq_progress_done(&r->progress);
	return ret;
}

int cmd_rebase(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		UQ_KEY_LONGOPTS,
		{ NULL, 0, NULL, 0 },
	};
	struct rebase r = { .progress.last = -1 };
	bool have_b = false;
	char err[512];
	enum uq_fmt f;
	int opt, ret;

	while ((opt = uq_getopt(argc, argv, ":f:ub:F:pqh", longopts)) != -1) {
		switch (opt) {
		case 'f':
			if (strcmp(optarg, "qcow2")) {
				uq_err("rebase: only qcow2 images have a backing file, not '%s'",
				       optarg);
				return 1;
			}
			break;
		case 'p':
			r.progress.on = true;
			break;
		case 'q':
			break;		/* rebase prints nothing but errors anyway */
		case 'u':
			r.unsafe = true;
			break;
		case 'b':
			r.name = optarg[0] ? optarg : NULL;
			have_b = true;
			break;
		case 'F':
			if (uq_fmt_parse(optarg, &f) < 0) {
				uq_err("rebase: unsupported backing format '%s' (qcow2 or raw)",
				       optarg);
				return 1;
			}
			r.fmt = optarg;
			break;
		case UQ_OPT_FAILED:
			return 1;
		case 'h':
			rebase_usage();
			return 0;
		default:
			return uq_usage_error("rebase", argv, opt);
		}
	}
	if (argc - optind != 1)
		return uq_usage_args("rebase", "one IMAGE");
	r.path = argv[optind];
	if (!have_b) {
		uq_err("%s: rebase needs the new backing file (-b BACKING, or -b \"\" for none)",
		       r.path);
		return 1;
	}
	if (!r.name)
		r.fmt = NULL;
	if (uq_probe(r.path, &f, err, sizeof(err)) < 0) {
		uq_err("%s", err);
		return 1;
	}
	if (f != UQ_FMT_QCOW2) {
		uq_err("%s: not a qcow2 image: only qcow2 images have a backing file", r.path);
		return 1;
	}
	ret = rebase_run(&r);
	if (r.img) {
		int c = uq_image_close(r.img);

		if (c < 0 && !ret) {
			uq_err("%s: %s", r.path, strerror(-c));
			ret = c;
		}
	}
	uq_image_close(r.newb);
	free(r.fmt_alloc);
	return ret < 0 ? 1 : 0;
}
