// SPDX-License-Identifier: MIT
/*
 * The backing chain: resolving a backing file name against the overlay's
 * directory, choosing its format (never probing when the image names one),
 * refusing loops and overlong chains, and opening each link read-only.
 * Also what rebase and commit change: the backing file named in the header,
 * and an overlay emptied so that its backing file shows through.
 */
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"

/* @name relative to the directory of @overlay, unless absolute. */
char *qcow2_relative_path(const char *overlay, const char *name)
{
	char *copy, *dir, *out;

	if (name[0] == '/')
		return strdup(name);
	copy = strdup(overlay);
	if (!copy)
		return NULL;
	dir = dirname(copy);
	if (asprintf(&out, "%s/%s", dir, name) < 0)
		out = NULL;
	free(copy);
	return out;
}

/**
 * qcow2_backing_allowed - may @img (header parsed) have its backing file?
 *
 * Called before anything is read beyond the header or written: a refused
 * backing file is never opened, not even probed. 0 or -EPERM.
 */
int qcow2_backing_allowed(struct qcow2 *img, const struct qcow2_opts *opts)
{
	if (img->backing_file && opts->max_backing < 0)
		return qcow2_error(img, -EPERM, "names backing file '%s': backing files are "
				   "not allowed here (--no-backing)", img->backing_file);
	return 0;
}

int qcow2_backing_open(struct qcow2 *img, const struct qcow2_opts *opts,
		       struct qcow2_chain *chain)
{
	struct qcow2_opts bopts = {
		.read_only = true,
		.direct = opts->direct,
		.l2_cache_bytes = opts->l2_cache_bytes,
		.refcount_cache_bytes = opts->refcount_cache_bytes,
		.slice_bytes = opts->slice_bytes,
		.keys = opts->keys,	/* an encrypted backing file tries the same ones */
		.nr_keys = opts->nr_keys,
		.no_key = opts->no_key,
		.no_data_file = opts->no_data_file,
		.format = img->backing_fmt ? img->backing_fmt : "probe",
		/* One level fewer below the backing file; at the last allowed, none. */
		.max_backing = opts->max_backing > 1 ? opts->max_backing - 1 :
			       opts->max_backing == 1 ? -1 : 0,
	};
	char err[256], *path;
	int ret;

	if (!img->backing_file || opts->no_backing)
		return 0;
	if (img->backing_fmt && strcmp(img->backing_fmt, "qcow2") && strcmp(img->backing_fmt, "raw"))
		return qcow2_error(img, -ENOTSUP, "unsupported backing format '%s'",
				   img->backing_fmt);
	if (chain->n >= QCOW2_MAX_CHAIN)
		return qcow2_error(img, -EMLINK, "backing chain longer than %d images",
				   QCOW2_MAX_CHAIN);
	path = qcow2_relative_path(img->path, img->backing_file);
	if (!path)
		return -ENOMEM;
	ret = qcow2_open_chain(&img->backing, path, &bopts, img->io, err, sizeof(err), chain);
	free(path);
	/* Said once, for the image the user named, not once per level. */
	if (ret == -EMLINK)
		return qcow2_error(img, ret, "backing chain longer than %d images",
				   QCOW2_MAX_CHAIN);
	if (ret < 0)
		return qcow2_error(img, ret, "cannot open backing file: %s", err);
	img->backing->depth = img->depth + 1;
	return 0;
}

/* ---- Changing the backing file (rebase, commit) ---------------------------------- */

int qcow2_set_backing(struct qcow2 *img, const char *name, const char *fmt)
{
	char *old_name = img->backing_file, *old_fmt = img->backing_fmt;
	char *new_name = NULL, *new_fmt = NULL;
	int ret;

	if (img->raw)
		return qcow2_error(img, -ENOTSUP, "raw images have no backing file");
	if (img->read_only)
		return qcow2_error(img, -EROFS, "image is read-only");
	if (name && !name[0])
		name = NULL;
	if (!name)
		fmt = NULL;
	if (name && strlen(name) > QCOW2_MAX_BACKING_NAME)
		return qcow2_error(img, -ENAMETOOLONG, "backing file name longer than %d bytes",
				   QCOW2_MAX_BACKING_NAME);
	if (fmt && strlen(fmt) > 16)
		return qcow2_error(img, -EINVAL, "backing format name too long");
	if ((name && !(new_name = strdup(name))) || (fmt && !(new_fmt = strdup(fmt)))) {
		free(new_name);
		return qcow2_error(img, -ENOMEM, "out of memory");
	}
	/* Everything before the switch is on disk first: the header goes last. */
	ret = qcow2_flush(img);
	if (ret < 0)
		goto undo;
	img->backing_file = new_name;
	img->backing_fmt = new_fmt;
	ret = qcow2_header_write(img);
	if (ret < 0) {
		img->backing_file = old_name;
		img->backing_fmt = old_fmt;
		if (ret == -ENOSPC)
			qcow2_error(img, ret,
				    "backing file name does not fit in the header cluster");
		goto undo;
	}
	free(old_name);
	free(old_fmt);
	return 0;

undo:
	free(new_name);
	free(new_fmt);
	return ret;
}

int qcow2_make_empty(struct qcow2 *img)
{
	struct qcow2_check_result res;
	int ret;

	if (img->raw)
		return qcow2_error(img, -ENOTSUP, "raw images cannot be emptied");
	if (img->read_only)
		return qcow2_error(img, -EROFS, "image is read-only");
	if (qcow2_busy(img))
		return qcow2_error(img, -EBUSY, "requests in flight");
	/*
	 * Drop the active L1 table's references on disk (one ordered flush:
	 * whatever metadata was pending goes first, the L1 table last). From
	 * then on every cluster only it referenced is a leak, which a crash
	 * may leave but never a corruption; the leak repair (which first
	 * applies queued refcount decrements) then frees them, keeping
	 * everything internal snapshots still use.
	 */
	qcow2_table_clear(&img->l1);
	img->l1_dirty = true;
	ret = qcow2_flush(img);
	if (ret < 0)
		return ret;
	ret = qcow2_check(img, QCOW2_FIX_LEAKS, &res, NULL, NULL);
	if (ret < 0)
		return ret;
	if (res.corruptions || res.check_errors)
		return qcow2_error(img, -EIO, "image has %llu corruption(s) after emptying it",
				   (unsigned long long)(res.corruptions + res.check_errors));
	/* Give the freed tail back, as QEMU does: nothing past the end is in use. */
	if (res.image_end_offset && res.image_end_offset < img->file_end) {
		if (ftruncate(img->fd, res.image_end_offset) < 0)
			return qcow2_error(img, -errno, "cannot truncate: %s", strerror(errno));
		img->file_end = res.image_end_offset;
		if (img->file_size > img->file_end)
			img->file_size = img->file_end;
		return qcow2_io_fsync(img->io, img->fd);
	}
	return 0;
}
