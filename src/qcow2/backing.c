// SPDX-License-Identifier: MIT
/*
 * The backing chain: resolving a backing file name against the overlay's
 * directory, choosing its format (never probing when the image names one),
 * refusing loops and overlong chains, and opening each link read-only.
 */
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"

/* @name relative to the directory of @overlay, unless absolute. */
static char *resolve(const char *overlay, const char *name)
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

int qcow2_backing_open(struct qcow2 *img, const struct qcow2_opts *opts,
		       struct qcow2_chain *chain)
{
	struct qcow2_opts bopts = {
		.read_only = true,
		.direct = opts->direct,
		.l2_cache_bytes = opts->l2_cache_bytes,
		.refcount_cache_bytes = opts->refcount_cache_bytes,
		.slice_bytes = opts->slice_bytes,
		.key = opts->key,	/* an encrypted backing file: the same passphrase */
		.key_len = opts->key_len,
		.no_key = opts->no_key,
		.format = img->backing_fmt ? img->backing_fmt : "probe",
	};
	char err[256], *path;
	int ret;

	if (!img->backing_file || opts->no_backing)
		return 0;
	if (img->backing_fmt && strcmp(img->backing_fmt, "qcow2") && strcmp(img->backing_fmt, "raw"))
		return qcow2_error(img, -ENOTSUP, "unsupported backing format '%s'",
				   img->backing_fmt);
	if (chain->n >= QCOW2_MAX_CHAIN)
		return qcow2_error(img, -ELOOP, "backing chain longer than %d images",
				   QCOW2_MAX_CHAIN);
	path = resolve(img->path, img->backing_file);
	if (!path)
		return -ENOMEM;
	ret = qcow2_open_chain(&img->backing, path, &bopts, img->io, err, sizeof(err), chain);
	free(path);
	if (ret < 0)
		return qcow2_error(img, ret, "cannot open backing file: %s", err);
	img->backing->depth = img->depth + 1;
	return 0;
}
