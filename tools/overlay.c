// SPDX-License-Identifier: MIT
/*
 * Throw-away overlays (add --overlay, io --overlay): a qcow2 image in
 * $TMPDIR whose backing file is the user's image, unlinked as soon as it
 * exists so that nothing is left behind however the process ends. It is
 * reached through its /proc/self/fd link while the descriptor stays open.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cmds.h"
#include "util.h"

#define DEFAULT_TMPDIR	"/var/tmp"

int uq_overlay_create(const char *image, const char *fmt, int *fd_out, char *path,
		      size_t pathlen, char *err, size_t errlen)
{
	struct qcow2_create_opts o = { .backing_fmt = fmt };
	const char *dir = getenv("TMPDIR");
	struct uq_image *b;
	struct qcow2_io *io;
	char *tmpl, *abs, inner[256];
	int fd, ret;

	abs = realpath(image, NULL);
	if (!abs) {
		ret = -errno;
		snprintf(err, errlen, "%s: %s", image, strerror(-ret));
		return ret;
	}
	/* The image decides the size; it (and its chain) must open before we create anything. */
	ret = uq_image_open(&b, abs, fmt, UQ_OPEN_RDONLY, err, errlen);
	if (ret < 0)
		goto out_abs;
	o.size = (b->size + 511) & ~511ull;
	if (!fmt)
		o.backing_fmt = uq_fmt_name(b->fmt);
	o.backing_file = abs;
	uq_image_close(b);

	if (!dir || !dir[0])
		dir = DEFAULT_TMPDIR;
	if (asprintf(&tmpl, "%s/ublk-qcow2-overlay-XXXXXX", dir) < 0) {
		ret = -ENOMEM;
		snprintf(err, errlen, "%s: out of memory", image);
		goto out_abs;
	}
	fd = mkostemp(tmpl, O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		snprintf(err, errlen, "%s: cannot create an overlay in %s: %s", image, dir,
			 strerror(-ret));
		goto out_tmpl;
	}
	unlink(tmpl);
	snprintf(path, pathlen, "/proc/self/fd/%d", fd);
	io = qcow2_uring_new(8);
	if (!io) {
		ret = -ENOMEM;
		snprintf(err, errlen, "%s: cannot set up io_uring", image);
		goto out_fd;
	}
	ret = qcow2_create(path, &o, io, inner, sizeof(inner));
	qcow2_uring_free(io);
	if (ret < 0) {
		snprintf(err, errlen, "%s: cannot create an overlay in %s: %s", image, dir, inner);
		goto out_fd;
	}
	*fd_out = fd;
	goto out_tmpl;

out_fd:
	close(fd);
out_tmpl:
	free(tmpl);
out_abs:
	free(abs);
	return ret;
}
