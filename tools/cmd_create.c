// SPDX-License-Identifier: MIT
/*
 * create: option lists in qemu-img's spelling, the backing file check and
 * raw files. The qcow2 layout itself is the engine's (qcow2_create).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cmds.h"
#include "util.h"

static void create_usage(void)
{
	printf(
		"usage: " UQ_PROG " create [-q] [-f qcow2|raw] [-b BACKING [-F BACKING_FMT]] [-u]\n"
		"                  [-o OPT=VAL,...] IMAGE [SIZE]\n"
		"\n"
		"Create IMAGE (truncating an existing file) of SIZE bytes; SIZE takes k, M,\n"
		"G, T suffixes and defaults to the backing file's size.\n"
		"\n"
		"  -f FMT          image format: qcow2 (default) or raw\n"
		"  -b BACKING      backing file, relative to IMAGE's directory unless absolute\n"
		"  -F BACKING_FMT  its format (default: detected)\n"
		"  -u              do not open the backing file (SIZE is then required)\n"
		"  -q              quiet (accepted for qemu-img's sake: nothing is printed)\n"
		"  -o OPTIONS      comma-separated options, '-o help' lists them\n"
		UQ_KEY_HELP
		"  -h, --help      show this help\n");
}

static void opts_help(void)
{
	printf("Supported options:\n"
	       "  backing_file=<str>     - File name of a base image\n"
	       "  backing_fmt=<str>      - Image format of the base image\n"
	       "  cluster_size=<size>    - qcow2 cluster size (512 to 2M, power of two)\n"
	       "  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])\n"
	       "  compression_type=<str> - Compression method for compressed clusters\n"
	       "                           (zlib or zstd)\n"
	       "  extended_l2=<bool (on/off)> - Extended L2 tables (subclusters)\n"
	       "  lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n"
	       "  preallocation=<str>    - Preallocation mode (off, metadata, falloc, full;\n"
	       "                           raw: off, falloc, full)\n"
	       "  refcount_bits=<num>    - Width of a reference count entry in bits\n"
	       "  encrypt.format=luks    - Encrypt the image (LUKS, as qemu-img)\n"
	       "  encrypt.key-secret=<id> - The --object secret holding the passphrase\n"
	       "  encrypt.cipher-alg=<str> - aes-128, aes-192 or aes-256 (default)\n"
	       "  encrypt.cipher-mode=<str> - xts (default), cbc, ecb or ctr\n"
	       "  encrypt.ivgen-alg=<str> - plain64 (default), plain or essiv\n"
	       "  encrypt.ivgen-hash-alg=<str> - essiv's hash (default sha256)\n"
	       "  encrypt.hash-alg=<str>  - PBKDF2 and splitter hash (default sha256)\n"
	       "  encrypt.iter-time=<ms>  - PBKDF2 time per key (default 2000)\n"
	       "  size=<size>            - Virtual disk size\n");
}

struct opt_ctx {
	struct uq_create *c;
	const char *path;
};

static int bad_value(struct opt_ctx *x, const char *key, const char *val)
{
	uq_err("%s: invalid value '%s' for option '%s'", x->path, val, key);
	return -EINVAL;
}

static int parse_prealloc(const char *val, enum qcow2_prealloc *out)
{
	static const char *const names[] = { "off", "metadata", "falloc", "full" };
	size_t i;

	for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		if (!strcmp(val, names[i])) {
			*out = (enum qcow2_prealloc)i;
			return 0;
		}
	}
	return -EINVAL;
}

/* encrypt.KEY=VAL: checked by the engine when the image is created. */
static int apply_encrypt_opt(struct opt_ctx *x, const char *key, const char *val)
{
	struct qcow2_encrypt_opts *e = &x->c->enc;
	uint64_t n;

	if (!strcmp(key, "format")) {
		if (strcmp(val, "luks")) {
			uq_err("%s: unsupported encryption format '%s' (only luks is created)",
			       x->path, val);
			return -EINVAL;
		}
		e->format = val;
	} else if (!strcmp(key, "key-secret")) {
		x->c->key_secret = val;
	} else if (!strcmp(key, "cipher-alg")) {
		e->cipher_alg = val;
	} else if (!strcmp(key, "cipher-mode")) {
		e->cipher_mode = val;
	} else if (!strcmp(key, "ivgen-alg")) {
		e->ivgen_alg = val;
	} else if (!strcmp(key, "ivgen-hash-alg")) {
		e->ivgen_hash_alg = val;
	} else if (!strcmp(key, "hash-alg")) {
		e->hash_alg = val;
	} else if (!strcmp(key, "iter-time")) {
		if (uq_parse_size(val, &n) < 0 || !n || n > 1000000)
			return bad_value(x, "encrypt.iter-time", val);
		e->iter_time_ms = n;
	} else {
		uq_err("%s: unknown option 'encrypt.%s'", x->path, key);
		return -EINVAL;
	}
	return 0;
}

/*
 * The passphrase for encrypt.*: the named secret, else the first
 * --key-secret/--key-file (or secret object).
 */
static int encrypt_resolve(const char *path, struct uq_create *c)
{
	struct qcow2_encrypt_opts *e = &c->enc;

	if (!e->format && !c->key_secret && !e->cipher_alg && !e->cipher_mode &&
	    !e->ivgen_alg && !e->ivgen_hash_alg && !e->hash_alg && !e->iter_time_ms)
		return 0;
	if (!e->format) {
		uq_err("%s: encryption options need encrypt.format=luks", path);
		return -EINVAL;
	}
	if (c->key_secret) {
		e->key = uq_secret_lookup(c->key_secret, &e->key_len);
		if (!e->key) {
			uq_err("%s: no secret with id '%s' (give it with "
			       "--object secret,id=%s,...)", path, c->key_secret, c->key_secret);
			return -EINVAL;
		}
	} else {
		const struct qcow2_key *keys;

		/* The first of them: the others may open an encrypted backing file. */
		if (uq_keys_get(&keys)) {
			e->key = keys[0].data;
			e->key_len = keys[0].len;
		}
		if (!e->key) {
			uq_err("%s: encryption needs a key (encrypt.key-secret=ID with "
			       "--object, or --key-secret/--key-file)", path);
			return -EINVAL;
		}
	}
	c->o.encrypt = e;
	return 0;
}

/* One "-o" pair; the qcow2-only ones are remembered for raw's error. */
static int apply_opt(void *opaque, const char *key, const char *val)
{
	struct opt_ctx *x = opaque;
	struct qcow2_create_opts *o = &x->c->o;
	uint64_t n;
	bool b;

	if (!strcmp(key, "help"))
		return 1;
	if (!*key) {
		/* qemu-img too: "a=1," and ",a=1" are no option list. */
		uq_err("%s: invalid option list (an empty option)", x->path);
		return -EINVAL;
	}
	if (!val) {
		uq_err("%s: option '%s' needs a value", x->path, key);
		return -EINVAL;
	}
	if (!strcmp(key, "size")) {
		if (uq_parse_size(val, &o->size) < 0)
			return bad_value(x, key, val);
		x->c->size_set = true;
		return 0;
	}
	if (!strcmp(key, "preallocation")) {
		if (parse_prealloc(val, &o->prealloc) < 0)
			return bad_value(x, key, val);
		return 0;
	}
	if (!x->c->qcow2_only)
		x->c->qcow2_only = key;
	if (!strcmp(key, "cluster_size")) {
		if (uq_parse_size(val, &n) < 0 || n < 512 || n > (2u << 20) || (n & (n - 1))) {
			uq_err("%s: cluster size must be a power of two between 512 and 2M", x->path);
			return -EINVAL;
		}
		o->cluster_bits = __builtin_ctzll(n);
	} else if (!strcmp(key, "compat")) {
		if (!strcmp(val, "0.10") || !strcmp(val, "v2"))
			o->version = 2;
		else if (!strcmp(val, "1.1") || !strcmp(val, "v3"))
			o->version = 3;
		else
			return bad_value(x, key, val);
	} else if (!strcmp(key, "refcount_bits")) {
		if (uq_parse_size(val, &n) < 0 || !n || n > 64 || (n & (n - 1))) {
			uq_err("%s: refcount width must be a power of two and at most 64 bits",
			       x->path);
			return -EINVAL;
		}
		o->refcount_bits = n;
	} else if (!strcmp(key, "lazy_refcounts")) {
		if (uq_parse_bool(val, &b) < 0)
			return bad_value(x, key, val);
		o->lazy_refcounts = b;
	} else if (!strcmp(key, "backing_file")) {
		o->backing_file = val;
	} else if (!strcmp(key, "backing_fmt")) {
		o->backing_fmt = val;
	} else if (!strcmp(key, "extended_l2")) {
		if (uq_parse_bool(val, &b) < 0)
			return bad_value(x, key, val);
		o->extended_l2 = b;
	} else if (!strcmp(key, "compression_type")) {
		if (!strcmp(val, "zlib"))
			o->compression_type = 0;
		else if (!strcmp(val, "zstd"))
			o->compression_type = 1;
		else
			return bad_value(x, key, val);
	} else if (!strncmp(key, "encrypt.", 8)) {
		return apply_encrypt_opt(x, key + 8, val);
	} else if (!strcmp(key, "data_file")) {
		o->data_file = val;
	} else if (!strcmp(key, "data_file_raw")) {
		if (uq_parse_bool(val, &b) < 0)
			return bad_value(x, key, val);
		o->data_file_raw = b;
	} else if (!strcmp(key, "encryption")) {
		uq_err("%s: unsupported option '%s'", x->path, key);
		return -EINVAL;
	} else {
		uq_err("%s: unknown option '%s' (see '-o help')", x->path, key);
		return -EINVAL;
	}
	return 0;
}

int uq_create_parse(struct uq_create *c, const char *path, char *list)
{
	struct opt_ctx x = { .c = c, .path = path };
	int ret = uq_parse_opts(list, apply_opt, &x);

	if (ret == 1)
		opts_help();
	return ret;
}

static int raw_prealloc(int fd, const char *path, enum qcow2_prealloc mode, uint64_t size)
{
	static const uint8_t zeros[1 << 16];
	uint64_t off;
	int ret;

	if (mode == QCOW2_PREALLOC_FALLOC && size && fallocate(fd, 0, 0, size) < 0) {
		ret = -errno;
		uq_err("%s: cannot allocate %llu bytes: %s", path, (unsigned long long)size,
		       strerror(-ret));
		return ret;
	}
	if (mode != QCOW2_PREALLOC_FULL)
		return 0;
	for (off = 0; off < size; ) {
		size_t n = size - off < sizeof(zeros) ? size - off : sizeof(zeros);
		ssize_t w = pwrite(fd, zeros, n, off);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			ret = w < 0 ? -errno : -ENOSPC;
			uq_err("%s: cannot write: %s", path, strerror(-ret));
			return ret;
		}
		off += w;
	}
	return 0;
}

static int create_raw(const char *path, const struct qcow2_create_opts *o)
{
	bool created;
	int fd, ret;

	if (o->prealloc == QCOW2_PREALLOC_METADATA) {
		uq_err("%s: unsupported preallocation mode 'metadata' for raw images", path);
		return -EINVAL;
	}
	fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	created = fd >= 0;
	if (fd < 0 && errno == EEXIST)
		fd = open(path, O_RDWR | O_TRUNC | O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		uq_err("%s: cannot create: %s", path, strerror(-ret));
		return ret;
	}
	ret = raw_prealloc(fd, path, o->prealloc, o->size);
	if (!ret && ftruncate(fd, o->size) < 0) {
		ret = -errno;
		uq_err("%s: cannot resize: %s", path, strerror(-ret));
	}
	/*
	 * QEMU's file driver writes the first block of a file it grows from
	 * empty (for its alignment probe): 4 KiB, or 512 bytes of a smaller
	 * file. The same blocks in use make the same actual-size.
	 */
	if (!ret && o->size && o->prealloc != QCOW2_PREALLOC_FULL) {
		static const uint8_t zeros[4096];
		size_t n = o->size < sizeof(zeros) ? 512 : sizeof(zeros);
		ssize_t w = pwrite(fd, zeros, n, 0);

		if (w != (ssize_t)n) {
			ret = w < 0 ? -errno : -ENOSPC;
			uq_err("%s: cannot write: %s", path, strerror(-ret));
		}
	}
	if (!ret && fsync(fd) < 0) {
		ret = -errno;
		uq_err("%s: cannot sync: %s", path, strerror(-ret));
	}
	close(fd);
	if (ret < 0 && created)
		unlink(path);
	return ret;
}

int uq_create_image(const char *path, struct uq_create *c)
{
	struct qcow2_io *io;
	char err[512];
	int ret;

	if (c->o.size > UINT64_MAX - 511) {
		uq_err("%s: image size is too large", path);
		return -EFBIG;
	}
	c->o.size = (c->o.size + 511) & ~511ull;
	uq_debug("creating %s: %s, %llu bytes%s%s", path, uq_fmt_name(c->fmt),
		 (unsigned long long)c->o.size, c->o.backing_file ? ", backing file " : "",
		 c->o.backing_file ? c->o.backing_file : "");
	ret = encrypt_resolve(path, c);
	if (ret < 0)
		return ret;
	if (c->fmt == UQ_FMT_RAW) {
		if (c->qcow2_only) {
			uq_err("%s: option '%s' is not supported for raw images", path,
			       c->qcow2_only);
			return -EINVAL;
		}
		return create_raw(path, &c->o);
	}
	io = qcow2_uring_new(8);
	if (!io) {
		uq_err("%s: cannot set up io_uring", path);
		return -ENOMEM;
	}
	ret = qcow2_create(path, &c->o, io, err, sizeof(err));
	if (ret < 0)
		uq_err("%s", err);
	qcow2_uring_free(io);
	return ret;
}

/*
 * Check the backing file the way qemu-img does: open it, take its size if
 * none was given, and record its format when -F was left out.
 */
static int check_backing(const char *path, struct uq_create *c, char **fmt_out)
{
	struct uq_image *b;
	char *bpath, err[512];
	struct stat a, s;
	int ret;

	bpath = uq_backing_path(path, c->o.backing_file);
	if (!bpath) {
		uq_err("%s: out of memory", path);
		return -ENOMEM;
	}
	/* Under another name too ("./IMG"): the image would be its own backing file. */
	if (stat(path, &a) == 0 && stat(bpath, &s) == 0 && a.st_dev == s.st_dev &&
	    a.st_ino == s.st_ino) {
		uq_err("%s: the image cannot be its own backing file", path);
		free(bpath);
		return -EINVAL;
	}
	ret = uq_image_open(&b, bpath, c->o.backing_fmt,
			    UQ_OPEN_RDONLY | UQ_OPEN_NO_BACKING, err, sizeof(err));
	free(bpath);
	if (ret < 0) {
		uq_err("%s: cannot open backing file: %s", path, err);
		return ret;
	}
	if (!c->size_set)
		c->o.size = b->size;
	c->size_set = true;
	if (!c->o.backing_fmt) {
		*fmt_out = strdup(uq_fmt_name(b->fmt));
		c->o.backing_fmt = *fmt_out;
	}
	uq_image_close(b);
	if (!c->o.backing_fmt) {
		uq_err("%s: out of memory", path);
		return -ENOMEM;
	}
	return 0;
}

int cmd_create(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		UQ_KEY_LONGOPTS,
		{ NULL, 0, NULL, 0 },
	};
	struct uq_create c = { .fmt = UQ_FMT_QCOW2 };
	const char *fmt = "qcow2", *path, *bfile = NULL, *bfmt = NULL;
	char *fmt_alloc = NULL;
	char *lists[16];		/* -o lists: applied once IMAGE is known */
	int nr_lists = 0, i, opt, ret;
	bool unsafe = false;

	while ((opt = uq_getopt(argc, argv, ":f:b:F:uo:qh", longopts)) != -1) {
		switch (opt) {
		case 'f':
			fmt = optarg;
			break;
		case 'b':
			bfile = optarg;
			break;
		case 'F':
			bfmt = optarg;
			break;
		case 'u':
			unsafe = true;
			break;
		case 'q':
			break;		/* create prints nothing on success anyway */
		case 'o':
			if (nr_lists == (int)(sizeof(lists) / sizeof(lists[0]))) {
				uq_err("create: too many -o options");
				return 1;
			}
			lists[nr_lists++] = optarg;
			break;
		case UQ_OPT_FAILED:
			return 1;
		case 'h':
			create_usage();
			return 0;
		default:
			return uq_usage_error("create", argv, opt);
		}
	}
	/* "-o help" needs no IMAGE. */
	path = optind < argc ? argv[optind] : "create";
	if (uq_fmt_parse(fmt, &c.fmt) < 0) {
		uq_err("%s: unsupported format '%s' (use qcow2 or raw)", path, fmt);
		return 1;
	}
	for (i = 0; i < nr_lists; i++) {
		ret = uq_create_parse(&c, path, lists[i]);
		if (ret)
			return ret > 0 ? 0 : 1;
	}
	/* -b and -F win over -o backing_file/backing_fmt, as in qemu-img. */
	if (bfile)
		c.o.backing_file = bfile;
	if (bfmt)
		c.o.backing_fmt = bfmt;
	if (optind >= argc || argc - optind > 2)
		return uq_usage_args("create", "IMAGE and an optional SIZE");
	if (optind + 1 < argc && c.size_set) {
		uq_err("%s: the image size must be given only once (SIZE or -o size)", path);
		return 1;
	}
	if (optind + 1 < argc) {
		if (uq_parse_size(argv[optind + 1], &c.o.size) < 0) {
			uq_err("%s: invalid size '%s'", path, argv[optind + 1]);
			return 1;
		}
		c.size_set = true;
	}
	if (c.o.backing_file && c.fmt == UQ_FMT_RAW) {
		uq_err("%s: raw images cannot have a backing file", path);
		return 1;
	}
	if (c.o.backing_fmt && !c.o.backing_file) {
		uq_err("%s: a backing format needs a backing file (-b)", path);
		return 1;
	}
	if (c.o.backing_file && !*c.o.backing_file) {
		uq_err("%s: the backing file name is empty", path);
		return 1;
	}
	/* qemu-img's test too: the same name, not the same file. */
	if (c.o.backing_file && !strcmp(c.o.backing_file, path)) {
		uq_err("%s: the image cannot be its own backing file", path);
		return 1;
	}
	/* As qemu-img: without opening the backing file, its format must be given. */
	if (c.o.backing_file && unsafe && !c.o.backing_fmt) {
		uq_err("%s: a backing file not opened (-u) needs its format (-F)", path);
		return 1;
	}
	if (c.o.backing_file && !unsafe && check_backing(path, &c, &fmt_alloc) < 0)
		goto fail;
	if (!c.size_set) {
		uq_err("%s: image creation needs a size", path);
		goto fail;
	}
	ret = uq_create_image(path, &c);
	free(fmt_alloc);
	return ret < 0 ? 1 : 0;

fail:
	free(fmt_alloc);
	return 1;
}
