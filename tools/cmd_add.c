// SPDX-License-Identifier: MIT
/*
 * add, del, list, features and recover: the ublk subcommands. add opens the
 * image, creates /dev/ublkbN and becomes its daemon; the daemon records what
 * it serves in /run/ublk-qcow2/ID.info for list (and for recover, which
 * serves a --recovery device again from that record after its daemon
 * died), and stops on SIGTERM or when del (or the kernel) stops the device.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cmds.h"
#include "target_qcow2.h"
#include "ublk.h"
#include "util.h"

#define RUN_DIR			"/run/ublk-qcow2"
#define DEF_QUEUES		1
#define DEF_DEPTH		128
#define DEL_WAIT_MS		(120 * 1000)

struct add_args {
	int dev_id;
	unsigned int nr_queues;
	unsigned int depth;
	const char *fmt;		/* qcow2, raw, NULL: probe */
	bool probed;			/* fmt was guessed (ublk_raw_opts.probed) */
	bool null_tgt;
	bool read_only;
	bool foreground;
	bool overlay;			/* serve a throw-away overlay over the image */
	bool recovery;			/* USER_RECOVERY: the device outlives the daemon */
	bool no_user_copy;		/* NEED_GET_DATA even where USER_COPY exists */
	bool no_zero_copy;		/* USER_COPY even where AUTO_BUF_REG exists */
	bool recover;			/* take over device dev_id (recover) */
	uint64_t cache_bytes;
	uint64_t null_size;
	const char *snapshot;		/* serve this internal snapshot, read-only */
	char *image;			/* absolute path, NULL for null */
};

/* Open the control device, saying why not in the one line users expect. */
static int ctrl_open(struct ublk_ctrl **c)
{
	int ret = ublk_ctrl_open(c);

	if (ret == -ENOENT)
		uq_err("no " UBLK_CONTROL_PATH ": load the ublk_drv module");
	else if (ret)
		uq_err(UBLK_CONTROL_PATH ": %s", strerror(-ret));
	return ret;
}

static bool have_control(void)
{
	if (access(UBLK_CONTROL_PATH, F_OK) == 0)
		return true;
	uq_err("no " UBLK_CONTROL_PATH ": load the ublk_drv module");
	return false;
}

static void info_path(char *buf, size_t len, uint32_t dev_id)
{
	snprintf(buf, len, RUN_DIR "/%u.info", dev_id);
}

/* ---- The run file: what list shows beyond GET_DEV_INFO ------------------- */

/* Write @dev's record atomically (temp file + rename). 0 or -errno. */
static int info_write(const struct add_args *a, const struct ublksrv_ctrl_dev_info *info,
		      const char *fmt)
{
	char path[64], tmp[80];
	FILE *f;
	int ret = 0;

	if (mkdir(RUN_DIR, 0755) && errno != EEXIST)
		return -errno;
	info_path(path, sizeof(path), info->dev_id);
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	f = fopen(tmp, "w");
	if (!f)
		return -errno;
	/* Beyond what list shows: what recover needs to serve the same way. */
	fprintf(f, "pid=%d\nformat=%s\nread_only=%d\nimage=%s\noverlay=%d\n"
		"cache_size=%llu\nsize=%llu\nsnapshot=%s\nprobed=%d\n", (int)getpid(), fmt,
		a->read_only, a->image ? a->image : "", a->overlay,
		(unsigned long long)a->cache_bytes, (unsigned long long)a->null_size,
		a->snapshot ? a->snapshot : "", a->probed);
	if (fclose(f))
		ret = -errno;
	if (!ret && rename(tmp, path))
		ret = -errno;
	if (ret)
		unlink(tmp);
	return ret;
}

struct dev_record {
	int pid;
	bool read_only;
	bool overlay;
	bool probed;
	uint64_t cache_bytes;
	uint64_t null_size;
	char format[16];
	char image[PATH_MAX];
	char snapshot[256];
};

static void copy_str(char *dst, size_t size, const char *src)
{
	size_t n = strnlen(src, size - 1);

	memcpy(dst, src, n);
	dst[n] = '\0';
}

/* Read device @dev_id's record. 0, or -ENOENT when the daemon left none. */
static int info_read(uint32_t dev_id, struct dev_record *r)
{
	char path[64], line[PATH_MAX + 16];
	FILE *f;

	memset(r, 0, sizeof(*r));
	info_path(path, sizeof(path), dev_id);
	f = fopen(path, "r");
	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		line[strcspn(line, "\n")] = '\0';
		if (!strncmp(line, "pid=", 4))
			r->pid = atoi(line + 4);
		else if (!strncmp(line, "read_only=", 10))
			r->read_only = atoi(line + 10);
		else if (!strncmp(line, "format=", 7))
			copy_str(r->format, sizeof(r->format), line + 7);
		else if (!strncmp(line, "image=", 6))
			copy_str(r->image, sizeof(r->image), line + 6);
		else if (!strncmp(line, "overlay=", 8))
			r->overlay = atoi(line + 8);
		else if (!strncmp(line, "cache_size=", 11))
			r->cache_bytes = strtoull(line + 11, NULL, 10);
		else if (!strncmp(line, "size=", 5))
			r->null_size = strtoull(line + 5, NULL, 10);
		else if (!strncmp(line, "snapshot=", 9))
			copy_str(r->snapshot, sizeof(r->snapshot), line + 9);
		else if (!strncmp(line, "probed=", 7))
			r->probed = atoi(line + 7);
	}
	fclose(f);
	return 0;
}

/* ---- add ------------------------------------------------------------------ */

static void add_usage(FILE *f)
{
	fprintf(f,
		"usage: " UQ_PROG " add [-n ID] [-q QUEUES] [-d DEPTH] [-f qcow2|raw] [--read-only]\n"
		"                      [--overlay] [--snapshot NAME] [--cache-size BYTES]\n"
		"                      [--recovery] [--no-user-copy] [--no-zero-copy] [--foreground]\n"
		"                      [--no-backing] IMAGE\n"
		"       " UQ_PROG " add -t null [--size BYTES] [-n ID] [-q QUEUES] [-d DEPTH]\n"
		"\n"
		"Serve IMAGE as /dev/ublkbN (printed) from a daemon.\n"
		"\n"
		"  -n ID              device id (default: the first free one)\n"
		"  -q QUEUES          queues, one thread each (default %d, at most %d)\n"
		"  -d DEPTH           requests in flight per queue (default %d, at most %d)\n"
		"  -f FMT             image format: qcow2 or raw (default: detected)\n"
		"  -t null            no image: a device that completes everything at once\n"
		"  --size BYTES       size of the null device (default 250G)\n"
		"  --read-only        a read-only device; the image is opened read-only\n"
		"  --snapshot NAME    serve qcow2 internal snapshot NAME (id or name), read-only\n"
		"  --overlay          writes go to a throw-away qcow2 overlay (in $TMPDIR,\n"
		"                     default /var/tmp, gone with the device); IMAGE is only read\n"
		"  --cache-size BYTES qcow2 metadata memory: the L1 and refcount tables (held\n"
		"                     whole) count against it, the rest caches L2 tables (a\n"
		"                     quarter of BYTES at least); default: L2 cache enough for\n"
		"                     the image, up to 32M; at most 8G\n"
		"  --foreground       serve from this process instead of a daemon\n"
		"  --recovery         if the daemon dies, the device waits (I/O queued) for\n"
		"                     '" UQ_PROG " recover -n ID'; every write is flushed\n"
		"                     before it completes, so none is lost with the daemon\n"
		"  --no-user-copy     have the driver copy the data (NEED_GET_DATA) even where it\n"
		"                     offers UBLK_F_USER_COPY (6.4+), which is the default there\n"
		"  --no-zero-copy     copy the data through user memory even where the driver\n"
		"                     offers UBLK_F_AUTO_BUF_REG (6.16+), with which the raw\n"
		"                     target reads and writes the requests' own pages\n"
		UQ_KEY_HELP
		"  --no-backing       refuse an IMAGE that names a backing file (untrusted images)\n"
		"  -h, --help         show this help\n",
		DEF_QUEUES, UBLK_MAX_QUEUES, DEF_DEPTH, UBLK_MAX_DEPTH);
}

static int parse_uint(const char *cmd, const char *what, const char *s, unsigned int lo,
		      unsigned int hi, unsigned int *out)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi) {
		uq_err("%s: %s must be a number from %u to %u, not '%s'", cmd, what, lo, hi, s);
		return -EINVAL;
	}
	*out = (unsigned int)v;
	return 0;
}

/* -n of add, del, list and recover. 0, or -EINVAL with one error line printed. */
static int parse_dev_id(const char *cmd, const char *s, unsigned int *id)
{
	/* The driver's ids are below UBLK_MAX_UBLKS (1 << 20). */
	return parse_uint(cmd, "the device id", s, 0, (1u << 20) - 1, id);
}

static int add_parse(struct add_args *a, int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "read-only", no_argument, NULL, 'R' },
		{ "cache-size", required_argument, NULL, 'C' },
		{ "snapshot", required_argument, NULL, 'P' },
		{ "size", required_argument, NULL, 'S' },
		{ "foreground", no_argument, NULL, 'F' },
		{ "overlay", no_argument, NULL, 'O' },
		{ "recovery", no_argument, NULL, 'V' },
		{ "no-user-copy", no_argument, NULL, 'U' },
		{ "no-zero-copy", no_argument, NULL, 'Z' },
		{ "help", no_argument, NULL, 'h' },
		UQ_KEY_LONGOPTS,
		UQ_NO_BACKING_LONGOPT,
		{ NULL, 0, NULL, 0 },
	};
	unsigned int id;
	int opt;

	memset(a, 0, sizeof(*a));
	a->dev_id = -1;
	a->nr_queues = DEF_QUEUES;
	a->depth = DEF_DEPTH;
	while ((opt = uq_getopt(argc, argv, ":n:q:d:f:t:h", longopts)) != -1) {
		switch (opt) {
		case 'n':
			if (parse_dev_id("add", optarg, &id))
				return 1;
			a->dev_id = (int)id;
			break;
		case 'q':
			if (parse_uint("add", "-q", optarg, 1, UBLK_MAX_QUEUES, &a->nr_queues))
				return 1;
			break;
		case 'd':
			if (parse_uint("add", "-d", optarg, 1, UBLK_MAX_DEPTH, &a->depth))
				return 1;
			break;
		case 'f':
			if (strcmp(optarg, "qcow2") && strcmp(optarg, "raw")) {
				uq_err("add: unknown format '%s' (qcow2 or raw)", optarg);
				return 1;
			}
			a->fmt = optarg;
			break;
		case 't':
			if (strcmp(optarg, "null")) {
				uq_err("add: unknown target '%s' (only null)", optarg);
				return 1;
			}
			a->null_tgt = true;
			break;
		case 'R':
			a->read_only = true;
			break;
		case 'P':
			a->snapshot = optarg;
			a->read_only = true;
			break;
		case 'C':
		case 'S':
			if (uq_parse_size(optarg, opt == 'C' ? &a->cache_bytes : &a->null_size)) {
				uq_err("add: invalid size '%s'", optarg);
				return 1;
			}
			/* Refused here: the daemon would only say so after the device exists. */
			if (opt == 'C' && a->cache_bytes > QCOW2_MAX_CACHE_BYTES) {
				uq_err("add: --cache-size '%s' too large (at most %lluG)", optarg,
				       QCOW2_MAX_CACHE_BYTES >> 30);
				return 1;
			}
			break;
		case 'F':
			a->foreground = true;
			break;
		case 'O':
			a->overlay = true;
			break;
		case 'V':
			a->recovery = true;
			break;
		case 'U':
			a->no_user_copy = true;
			break;
		case 'Z':
			a->no_zero_copy = true;
			break;
		case UQ_OPT_FAILED:
			return 1;
		case 'h':
			add_usage(stdout);
			return -1;
		default:
			return uq_usage_error("add", argv, opt);
		}
	}
	if (argc - optind != (a->null_tgt ? 0 : 1))
		return uq_usage_args("add", a->null_tgt ? "no IMAGE with -t null" : "one IMAGE");
	if (a->overlay && a->null_tgt) {
		uq_err("add: --overlay needs an IMAGE");
		return 1;
	}
	if (a->overlay && a->snapshot) {
		uq_err("%s: --overlay and --snapshot cannot be combined", argv[optind]);
		return 1;
	}
	if (a->overlay && a->recovery) {
		uq_err("%s: --overlay and --recovery cannot be combined (the overlay dies with"
		       " the daemon)", argv[optind]);
		return 1;
	}
	return 0;
}

/* Block the stop signals in every thread; they arrive on the returned signalfd. */
static int stop_signals(void)
{
	sigset_t set;

	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGHUP);
	if (pthread_sigmask(SIG_BLOCK, &set, NULL))
		return -EINVAL;
	signal(SIGPIPE, SIG_IGN);
	return signalfd(-1, &set, SFD_CLOEXEC);
}

/* Daemon: drop the terminal, keeping a log of what goes wrong later. */
static void detach_stdio(uint32_t dev_id)
{
	char path[64];
	int fd = open("/dev/null", O_RDWR);

	if (fd >= 0) {
		dup2(fd, STDIN_FILENO);
		dup2(fd, STDOUT_FILENO);
		close(fd);
	}
	snprintf(path, sizeof(path), RUN_DIR "/%u.log", dev_id);
	fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
	if (fd < 0)
		fd = open("/dev/null", O_WRONLY);
	if (fd >= 0) {
		dup2(fd, STDERR_FILENO);
		close(fd);
	}
}

static const char *add_fmt(const struct add_args *a)
{
	return a->null_tgt ? "null" : a->fmt;
}

/* Said once the device is live, so that a failing add still says one line. */
static void warn_probed(const struct add_args *a)
{
	if (a->probed && !a->recover && !a->read_only && !a->overlay && !strcmp(a->fmt, "raw"))
		uq_warn("%s: no format given and it is not qcow2, so it is served as raw; "
			"writes that would make its first sector a qcow2 header are refused "
			"(-f raw lifts this)", a->image);
}

/*
 * Create, start and serve the device. @report_fd (-1 in the foreground)
 * gets the device id once it is live. Returns the exit status.
 */
static int add_serve(struct add_args *a, int report_fd)
{
	struct uq_qcow2_opts qopts = {
		.cache_bytes = a->cache_bytes,
		.snapshot = a->snapshot,
		.write_through = a->recovery,
	};
	struct ublk_raw_opts raw_opts = { .probed = a->probed };
	struct ublk_dev_cfg cfg = {
		.dev_id = a->dev_id,
		.nr_queues = a->nr_queues,
		.depth = a->depth,
		.max_io_bytes = UBLK_DEF_IO_BYTES,
		.read_only = a->read_only,
		.recovery = a->recovery,
		.no_user_copy = a->no_user_copy,
		.no_zero_copy = a->no_zero_copy,
	};
	struct ublk_tgt tgt = { .path = a->image };
	const struct ublksrv_ctrl_dev_info *info;
	struct ublk_ctrl *ctrl;
	struct ublk_dev *dev;
	int32_t id;
	int sig_fd, ret, status = 1, overlay_fd = -1;
	char path[64], overlay_path[64], err[512];

	qopts.nr_keys = uq_keys_get(&qopts.keys);
	qopts.max_backing = uq_max_backing(a->overlay ? UQ_OPEN_OVERLAY : 0);
	if (a->overlay) {
		/* Created here, in the daemon: the file dies with this process. */
		if (uq_overlay_create(a->image, a->fmt, &overlay_fd, overlay_path,
				      sizeof(overlay_path), err, sizeof(err)) < 0) {
			uq_err("%s", err);
			return 1;
		}
		tgt.path = overlay_path;
		tgt.ops = &uq_qcow2_ops;
		tgt.opts = &qopts;
	} else if (a->null_tgt) {
		tgt.ops = &ublk_null_ops;
		tgt.opts = &a->null_size;
	} else if (!strcmp(a->fmt, "raw")) {
		tgt.ops = &ublk_raw_ops;
		tgt.opts = &raw_opts;
	} else {
		tgt.ops = &uq_qcow2_ops;
		tgt.opts = &qopts;
	}
	/* The ublk library's error lines go where ours go (syslog once detached). */
	ublk_set_log(uq_log_line);
	sig_fd = stop_signals();
	if (sig_fd < 0) {
		uq_err("add: signalfd: %s", strerror(errno));
		goto out_overlay;
	}
	if (ctrl_open(&ctrl))
		goto out_sig;
	if (a->recover)
		ret = ublk_dev_recover(&dev, ctrl, (uint32_t)a->dev_id, &cfg, &tgt);
	else
		ret = ublk_dev_create(&dev, ctrl, &cfg, &tgt);
	if (ret) {
		if (tgt.err[0])
			uq_err("%s", tgt.err);
		else if (a->recover && ret == -EBUSY)
			uq_err("recover: /dev/ublkb%d did not become recoverable in 30 s"
			       " (its daemon still alive?)", a->dev_id);
		else if (a->recover)
			uq_err("recover: cannot recover /dev/ublkb%d: %s", a->dev_id,
			       strerror(-ret));
		else if (ret == -EEXIST)
			uq_err("add: ublk device %d exists already", a->dev_id);
		else if (ret == -EOPNOTSUPP && a->recovery)
			uq_err("add: --recovery: the ublk driver has no USER_RECOVERY(_REISSUE)");
		else
			uq_err("add: cannot create the ublk device: %s", strerror(-ret));
		goto out_ctrl;
	}
	info = ublk_dev_info(dev);
	uq_debug("add: created /dev/ublkc%u for %s (%s): %u queues of depth %u, flags 0x%llx",
		 info->dev_id, a->null_tgt ? "null" : a->image, add_fmt(a), info->nr_hw_queues,
		 info->queue_depth, (unsigned long long)info->flags);
	ret = ublk_dev_start(dev);
	if (ret) {
		uq_err("%s: cannot start /dev/ublkb%u: %s", a->recover ? "recover" : "add",
		       info->dev_id, strerror(-ret));
		ublk_dev_destroy(dev);
		goto out_ctrl;
	}
	ret = info_write(a, info, add_fmt(a));
	if (ret)
		uq_err("add: cannot write " RUN_DIR ": %s", strerror(-ret));
	if (report_fd >= 0) {
		detach_stdio(info->dev_id);
		uq_log_syslog();
		id = (int32_t)info->dev_id;
		/* A parent gone by now leaves the device serving, as list shows. */
		if (write(report_fd, &id, sizeof(id)) != sizeof(id))
			uq_err("add: cannot report /dev/ublkb%d: %s", id, strerror(errno));
		close(report_fd);
	} else {
		warn_probed(a);
		printf("/dev/ublkb%u\n", info->dev_id);
		fflush(stdout);
	}

	status = 0;
	uq_debug("add: /dev/ublkb%u is live, served by pid %d", info->dev_id, (int)getpid());
	ret = ublk_dev_wait(dev, sig_fd);
	if (ret) {
		uq_err("/dev/ublkb%u: a queue failed: %s", info->dev_id, strerror(-ret));
		status = 1;
	}
	info_path(path, sizeof(path), info->dev_id);
	id = (int32_t)info->dev_id;
	uq_debug("add: stopping /dev/ublkb%d: flushing the image, deleting the device", id);
	ret = ublk_dev_destroy(dev);
	if (ret) {
		uq_err("/dev/ublkb%d: stopping: %s", id, strerror(-ret));
		status = 1;
	}
	unlink(path);
out_ctrl:
	ublk_ctrl_close(ctrl);
out_sig:
	close(sig_fd);
out_overlay:
	if (overlay_fd >= 0)
		close(overlay_fd);
	return status;
}

/* Daemon: close what the caller let us inherit (a harness waits for EOF on it). */
static void close_inherited(int keep)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;

	if (!d)
		return;
	while ((e = readdir(d))) {
		int fd = atoi(e->d_name);

		if (fd > STDERR_FILENO && fd != keep && fd != dirfd(d))
			close(fd);
	}
	closedir(d);
}

/* Fork the daemon; print the device once it is live. Returns the exit status. */
static int add_daemonize(struct add_args *a)
{
	int p[2], status = 1;
	int32_t id = -1;
	pid_t pid;
	ssize_t n;

	if (pipe2(p, O_CLOEXEC)) {
		uq_err("add: pipe: %s", strerror(errno));
		return 1;
	}
	pid = fork();
	if (pid < 0) {
		uq_err("add: fork: %s", strerror(errno));
		close(p[0]);
		close(p[1]);
		return 1;
	}
	if (pid == 0) {
		close(p[0]);
		setsid();
		pid = fork();
		if (pid)
			_exit(pid < 0);
		/* Hold no mount busy; the image path is absolute. */
		if (chdir("/"))
			_exit(1);
		close_inherited(p[1]);
		_exit(add_serve(a, p[1]));
	}
	close(p[1]);
	do {
		n = read(p[0], &id, sizeof(id));
	} while (n < 0 && errno == EINTR);
	close(p[0]);
	waitpid(pid, NULL, 0);
	if (n == sizeof(id) && id >= 0) {
		warn_probed(a);
		printf("/dev/ublkb%d\n", id);
		status = 0;
	}
	return status;
}

int cmd_add(int argc, char **argv)
{
	struct uq_image *img;
	struct add_args a;
	char err[512];
	enum uq_fmt fmt;
	int ret;

	ret = add_parse(&a, argc, argv);
	if (ret)
		goto out;
	ret = 1;
	if (!a.null_tgt) {
		/* The daemon leaves the working directory: keep the path absolute. */
		a.image = realpath(argv[optind], NULL);
		if (!a.image) {
			uq_err("%s: %s", argv[optind], strerror(errno));
			goto out;
		}
	}
	if (!a.null_tgt && !a.fmt) {
		if (uq_probe(a.image, &fmt, err, sizeof(err))) {
			uq_err("%s", err);
			goto out;
		}
		a.fmt = uq_fmt_name(fmt);
		a.probed = true;
	}
	if (a.snapshot && (a.null_tgt || strcmp(a.fmt, "qcow2"))) {
		uq_err("%s: --snapshot needs a qcow2 image", a.null_tgt ? "add" : argv[optind]);
		goto out;
	}
	if (!a.null_tgt) {
		/*
		 * What the daemon would refuse (a bad image, a missing backing
		 * file, an unknown snapshot) is said before the driver is touched.
		 * Metadata only: a key is the daemon's to try.
		 */
		if (uq_image_open_snapshot(&img, argv[optind], a.fmt, a.snapshot, UQ_OPEN_NO_KEY,
					   NULL, err, sizeof(err)) < 0) {
			uq_err("%s", err);
			goto out;
		}
		uq_image_close(img);
	}
	if (!have_control())
		goto out;
	ret = a.foreground ? add_serve(&a, -1) : add_daemonize(&a);
out:
	free(a.image);
	return ret < 0 ? 0 : ret;
}

/* ---- del ------------------------------------------------------------------ */

static void del_usage(FILE *f)
{
	fprintf(f,
		"usage: " UQ_PROG " del -n ID | -a\n"
		"\n"
		"Stop and delete /dev/ublkbID (or every ublk device), waiting for its daemon\n"
		"to flush the image and exit.\n"
		"\n"
		"  -n ID       the device\n"
		"  -a          every device\n"
		"  -h, --help  show this help\n");
}

/* Wait up to @ms for process @pid to exit. true if it did. */
static bool pid_wait_exit(pid_t pid, int ms)
{
	struct timespec ts = { .tv_nsec = 20 * 1000 * 1000 };
	int fd = (int)syscall(SYS_pidfd_open, pid, 0);
	struct pollfd pfd;
	int ret;

	if (fd >= 0) {
		pfd.fd = fd;
		pfd.events = POLLIN;
		do {
			ret = poll(&pfd, 1, ms);
		} while (ret < 0 && errno == EINTR);
		close(fd);
		return ret > 0;
	}
	if (errno == ESRCH)
		return true;
	for (; ms > 0; ms -= 20) {
		if (kill(pid, 0) && errno == ESRCH)
			return true;
		nanosleep(&ts, NULL);
	}
	return false;
}

/* Stop and delete one device. 0 or -errno (already reported). */
static int del_one(struct ublk_ctrl *c, uint32_t dev_id, bool quiet_missing)
{
	struct ublksrv_ctrl_dev_info info;
	char path[64];
	pid_t pid;
	int ret;

	ret = ublk_ctrl_get_info(c, dev_id, &info);
	if (ret == -ENODEV) {
		if (!quiet_missing)
			uq_err("del: no ublk device %u", dev_id);
		return ret;
	}
	if (ret) {
		uq_err("del: ublk device %u: %s", dev_id, strerror(-ret));
		return ret;
	}
	pid = info.ublksrv_pid;
	uq_debug("del: stopping /dev/ublkb%u (state %s, daemon pid %d)", dev_id,
		 ublk_state_name(info.state), (int)pid);
	ret = ublk_ctrl_stop_dev(c, dev_id);
	if (ret)
		uq_err("del: stopping /dev/ublkb%u: %s", dev_id, strerror(-ret));
	/* The daemon sees its queues abort, flushes the image and deletes the device. */
	if (pid > 0 && !pid_wait_exit(pid, DEL_WAIT_MS))
		uq_err("del: daemon %d of /dev/ublkb%u did not exit; deleting anyway",
		       (int)pid, dev_id);
	ret = ublk_ctrl_get_info(c, dev_id, &info);
	if (ret == -ENODEV)
		return 0;
	/* A live device with another daemon is a new one that took the id. */
	if (!ret && info.state == UBLK_S_DEV_LIVE && info.ublksrv_pid != pid)
		return 0;
	ret = ublk_ctrl_del_dev(c, dev_id);
	if (ret && ret != -ENODEV) {
		uq_err("del: deleting ublk device %u: %s", dev_id, strerror(-ret));
		return ret;
	}
	/* A daemon that was killed left its record behind. */
	info_path(path, sizeof(path), dev_id);
	unlink(path);
	return 0;
}

int cmd_del(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	uint32_t ids[256];
	struct ublk_ctrl *c;
	unsigned int id = 0;
	bool all = false, one = false;
	int opt, n, i, status = 0;

	while ((opt = getopt_long(argc, argv, ":n:ah", longopts, NULL)) != -1) {
		switch (opt) {
		case 'n':
			if (parse_dev_id("del", optarg, &id))
				return 1;
			one = true;
			break;
		case 'a':
			all = true;
			break;
		case 'h':
			del_usage(stdout);
			return 0;
		default:
			return uq_usage_error("del", argv, opt);
		}
	}
	if (optind != argc)
		return uq_usage_args("del", "no arguments but -n ID or -a");
	if (one == all)
		return uq_usage_args("del", "one of -n ID and -a");
	if (ctrl_open(&c))
		return 1;
	if (one) {
		status = del_one(c, id, false) ? 1 : 0;
	} else {
		n = ublk_dev_ids(ids, 256);
		if (n < 0) {
			uq_err("del: /sys/class/ublk-char: %s", strerror(-n));
			status = 1;
		}
		for (i = 0; i < n && i < 256; i++)
			if (del_one(c, ids[i], true) && status == 0)
				status = 1;
	}
	ublk_ctrl_close(c);
	return status;
}

/* ---- list ----------------------------------------------------------------- */

static void list_usage(FILE *f)
{
	fprintf(f,
		"usage: " UQ_PROG " list [-n ID] [--output=human|json]\n"
		"\n"
		"Show the ublk devices: state, image, queues, depth, daemon and features.\n"
		"\n"
		"  -n ID           only this device\n"
		"  --output=FMT    human (default) or json\n"
		"  -h, --help      show this help\n");
}

struct dev_view {
	struct ublksrv_ctrl_dev_info info;
	uint64_t size;
	bool have_rec;
	struct dev_record rec;
};

static void list_features(FILE *f, uint64_t flags, struct uq_json *j)
{
	unsigned int bit;

	for (bit = 0; bit < 64; bit++) {
		const char *name = ublk_feature_name(bit);
		char unknown[16];

		if (!(flags & (1ULL << bit)))
			continue;
		if (!name) {
			snprintf(unknown, sizeof(unknown), "bit%u", bit);
			name = unknown;
		}
		if (j)
			uq_json_string(j, NULL, name);
		else
			fprintf(f, " %s", name);
	}
}

static void list_human(const struct dev_view *v)
{
	const struct ublksrv_ctrl_dev_info *i = &v->info;
	char size[32];

	uq_size_str(v->size, size, sizeof(size));
	printf("dev %u: /dev/ublkb%u  state %s  size %s  queues %u  depth %u  pid %d\n",
	       i->dev_id, i->dev_id, ublk_state_name(i->state), size, i->nr_hw_queues,
	       i->queue_depth, i->ublksrv_pid);
	if (v->have_rec && v->rec.image[0])
		printf("\timage %s (%s%s)\n", v->rec.image, v->rec.format,
		       v->rec.read_only ? ", read-only" : "");
	else if (v->have_rec)
		printf("\ttarget %s\n", v->rec.format);
	printf("\tfeatures 0x%llx:", (unsigned long long)i->flags);
	list_features(stdout, i->flags, NULL);
	printf("\n");
}

static void list_json(struct uq_json *j, const struct dev_view *v)
{
	const struct ublksrv_ctrl_dev_info *i = &v->info;
	char dev[32];

	snprintf(dev, sizeof(dev), "/dev/ublkb%u", i->dev_id);
	uq_json_open(j, NULL, '{');
	uq_json_int(j, "id", i->dev_id);
	uq_json_string(j, "device", dev);
	uq_json_string(j, "state", ublk_state_name(i->state));
	uq_json_string(j, "image", v->have_rec ? v->rec.image : "");
	uq_json_string(j, "format", v->have_rec ? v->rec.format : "");
	uq_json_bool(j, "read-only", v->have_rec && v->rec.read_only);
	uq_json_int(j, "size", v->size);
	uq_json_int(j, "queues", i->nr_hw_queues);
	uq_json_int(j, "depth", i->queue_depth);
	uq_json_int(j, "pid", i->ublksrv_pid > 0 ? (uint64_t)i->ublksrv_pid : 0);
	uq_json_int(j, "flags", i->flags);
	uq_json_open(j, "features", '[');
	list_features(NULL, i->flags, j);
	uq_json_close(j, ']');
	uq_json_close(j, '}');
}

static int dev_view_get(struct ublk_ctrl *c, uint32_t dev_id, struct dev_view *v)
{
	struct ublk_params p;
	int ret;

	ret = ublk_ctrl_get_info(c, dev_id, &v->info);
	if (ret)
		return ret;
	v->size = ublk_ctrl_get_params(c, dev_id, &p) ? 0 : p.basic.dev_sectors << 9;
	v->have_rec = info_read(dev_id, &v->rec) == 0;
	return 0;
}

int cmd_list(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "output", required_argument, NULL, 'O' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct uq_json j = { .f = stdout };
	uint32_t ids[256];
	struct ublk_ctrl *c;
	struct dev_view v;
	unsigned int id = 0;
	bool one = false, json = false;
	int opt, n, i, ret, status = 0;

	while ((opt = getopt_long(argc, argv, ":n:h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'n':
			if (parse_dev_id("list", optarg, &id))
				return 1;
			one = true;
			break;
		case 'O':
			if (uq_parse_output("list", optarg, &json))
				return 1;
			break;
		case 'h':
			list_usage(stdout);
			return 0;
		default:
			return uq_usage_error("list", argv, opt);
		}
	}
	if (optind != argc)
		return uq_usage_args("list", "no arguments but -n ID");
	if (ctrl_open(&c))
		return 1;
	if (one) {
		ids[0] = id;
		n = 1;
	} else {
		n = ublk_dev_ids(ids, 256);
		if (n < 0) {
			uq_err("list: /sys/class/ublk-char: %s", strerror(-n));
			n = 0;
			status = 1;
		}
	}
	if (json)
		uq_json_open(&j, NULL, '[');
	for (i = 0; i < n && i < 256; i++) {
		ret = dev_view_get(c, ids[i], &v);
		if (ret) {
			/* Gone between the listing and the query: not an error. */
			if (one || ret != -ENODEV) {
				uq_err("list: ublk device %u: %s", ids[i],
				       ret == -ENODEV ? "no such device" : strerror(-ret));
				status = 1;
			}
			continue;
		}
		if (json)
			list_json(&j, &v);
		else
			list_human(&v);
	}
	if (json)
		uq_json_close(&j, ']');
	ublk_ctrl_close(c);
	return status;
}

/* ---- features ------------------------------------------------------------- */

int cmd_features(int argc, char **argv)
{
	struct ublk_ctrl *c;
	uint64_t features;
	unsigned int bit;
	int ret;

	if (argc > 1) {
		if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
			printf("usage: " UQ_PROG " features\n\n"
			       "Print the ublk feature bits of the running kernel by name.\n");
			return 0;
		}
		uq_err("features: takes no arguments (see '" UQ_PROG " features --help')");
		return 1;
	}
	if (ctrl_open(&c))
		return 1;
	ret = ublk_ctrl_get_features(c, &features);
	ublk_ctrl_close(c);
	if (ret == -EOPNOTSUPP) {
		/* 6.1-6.4: no GET_FEATURES; what ADD_DEV accepts is all we know. */
		printf("features: unknown (no GET_FEATURES: ublk driver older than Linux 6.5;"
		       " legacy opcodes, NEED_GET_DATA and USER_RECOVERY assumed)\n");
		return 0;
	}
	if (ret) {
		uq_err("features: GET_FEATURES: %s", strerror(-ret));
		return 1;
	}
	printf("features: 0x%llx\n", (unsigned long long)features);
	for (bit = 0; bit < 64; bit++) {
		const char *name = ublk_feature_name(bit);

		if (!(features & (1ULL << bit)))
			continue;
		if (name)
			printf("%s\n", name);
		else
			printf("bit%u\n", bit);
	}
	return 0;
}

/* ---- recover -------------------------------------------------------------- */

static void recover_usage(FILE *f)
{
	fprintf(f,
		"usage: " UQ_PROG " recover -n ID [--foreground]\n"
		"\n"
		"Serve /dev/ublkbID again after its daemon died (killed, crashed): the\n"
		"device must have been added with --recovery. A new daemon opens the same\n"
		"image the same way (from " RUN_DIR "/ID.info) and takes over the\n"
		"queued I/O; prints the device like add.\n"
		"\n"
		"  -n ID         the device\n"
		"  --foreground  serve from this process instead of a daemon\n"
		UQ_KEY_HELP
		"  -h, --help    show this help\n");
}

#define RECOVER_EXIT_WAIT_MS	2000

/*
 * Is the device's daemon still there? A pid the kernel keeps may be stale;
 * one just killed may still be exiting ("kill -9 PID; recover -n ID").
 */
static bool daemon_alive(pid_t pid)
{
	if (pid <= 0 || (kill(pid, 0) && errno != EPERM))
		return false;
	return !pid_wait_exit(pid, RECOVER_EXIT_WAIT_MS);
}

/*
 * Can device @id be recovered, and how was it served? Fills @a from its
 * record. 0, or 1 with the reason printed.
 */
static int recover_prepare(uint32_t id, struct add_args *a, struct dev_record *rec)
{
	struct ublksrv_ctrl_dev_info info;
	struct ublk_ctrl *c;
	int ret;

	if (ctrl_open(&c))
		return 1;
	ret = ublk_ctrl_get_info(c, id, &info);
	ublk_ctrl_close(c);
	if (ret == -ENODEV) {
		uq_err("recover: no ublk device %u", id);
		return 1;
	}
	if (ret) {
		uq_err("recover: ublk device %u: %s", id, strerror(-ret));
		return 1;
	}
	if (!(info.flags & UBLK_F_USER_RECOVERY)) {
		uq_err("recover: /dev/ublkb%u was not added with --recovery", id);
		return 1;
	}
	if (info.state == UBLK_S_DEV_DEAD) {
		uq_err("recover: /dev/ublkb%u is not started (state DEAD)", id);
		return 1;
	}
	/* 6.1 still says LIVE for a few seconds after its daemon died. */
	if (info.state == UBLK_S_DEV_LIVE && daemon_alive(info.ublksrv_pid)) {
		uq_err("recover: /dev/ublkb%u is served by its live daemon %d", id,
		       (int)info.ublksrv_pid);
		return 1;
	}
	if (info_read(id, rec)) {
		uq_err("recover: /dev/ublkb%u: no record in " RUN_DIR ", so what it served"
		       " is unknown", id);
		return 1;
	}
	if (rec->overlay) {
		uq_err("recover: /dev/ublkb%u served a throw-away overlay, which died with"
		       " its daemon", id);
		return 1;
	}
	a->dev_id = (int)id;
	a->recover = true;
	a->recovery = true;
	a->read_only = rec->read_only;
	a->cache_bytes = rec->cache_bytes;
	a->null_size = rec->null_size;
	a->snapshot = rec->snapshot[0] ? rec->snapshot : NULL;
	a->probed = rec->probed;
	if (!strcmp(rec->format, "null")) {
		a->null_tgt = true;
	} else if (!strcmp(rec->format, "qcow2") || !strcmp(rec->format, "raw")) {
		a->fmt = rec->format;
		a->image = strdup(rec->image);
		if (!a->image) {
			uq_err("recover: %s", strerror(ENOMEM));
			return 1;
		}
	} else {
		uq_err("recover: /dev/ublkb%u: unknown format '%s' in its record", id,
		       rec->format);
		return 1;
	}
	return 0;
}

int cmd_recover(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "foreground", no_argument, NULL, 'F' },
		{ "help", no_argument, NULL, 'h' },
		UQ_KEY_LONGOPTS,
		{ NULL, 0, NULL, 0 },
	};
	struct dev_record rec;
	struct add_args a;
	unsigned int id = 0;
	bool one = false;
	int opt, ret;

	memset(&a, 0, sizeof(a));
	while ((opt = uq_getopt(argc, argv, ":n:h", longopts)) != -1) {
		switch (opt) {
		case 'n':
			if (parse_dev_id("recover", optarg, &id))
				return 1;
			one = true;
			break;
		case 'F':
			a.foreground = true;
			break;
		case UQ_OPT_FAILED:
			return 1;
		case 'h':
			recover_usage(stdout);
			return 0;
		default:
			return uq_usage_error("recover", argv, opt);
		}
	}
	if (optind != argc || !one)
		return uq_usage_args("recover", "-n ID and no other arguments");
	if (!have_control())
		return 1;
	ret = recover_prepare(id, &a, &rec);
	if (!ret)
		ret = a.foreground ? add_serve(&a, -1) : add_daemonize(&a);
	free(a.image);
	return ret;
}
