// SPDX-License-Identifier: MIT
/*
 * bench: qemu-img bench's workload through the engine's own request path
 * (the one the ublk queues drive): COUNT requests of SIZE bytes, DEPTH in
 * flight, offsets advancing by STEP and wrapping as qemu-img's do. Same
 * flags and output lines as qemu-img bench, so the two compare run for run.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cmds.h"
#include "qcow2.h"
#include "util.h"

struct bench {
	struct qcow2 *img;
	enum qcow2_op op;
	uint64_t count, sent, done;
	uint64_t offset, step, start, image_size;
	uint32_t bufsize;
	uint64_t flush_interval;
	uint64_t flushed;		/* requests sent when the last flush completed */
	bool flushing;
	struct qcow2_req *flusher;
	struct bench_req **idle;	/* waiting for the flush to go on */
	unsigned int nr_idle;
	int err;
};

struct bench_req {
	struct qcow2_req *req;
	struct bench *b;
	uint8_t *buf;
};

static void bench_usage(FILE *f)
{
	fprintf(f,
		"usage: " UQ_PROG " bench [-w] [-c COUNT] [-d DEPTH] [-s SIZE] [-S STEP] [-o OFFSET]\n"
		"                        [--pattern=PAT] [--flush-interval=N] [-t CACHE] [-i AIO]\n"
		"                        [-f FMT] [--cache-size BYTES] [-q] [--key-secret PW]... IMAGE\n"
		"\n"
		"Run qemu-img bench's workload through the engine: COUNT requests (default\n"
		"75000) of SIZE bytes (default 4k), DEPTH in flight (default 64), starting at\n"
		"OFFSET and STEP bytes apart (default SIZE), wrapping at the end of the image.\n"
		"\n"
		"  -w                  write (default: read)\n"
		"  --pattern=PAT       byte written (default 0)\n"
		"  --flush-interval=N  a flush after every N writes\n"
		"  -t CACHE            none or directsync: O_DIRECT (default writeback: buffered)\n"
		"  -i AIO              accepted for qemu-img's sake (native needs -t none);\n"
		"                      I/O is always io_uring\n"
		"  -f FMT              qcow2 or raw (default: probed)\n"
		"  --cache-size BYTES  qcow2 metadata memory, as add's (default: L2 cache\n"
		"                      enough for the image, up to 32M)\n"
		"  -q                  no output but errors\n"
		UQ_KEY_HELP
		"  -h, --help          show this help\n");
}

static void bench_next(struct bench_req *br);

/*
 * qemu-img bench -w -t none refuses a raw image whose size (in whole
 * sectors) is not a multiple of the file's O_DIRECT alignment: it would
 * need to grow the file to write the last block. The alignment is QEMU's
 * guess for a file (file-posix's raw_probe_alignment): the smallest read
 * O_DIRECT takes at offset 0, a file that takes any counted as a page
 * (tmpfs: 4096). True, with the error said, if @path is such an image.
 */
static bool raw_direct_misfit(const char *path)
{
	static const size_t sizes[] = { 1, 512, 1024, 2048, 4096 };
	size_t max = sysconf(_SC_PAGESIZE) > 4096 ? (size_t)sysconf(_SC_PAGESIZE) : 4096;
	uint64_t align = 0, size;
	struct stat st;
	void *buf;
	unsigned int i;
	int fd;

	/* Where O_DIRECT cannot open the file, the engine's open says so. */
	fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
	if (fd < 0)
		return false;
	if (fstat(fd, &st) < 0 || posix_memalign(&buf, max, max)) {
		close(fd);
		return false;
	}
	for (i = 0; i < sizeof(sizes) / sizeof(sizes[0]) && !align; i++)
		if (pread(fd, buf, sizes[i], 0) >= 0 || errno != EINVAL)
			align = sizes[i] == 1 ? max : sizes[i];
	free(buf);
	close(fd);
	size = ((uint64_t)st.st_size + 511) & ~511ull;
	if (!align || size % align == 0)
		return false;
	uq_err("%s: -w -t none: the size (%llu bytes in whole sectors) is not a multiple of "
	       "the O_DIRECT alignment (%llu), as qemu-img refuses it", path,
	       (unsigned long long)size, (unsigned long long)align);
	return true;
}

static void bench_done(struct qcow2_req *req, int res, void *priv)
{
	struct bench_req *br = priv;
	struct bench *b = br->b;

	if (res < 0 && !b->err) {
		b->err = res;
		uq_err("%s", qcow2_errmsg(b->img));
	}
	if (req == b->flusher) {
		/* The flush is done: everyone waiting goes on. */
		b->flusher = NULL;
		b->flushing = false;
		b->flushed = b->sent;
		while (b->nr_idle)
			bench_next(b->idle[--b->nr_idle]);
	} else {
		b->done++;
	}
	bench_next(br);
}

/* Send the next request on @br, if any is left. */
static void bench_next(struct bench_req *br)
{
	struct bench *b = br->b;
	uint64_t off;

	if (b->err || b->sent >= b->count)
		return;
	if (b->flush_interval && b->sent % b->flush_interval == 0 && b->flushed != b->sent) {
		/* Every N writes: wait for them all, then one flush, then go on. */
		if (b->flushing || b->done < b->sent) {
			b->idle[b->nr_idle++] = br;
			return;
		}
		b->flushing = true;
		b->flusher = br->req;
		qcow2_req_submit(br->req, QCOW2_OP_FLUSH, 0, 0, NULL, bench_done, br);
		return;
	}
	/* qemu-img 7.2's wrap (later ones wrap at image_size - bufsize). */
	off = b->offset;
	b->offset = (b->offset + b->step) % b->image_size;
	b->sent++;
	qcow2_req_submit(br->req, b->op, off, b->bufsize, br->buf, bench_done, br);
}

int cmd_bench(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "pattern", required_argument, NULL, 'P' },
		{ "flush-interval", required_argument, NULL, 'I' },
		{ "no-drain", no_argument, NULL, 'D' },
		{ "cache-size", required_argument, NULL, 'C' },
		{ "help", no_argument, NULL, 'h' },
		UQ_KEY_LONGOPTS,
		{ NULL, 0, NULL, 0 },
	};
	struct bench b = { .op = QCOW2_OP_READ, .count = 75000, .bufsize = 4096 };
	struct qcow2_opts opts = { 0 };
	uint64_t depth = 64, step = 0, v, pattern = 0, nr;
	struct bench_req *brs = NULL;
	struct qcow2_info info;
	struct qcow2_io *io = NULL;
	struct timespec t0, t1;
	bool quiet = false, native = false;
	char err[512];
	int opt, ret, status = 1;
	uint64_t i;

	while ((opt = uq_getopt(argc, argv, ":wc:d:s:S:o:t:i:f:nqh", longopts)) != -1) {
		switch (opt) {
		case 'w':
			b.op = QCOW2_OP_WRITE;
			break;
		case 'c':
		case 'd':
		case 's':
		case 'S':
		case 'o':
		case 'P':
		case 'I':
			/* qemu-img's limits: a depth and a size that fit an int, -s 0 too. */
			if (uq_parse_size(optarg, &v) < 0 ||
			    ((opt == 'd' || opt == 'I') && v == 0) ||
			    ((opt == 'd' || opt == 's') && v > INT_MAX) ||
			    (opt == 'P' && v > 255)) {
				if (opt == 'P' || opt == 'I')
					uq_err("bench: invalid value '%s' for --%s", optarg,
					       opt == 'P' ? "pattern" : "flush-interval");
				else
					uq_err("bench: invalid value '%s' for -%c", optarg, opt);
				return 1;
			}
			if (opt == 'c')
				b.count = v;
			else if (opt == 'd')
				depth = v;
			else if (opt == 's')
				b.bufsize = v;
			else if (opt == 'S')
				step = v;
			else if (opt == 'o')
				b.start = v;
			else if (opt == 'P')
				pattern = v;
			else
				b.flush_interval = v;
			break;
		case 't':
			if (!strcmp(optarg, "none") || !strcmp(optarg, "directsync")) {
				opts.direct = true;
			} else if (strcmp(optarg, "writeback") && strcmp(optarg, "writethrough") &&
				   strcmp(optarg, "unsafe")) {
				uq_err("bench: invalid cache mode '%s'", optarg);
				return 1;
			}
			break;
		case 'i':
			if (strcmp(optarg, "io_uring") && strcmp(optarg, "native") &&
			    strcmp(optarg, "threads")) {
				uq_err("bench: invalid aio mode '%s'", optarg);
				return 1;
			}
			/* Once asked for, native stays: a later -i does not clear it in qemu-img. */
			native |= !strcmp(optarg, "native");
			break;
		case 'n':
			native = true;
			break;
		case 'D':
			break;
		case 'C':
			if (uq_parse_size(optarg, &v) < 0) {
				uq_err("bench: invalid size '%s' for --cache-size", optarg);
				return 1;
			}
			opts.l2_cache_bytes = v;
			break;
		case 'f':
			opts.format = optarg;
			break;
		case 'q':
			quiet = true;
			break;
		case UQ_OPT_FAILED:
			return 1;
		case 'h':
			bench_usage(stdout);
			return 0;
		default:
			return uq_usage_error("bench", argv, opt);
		}
	}
	if (argc - optind != 1)
		return uq_usage_args("bench", "one IMAGE");
	if (b.flush_interval && b.op != QCOW2_OP_WRITE) {
		uq_err("bench: --flush-interval is only available in write tests");
		return 1;
	}
	if (b.flush_interval && b.flush_interval < depth) {
		uq_err("bench: --flush-interval can't be smaller than the depth (%llu)",
		       (unsigned long long)depth);
		return 1;
	}
	if (native && !opts.direct) {
		/* We always use io_uring, but qemu-img refuses this mix at open. */
		uq_err("%s: aio=native needs -t none or directsync", argv[optind]);
		return 1;
	}
	if (depth * b.bufsize > INT_MAX) {
		/* qemu-img bench allocates them in one int-sized buffer (and crashes). */
		uq_err("bench: -d %llu times -s %u is more than 2 GiB of buffers",
		       (unsigned long long)depth, b.bufsize);
		return 1;
	}
	if (!opts.format) {
		/* As qemu-img bench: the format is probed, a raw image read as raw. */
		enum uq_fmt fmt;

		if (uq_probe(argv[optind], &fmt, err, sizeof(err)) < 0) {
			uq_err("%s", err);
			return 1;
		}
		opts.format = uq_fmt_name(fmt);
	}
	if (opts.direct && b.op == QCOW2_OP_WRITE && !strcmp(opts.format, "raw") &&
	    raw_direct_misfit(argv[optind]))
		return 1;
	b.step = step ? step : b.bufsize;
	if (opts.direct && (b.bufsize % 512 || b.step % 512 || b.start % 512)) {
		/*
		 * O_DIRECT needs 512-byte aligned requests, which the engine (fed
		 * by ublk's 512-byte sectors) does not bounce; qemu-img bench does,
		 * so the run goes on through the page cache rather than failing.
		 */
		uq_err("bench: SIZE, STEP or OFFSET not a multiple of 512: -t none ignored");
		opts.direct = false;
	}
	opts.read_only = b.op == QCOW2_OP_READ;
	opts.nr_keys = uq_keys_get(&opts.keys);

	/* Never more requests in flight than there are to send. */
	nr = depth < b.count ? depth : b.count ? b.count : 1;
	/* A bounded ring: what does not fit waits in the backend's backlog. */
	io = qcow2_uring_new(nr < 2048 ? 2 * nr + 64 : 4096);
	if (!io) {
		uq_err("bench: io_uring: %s", strerror(errno));
		return 1;
	}
	if (qcow2_open(&b.img, argv[optind], &opts, io, err, sizeof(err)) < 0) {
		uq_err("%s", err);
		goto out_io;
	}
	qcow2_get_info(b.img, &info);
	b.image_size = info.virtual_size;
	if (b.start >= b.image_size || b.bufsize > b.image_size) {
		uq_err("%s: offset or request size beyond the image (%llu bytes)", argv[optind],
		       (unsigned long long)b.image_size);
		goto out_close;
	}
	b.offset = b.start;

	brs = calloc(nr, sizeof(*brs));
	b.idle = calloc(nr, sizeof(*b.idle));
	if (!brs || !b.idle)
		goto out_nomem;
	for (i = 0; i < nr; i++) {
		brs[i].b = &b;
		brs[i].req = qcow2_req_new(b.img);
		/* -s 0 still gets a buffer: requests of no bytes, as qemu-img's. */
		if (!brs[i].req ||
		    posix_memalign((void **)&brs[i].buf, 4096, b.bufsize ? b.bufsize : 4096))
			goto out_nomem;
		memset(brs[i].buf, (int)pattern, b.bufsize);
	}

	if (!quiet) {
		printf("Sending %llu %s requests, %u bytes each, %llu in parallel "
		       "(starting at offset %llu, step size %llu)\n",
		       (unsigned long long)b.count, b.op == QCOW2_OP_WRITE ? "write" : "read",
		       b.bufsize, (unsigned long long)depth, (unsigned long long)b.start,
		       (unsigned long long)b.step);
		if (b.flush_interval)
			printf("Sending flush every %llu requests\n",
			       (unsigned long long)b.flush_interval);
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (i = 0; i < nr && i < b.count; i++)
		bench_next(&brs[i]);
	if (qcow2_drain(b.img) < 0 && !b.err)
		b.err = -EIO;
	if (!b.err && b.op == QCOW2_OP_WRITE && b.flush_interval && qcow2_flush(b.img) < 0)
		b.err = -EIO;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	if (b.err) {
		if (!qcow2_errmsg(b.img)[0])
			uq_err("%s: %s", argv[optind], strerror(-b.err));
		goto out_close;
	}
	if (!quiet)
		printf("Run completed in %.3f seconds.\n",
		       (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
	status = 0;
	goto out_close;

out_nomem:
	uq_err("bench: out of memory");
out_close:
	if (brs) {
		for (i = 0; i < nr; i++) {
			qcow2_req_free(brs[i].req);
			free(brs[i].buf);
		}
		free(brs);
	}
	free(b.idle);
	ret = qcow2_close(b.img);
	if (ret < 0 && status == 0) {
		uq_err("%s: closing: %s", argv[optind], strerror(-ret));
		status = 1;
	}
out_io:
	qcow2_uring_free(io);
	return status;
}
