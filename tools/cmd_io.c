// SPDX-License-Identifier: MIT
/*
 * io: a qemu-io subset (read, write, discard, flush) with qemu-io's output
 * lines, run from -c arguments or a command file. Unlike qemu-io, any
 * failed command makes the exit status nonzero.
 */
#include <errno.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cmds.h"
#include "util.h"

#define MAX_WORDS	16
#define DEFAULT_PATTERN	0xcd		/* qemu-io's write pattern */
/* qemu-io's limit on one read or write buffer (BDRV_REQUEST_MAX_BYTES). */
#define MAX_BUF_LEN	2147483136ull

static void io_usage(void)
{
	printf(
		"usage: " UQ_PROG " io [-r] [-f FMT] [--overlay] [--no-backing] IMAGE [-c CMD]... [-C FILE]...\n"
		"\n"
		"Run commands on IMAGE (opened read-write unless -r), in order:\n"
		"  read [-P PAT] [-q] OFF LEN      read; with -P check every byte is PAT\n"
		"  write [-P PAT] [-z [-u]] [-q] OFF LEN\n"
		"                                  write PAT (default 0xcd); -z zeroes,\n"
		"                                  keeping whole clusters allocated\n"
		"                                  unless -u (which may free them)\n"
		"  discard [-q] OFF LEN            discard\n"
		"  flush                           write back and sync\n"
		"OFF and LEN take k, M, G, T suffixes; output lines are qemu-io's.\n"
		"The exit status is 1 if any command failed (qemu-io may exit 0).\n"
		"\n"
		"  -c CMD          run CMD\n"
		"  -C FILE         run FILE's commands, one a line ('#' starts a comment)\n"
		"  -f FMT          image format: qcow2 or raw (default: detected)\n"
		"  -r              open read-only\n"
		"  --overlay       write to a throw-away qcow2 overlay over IMAGE (in $TMPDIR,\n"
		"                  default /var/tmp, gone on exit); IMAGE is only read\n"
		UQ_KEY_HELP
		UQ_NO_BACKING_HELP
		"  -h, --help      show this help\n");
}

struct io_cmd {
	const char *name;
	int nr_args;			/* positional arguments */
	const char *flags;		/* accepted single-letter flags; 'P' takes a value */
};

static const struct io_cmd io_cmds[] = {
	{ "read", 2, "Pq" },
	{ "write", 2, "Pzuq" },
	{ "discard", 2, "q" },
	{ "flush", 0, "" },
};

struct io_args {
	const struct io_cmd *cmd;
	bool quiet, zero, unmap, has_pattern;
	uint8_t pattern;
	uint64_t off, len;
};

/* qemu-io's cvtstr: "128 KiB", "11.927 MiB". */
static void cvtstr(double v, char *buf, size_t len)
{
	static const char *const units[] = { " bytes", " KiB", " MiB", " GiB", " TiB",
					     " PiB", " EiB" };
	char *trim;
	int i = 0;

	while (i < 6 && v >= 1024.0) {
		v /= 1024.0;
		i++;
	}
	snprintf(buf, len - 8, "%.3f", v);
	trim = strstr(buf, ".000");
	if (trim)
		*trim = '\0';
	strcat(buf, units[i]);
}

static void print_report(const char *op, const struct io_args *a, const struct timespec *t0)
{
	struct timespec t1;
	char total[64], rate[64], ts[64];
	double secs;

	clock_gettime(CLOCK_MONOTONIC, &t1);
	secs = (t1.tv_sec - t0->tv_sec) + (t1.tv_nsec - t0->tv_nsec) / 1e9;
	if (secs <= 0)
		secs = 1e-9;
	if (secs < 1)
		snprintf(ts, sizeof(ts), "%05.2f sec", secs);
	else
		snprintf(ts, sizeof(ts), "%u:%02u:%05.2f", (unsigned int)(secs / 3600),
			 (unsigned int)(secs / 60) % 60, secs - 60 * (unsigned int)(secs / 60));
	cvtstr((double)a->len, total, sizeof(total));
	cvtstr(a->len / secs, rate, sizeof(rate));
	printf("%s %llu/%llu bytes at offset %llu\n", op, (unsigned long long)a->len,
	       (unsigned long long)a->len, (unsigned long long)a->off);
	printf("%s, 1 ops; %s (%s/sec and %.4f ops/sec)\n", total, ts, rate, 1 / secs);
}

static int parse_args(char **words, int nr, struct io_args *a)
{
	const struct io_cmd *cmd = NULL;
	uint64_t pos[2];
	bool opts_done = false;
	int i, npos = 0;
	size_t k;

	for (k = 0; k < sizeof(io_cmds) / sizeof(io_cmds[0]); k++)
		if (!strcmp(words[0], io_cmds[k].name))
			cmd = &io_cmds[k];
	if (!cmd) {
		uq_err("io: unknown command '%s'", words[0]);
		return -EINVAL;
	}
	memset(a, 0, sizeof(*a));
	a->cmd = cmd;
	a->pattern = DEFAULT_PATTERN;
	for (i = 1; i < nr; i++) {
		const char *w = words[i], *f;

		/* As qemu-io's getopt: "--" ends the options. */
		if (!opts_done && !strcmp(w, "--")) {
			opts_done = true;
			continue;
		}
		if (opts_done || w[0] != '-' || !w[1]) {
			if (npos == cmd->nr_args || uq_parse_size(w, &pos[npos]) < 0) {
				uq_err("io: %s: bad argument '%s'", cmd->name, w);
				return -EINVAL;
			}
			npos++;
			continue;
		}
		for (f = w + 1; *f; f++) {
			unsigned long v;
			char *end;

			if (!strchr(cmd->flags, *f)) {
				uq_err("io: %s: unknown option '-%c'", cmd->name, *f);
				return -EINVAL;
			}
			if (*f == 'q') {
				a->quiet = true;
			} else if (*f == 'z') {
				a->zero = true;
			} else if (*f == 'u') {
				a->unmap = true;
			} else {
				/* -P PAT: the value is the rest of the word ("-P5") or the next one. */
				const char *val = f[1] ? f + 1 : i + 1 < nr ? words[++i] : NULL;

				if (!val) {
					uq_err("io: %s: -P needs a pattern", cmd->name);
					return -EINVAL;
				}
				v = strtoul(val, &end, 0);
				if (!*val || *end || v > 255) {
					uq_err("io: %s: bad pattern '%s'", cmd->name, val);
					return -EINVAL;
				}
				a->pattern = v;
				a->has_pattern = true;
				break;
			}
		}
	}
	if (npos != cmd->nr_args) {
		uq_err("io: %s needs %s", cmd->name, cmd->nr_args ? "OFF LEN" : "no arguments");
		return -EINVAL;
	}
	if (a->zero && a->has_pattern) {
		uq_err("io: write: -z and -P exclude each other");
		return -EINVAL;
	}
	if (a->unmap && !a->zero) {
		uq_err("io: write: -u needs -z");
		return -EINVAL;
	}
	if (npos) {
		a->off = pos[0];
		a->len = pos[1];
	}
	return 0;
}

static int verify_pattern(const uint8_t *buf, const struct io_args *a)
{
	uint64_t i;

	for (i = 0; i < a->len; i++) {
		if (buf[i] != a->pattern) {
			printf("Pattern verification failed at offset %llu, %llu bytes\n",
			       (unsigned long long)a->off, (unsigned long long)a->len);
			return -EIO;
		}
	}
	return 0;
}

/*
 * Run the parsed command; @buf holds a->len bytes for read and write.
 * 0, 1 when a read did not match its pattern (reported already), or -errno.
 */
static int run_cmd(struct uq_image *img, const struct io_args *a, uint8_t *buf)
{
	const char *op = a->cmd->name;
	int ret;

	if (!strcmp(op, "flush"))
		return uq_image_flush(img);
	if (!strcmp(op, "discard"))
		return uq_image_discard(img, a->len, a->off);
	if (!strcmp(op, "write"))
		return a->zero ? uq_image_write_zeroes(img, a->len, a->off, a->unmap)
			       : uq_image_pwrite(img, buf, a->len, a->off);
	ret = uq_image_pread(img, buf, a->len, a->off);
	if (ret < 0)
		return ret;
	return a->has_pattern && verify_pattern(buf, a) < 0;
}

/* Run one command line (modified in place). 0, or -1 when it failed. */
static int run_line(struct uq_image *img, char *line)
{
	char *words[MAX_WORDS + 1], *save = NULL, *w;
	uint8_t *buf = NULL;
	struct timespec t0;
	struct io_args a;
	int nr = 0, ret;

	for (w = strtok_r(line, " \t\r\n", &save); w; w = strtok_r(NULL, " \t\r\n", &save)) {
		if (nr == MAX_WORDS) {
			uq_err("io: command too long");
			return -1;
		}
		words[nr++] = w;
	}
	if (!nr || words[0][0] == '#')
		return 0;
	if (parse_args(words, nr, &a) < 0)
		return -1;
	/* Before the buffer is allocated and filled: a huge LEN must not run for minutes. */
	if (a.off > img->size || a.len > img->size - a.off) {
		uq_err("%s: request [%llu, +%llu) beyond the virtual size %llu", img->path,
		       (unsigned long long)a.off, (unsigned long long)a.len,
		       (unsigned long long)img->size);
		return -1;
	}
	if (!strcmp(a.cmd->name, "read") || (!strcmp(a.cmd->name, "write") && !a.zero)) {
		if (a.len > MAX_BUF_LEN) {
			uq_err("io: %s: length cannot exceed %llu, given %llu", a.cmd->name,
			       (unsigned long long)MAX_BUF_LEN, (unsigned long long)a.len);
			return -1;
		}
		buf = malloc(a.len ? a.len : 1);
		if (!buf) {
			uq_err("io: %s: cannot allocate %llu bytes", a.cmd->name,
			       (unsigned long long)a.len);
			return -1;
		}
		memset(buf, a.pattern, a.len);
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	ret = run_cmd(img, &a, buf);
	free(buf);
	if (ret < 0) {
		uq_err("%s", uq_image_errmsg());
		return -1;
	}
	/* Like qemu-io, a read that fails verification still reports. */
	if (!a.quiet && strcmp(a.cmd->name, "flush"))
		print_report(!strcmp(a.cmd->name, "write") ? "wrote" : a.cmd->name, &a, &t0);
	return ret ? -1 : 0;
}

static int run_file(struct uq_image *img, const char *path)
{
	FILE *f = fopen(path, "r");
	char *line = NULL;
	size_t cap = 0;
	int failed = 0;

	if (!f) {
		uq_err("%s: cannot open: %s", path, strerror(errno));
		return -1;
	}
	while (getline(&line, &cap, f) >= 0)
		if (run_line(img, line) < 0)
			failed = -1;
	free(line);
	fclose(f);
	return failed;
}

struct io_step {
	bool file;			/* -C FILE, else -c CMD */
	char *arg;
};

int cmd_io(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "overlay", no_argument, NULL, 'O' },
		UQ_KEY_LONGOPTS,
		UQ_NO_BACKING_LONGOPT,
		{ NULL, 0, NULL, 0 },
	};
	struct io_step *steps;
	struct uq_image *img;
	const char *fmt = NULL;
	bool read_only = false, overlay = false;
	int opt, ret, i, nr_steps = 0, status = 1, overlay_fd = -1;
	char err[512], overlay_path[64];
	const char *path;

	/* -c and -C run in command line order. */
	steps = calloc(argc, sizeof(*steps));
	if (!steps) {
		uq_err("io: out of memory");
		return 1;
	}
	while ((opt = uq_getopt(argc, argv, ":c:C:f:rh", longopts)) != -1) {
		switch (opt) {
		case 'c':
		case 'C':
			steps[nr_steps].file = opt == 'C';
			steps[nr_steps++].arg = optarg;
			break;
		case 'f':
			fmt = optarg;
			break;
		case 'r':
			read_only = true;
			break;
		case 'O':
			overlay = true;
			break;
		case UQ_OPT_FAILED:
			return 1;
		case 'h':
			io_usage();
			status = 0;
			goto out;
		default:
			uq_usage_error("io", argv, opt);
			goto out;
		}
	}
	if (argc - optind != 1) {
		uq_usage_args("io", "one IMAGE");
		goto out;
	}
	path = argv[optind];
	if (overlay) {
		ret = uq_overlay_create(path, fmt, &overlay_fd, overlay_path,
					sizeof(overlay_path), err, sizeof(err));
		if (ret < 0) {
			uq_err("%s", err);
			goto out;
		}
		path = overlay_path;
		fmt = "qcow2";
	}
	ret = uq_image_open(&img, path, fmt, (read_only ? UQ_OPEN_RDONLY : 0) |
			    (overlay ? UQ_OPEN_OVERLAY : 0), err, sizeof(err));
	if (ret < 0) {
		uq_err("%s", err);
		goto out;
	}
	status = 0;
	for (i = 0; i < nr_steps; i++) {
		ret = steps[i].file ? run_file(img, steps[i].arg) : run_line(img, steps[i].arg);
		if (ret < 0)
			status = 1;
	}
	ret = uq_image_close(img);
	/* One error line: a failed command already said what went wrong. */
	if (ret < 0 && !status) {
		uq_err("%s: cannot write back: %s", argv[optind], strerror(-ret));
		status = 1;
	}
out:
	if (overlay_fd >= 0)
		close(overlay_fd);
	free(steps);
	return status;
}
