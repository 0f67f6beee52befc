// SPDX-License-Identifier: MIT
/*
 * A program outside the project using the installed libqcow2 through
 * pkg-config: create IMAGE (64 MiB qcow2), write a pattern, close, open it
 * again read-only and read the pattern back. Exit 0 when it all matched.
 */
#include <qcow2.h>
#include <stdio.h>
#include <string.h>

#define LEN	(192 * 1024)
#define OFF	(5 * 1024 * 1024 + 4096)

static unsigned char wbuf[LEN], rbuf[LEN];

int main(int argc, char **argv)
{
	struct qcow2_create_opts co = { .size = 64 << 20 };
	struct qcow2_opts ro = { .read_only = true }, rw = { 0 };
	struct qcow2_io *io;
	struct qcow2 *img;
	char err[256];
	int ret;

	if (argc != 2) {
		fprintf(stderr, "usage: libqcow2_demo IMAGE\n");
		return 2;
	}
	io = qcow2_uring_new(16);
	if (!io) {
		fprintf(stderr, "qcow2_uring_new failed\n");
		return 1;
	}
	memset(wbuf, 0x5a, sizeof(wbuf));
	ret = qcow2_create(argv[1], &co, io, err, sizeof(err));
	if (!ret)
		ret = qcow2_open(&img, argv[1], &rw, io, err, sizeof(err));
	if (ret) {
		fprintf(stderr, "%s\n", err);
		return 1;
	}
	ret = qcow2_pwrite(img, wbuf, LEN, OFF);
	if (!ret)
		ret = qcow2_flush(img);
	if (qcow2_close(img) || ret) {
		fprintf(stderr, "write: %d\n", ret);
		return 1;
	}
	ret = qcow2_open(&img, argv[1], &ro, io, err, sizeof(err));
	if (ret) {
		fprintf(stderr, "%s\n", err);
		return 1;
	}
	ret = qcow2_pread(img, rbuf, LEN, OFF);
	qcow2_close(img);
	qcow2_uring_free(io);
	if (ret || memcmp(wbuf, rbuf, LEN)) {
		fprintf(stderr, "read back: %d, %s\n", ret, ret ? "failed" : "data differs");
		return 1;
	}
	printf("libqcow2: wrote and read back %d bytes\n", LEN);
	return 0;
}
