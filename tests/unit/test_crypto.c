// SPDX-License-Identifier: MIT
/*
 * crypto.c: legacy AES sectors against known AES-128-CBC vectors (plain64
 * IVs from the guest sector), LUKS header sizes against what qemu-img
 * lays out, a LUKS header we build unlocking with its key only, a seeded
 * corruption loop over the header that must never crash, and deferred write
 * data (NEED_GET_DATA) on an encrypted overlay, checked by qemu-img.
 */
#include <check.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"
#include "run.h"

static void hex(const char *s, uint8_t *out)
{
	size_t i;

	for (i = 0; s[2 * i]; i++)
		sscanf(s + 2 * i, "%2hhx", &out[i]);
}

static void img_init(struct qcow2 *img, uint32_t method, bool ro)
{
	memset(img, 0, sizeof(*img));
	img->path = "unit.qcow2";
	img->fd = -1;
	img->read_only = ro;
	img->h.crypt_method = method;
	img->h.size = 1 << 20;
}

/* Vectors from `openssl enc -aes-128-cbc -K 616263<zeros> -iv <le64 sector> -nopad`. */
START_TEST(test_legacy_aes_vectors)
{
	struct qcow2_key k = { "abc", 3 };
	struct qcow2_opts o = { .read_only = true, .keys = &k, .nr_keys = 1 };
	uint8_t buf[512], want[32];
	struct qcow2 img;
	int i;

	img_init(&img, 1, true);
	ck_assert_int_eq(qcow2_crypt_open(&img, &o), 0);

	/* Zeros at guest sector 5; the host offset does not matter. */
	memset(buf, 0, sizeof(buf));
	ck_assert_int_eq(qcow2_crypt_buf(&img, 77 * 512, 5 * 512, buf, 512, true), 0);
	hex("ad0434beef991b3da45f59c3d535d057", want);
	ck_assert_mem_eq(buf, want, 16);

	/* 0..255 twice at guest sector 256: the last two blocks. */
	for (i = 0; i < 512; i++)
		buf[i] = i;
	ck_assert_int_eq(qcow2_crypt_buf(&img, 0, 256 * 512, buf, 512, true), 0);
	hex("9dc281b5947f8ae95a12fa5a9f9f65db88d916ecce0aca0c0670fa3646082e45", want);
	ck_assert_mem_eq(buf + 480, want, 32);
	ck_assert_int_eq(qcow2_crypt_buf(&img, 0, 256 * 512, buf, 512, false), 0);
	for (i = 0; i < 512; i++)
		ck_assert_uint_eq(buf[i], (uint8_t)i);
	qcow2_crypt_free(&img);
}
END_TEST

START_TEST(test_legacy_aes_rw_refused)
{
	struct qcow2_key k = { "abc", 3 };
	struct qcow2_opts o = { .keys = &k, .nr_keys = 1 };
	struct qcow2 img;

	img_init(&img, 1, false);
	ck_assert_int_eq(qcow2_crypt_open(&img, &o), -EROFS);
	ck_assert_ptr_nonnull(strstr(img.errmsg, "legacy AES encryption is read-only"));
	ck_assert_ptr_null(img.crypt);
}
END_TEST

/* Payload offsets qemu-img info reports for these (QEMU's slot layout). */
START_TEST(test_luks_sizes)
{
	static const struct {
		const char *alg, *mode;
		uint64_t bytes;
	} t[] = {
		{ NULL, NULL, 2068480 },		/* aes-256-xts */
		{ "aes-128", "cbc", 528384 },
		{ "aes-128", "xts", 1052672 },
		{ "serpent-256", "xts", 2068480 },	/* nettle's */
		{ "twofish-192", "xts", 1544192 },
		{ "twofish-128", "cbc", 528384 },
	};
	size_t i;

	for (i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		struct qcow2_encrypt_opts e = { .format = "luks", .key = "k", .key_len = 1,
						.cipher_alg = t[i].alg, .cipher_mode = t[i].mode };
		uint64_t n = 0;
		char err[160];

		ck_assert_int_eq(qcow2_luks_header_size(&e, &n, err, sizeof(err)), 0);
		ck_assert_uint_eq(n, t[i].bytes);
	}
}
END_TEST

START_TEST(test_luks_bad_opts)
{
	struct qcow2_encrypt_opts e = { .format = "luks", .key = "k", .key_len = 1,
					.cipher_alg = "camellia-256" };
	uint64_t n;
	char err[160];

	ck_assert_int_eq(qcow2_luks_header_size(&e, &n, err, sizeof(err)), -ENOTSUP);
	ck_assert_ptr_nonnull(strstr(err, "camellia"));
	/* 24-byte keys outside XTS: key material QEMU cannot open. */
	e.cipher_alg = "serpent-192";
	e.cipher_mode = "cbc";
	ck_assert_int_eq(qcow2_luks_header_size(&e, &n, err, sizeof(err)), -ENOTSUP);
	ck_assert_ptr_nonnull(strstr(err, "QEMU cannot open"));
	e.cipher_mode = NULL;
	e.cipher_alg = NULL;
	e.ivgen_alg = "benbi";
	ck_assert_int_lt(qcow2_luks_header_size(&e, &n, err, sizeof(err)), 0);
	e.ivgen_alg = NULL;
	e.format = "aes";
	ck_assert_int_eq(qcow2_luks_header_size(&e, &n, err, sizeof(err)), -ENOTSUP);
}
END_TEST

/* A LUKS header built here, in a file, opened through qcow2_crypt_open. */
struct luks_file {
	struct qcow2_io *io;
	char path[64];
	int fd;
	uint8_t *area;
	uint64_t len;
};

static void luks_file_make(struct luks_file *f, const struct qcow2_encrypt_opts *e)
{
	char err[160];

	ck_assert_int_eq(qcow2_luks_header_size(e, &f->len, err, sizeof(err)), 0);
	f->area = calloc(1, f->len);
	ck_assert_ptr_nonnull(f->area);
	ck_assert_int_eq(qcow2_luks_header_build(e, f->area, err, sizeof(err)), 0);
	snprintf(f->path, sizeof(f->path), "/tmp/uq-crypto-XXXXXX");
	f->fd = mkstemp(f->path);
	ck_assert_int_ge(f->fd, 0);
	unlink(f->path);
	f->io = qcow2_uring_new(4);
	ck_assert_ptr_nonnull(f->io);
}

static void luks_file_write(struct luks_file *f, const uint8_t *area)
{
	ck_assert_int_eq(pwrite(f->fd, area, f->len, 0), (ssize_t)f->len);
}

static int luks_open(struct luks_file *f, struct qcow2 *img, const char *key, bool no_key)
{
	struct qcow2_key k = { key, key ? strlen(key) : 0 };
	struct qcow2_opts o = { .keys = &k, .nr_keys = !!key, .no_key = no_key };

	img_init(img, 2, false);
	img->fd = f->fd;
	img->io = f->io;
	img->crypt_hdr_off = 0;
	img->crypt_hdr_len = f->len;
	return qcow2_crypt_open(img, &o);
}

static void luks_file_free(struct luks_file *f)
{
	close(f->fd);
	qcow2_uring_free(f->io);
	free(f->area);
}

/* Several keys: the first that opens a slot serves (serpent: nettle's cipher). */
START_TEST(test_luks_keys)
{
	struct qcow2_encrypt_opts e = { .format = "luks", .key = "right", .key_len = 5,
					.cipher_alg = "serpent-256", .iter_time_ms = 1 };
	struct qcow2_key keys[] = { { "wrong", 5 }, { "right", 5 }, { "other", 5 } };
	struct qcow2_opts o = { .keys = keys, .nr_keys = 3 };
	uint8_t a[1024], zero[1024] = { 0 };
	struct luks_file f;
	struct qcow2 img;

	luks_file_make(&f, &e);
	luks_file_write(&f, f.area);
	ck_assert_int_eq(luks_open(&f, &img, NULL, true), 0);
	qcow2_crypt_free(&img);
	ck_assert_int_eq(qcow2_crypt_open(&img, &o), 0);
	memset(a, 0, sizeof(a));
	ck_assert_int_eq(qcow2_crypt_buf(&img, 8192, 0, a, 1024, true), 0);
	ck_assert_mem_ne(a, zero, 512);
	ck_assert_mem_ne(a, a + 512, 512);
	ck_assert_int_eq(qcow2_crypt_buf(&img, 8192, 0, a, 1024, false), 0);
	ck_assert_mem_eq(a, zero, 1024);
	qcow2_crypt_free(&img);

	/* None opens it: -EACCES, and the message says how many were tried. */
	keys[1] = keys[2];
	o.nr_keys = 2;
	ck_assert_int_eq(qcow2_crypt_open(&img, &o), -EACCES);
	ck_assert_ptr_nonnull(strstr(img.errmsg, "any of the 2 given keys"));
	luks_file_free(&f);
}
END_TEST

START_TEST(test_luks_unlock)
{
	struct qcow2_encrypt_opts e = { .format = "luks", .key = "right", .key_len = 5,
					.cipher_alg = "aes-128", .cipher_mode = "cbc",
					.ivgen_alg = "essiv", .iter_time_ms = 1 };
	uint8_t a[1024], b[1024], zero[1024] = { 0 };
	struct luks_file f;
	struct qcow2 img;

	luks_file_make(&f, &e);
	luks_file_write(&f, f.area);

	ck_assert_int_eq(luks_open(&f, &img, "wrong", false), -EACCES);
	ck_assert_ptr_nonnull(strstr(img.errmsg, "invalid password"));
	ck_assert_ptr_nonnull(strstr(img.errmsg, "unit.qcow2"));

	ck_assert_int_eq(luks_open(&f, &img, NULL, false), -ENOKEY);
	ck_assert_ptr_nonnull(strstr(img.errmsg, "a key is needed"));

	/* Metadata only: opens, but data cannot be touched. */
	ck_assert_int_eq(luks_open(&f, &img, NULL, true), 0);
	ck_assert_int_eq(qcow2_crypt_buf(&img, 0, 0, a, 512, true), -ENOKEY);
	qcow2_crypt_free(&img);

	ck_assert_int_eq(luks_open(&f, &img, "right", false), 0);
	/* The same bytes at different host sectors differ; each decrypts back. */
	memset(a, 0, sizeof(a));
	ck_assert_int_eq(qcow2_crypt_buf(&img, 4096, 0, a, 1024, true), 0);
	ck_assert_mem_ne(a, a + 512, 512);
	ck_assert_mem_ne(a, zero, 512);
	memcpy(b, a, sizeof(b));
	ck_assert_int_eq(qcow2_crypt_buf(&img, 4096, 12345 * 512, b, 1024, false), 0);
	ck_assert_mem_eq(b, zero, 1024);
	/* Unaligned is refused, not mangled. */
	ck_assert_int_eq(qcow2_crypt_buf(&img, 100, 0, a, 512, false), -EINVAL);
	qcow2_crypt_free(&img);
	luks_file_free(&f);
}
END_TEST

/*
 * Random byte changes in the header and key slot fields (not the iteration
 * counts: those only make it slow) must give 0 or a clean error.
 */
START_TEST(test_luks_fuzz)
{
	struct qcow2_encrypt_opts e = { .format = "luks", .key = "pw", .key_len = 2,
					.cipher_alg = "aes-128", .cipher_mode = "cbc",
					.iter_time_ms = 1 };
	struct luks_file f;
	struct qcow2 img;
	uint8_t *bad;
	int round, i, ret;

	luks_file_make(&f, &e);
	bad = malloc(f.len);
	ck_assert_ptr_nonnull(bad);
	srandom(1);
	for (round = 0; round < 60; round++) {
		memcpy(bad, f.area, f.len);
		for (i = 0; i < 1 + round % 4; i++) {
			uint32_t off = random() % 592;

			if ((off >= 164 && off < 168) ||
			    (off >= 208 && (off - 208) % 48 >= 4 && (off - 208) % 48 < 8))
				continue;
			bad[off] = random();
		}
		luks_file_write(&f, bad);
		ret = luks_open(&f, &img, "pw", false);
		if (ret == 0)
			qcow2_crypt_free(&img);
		else
			ck_assert(img.errmsg[0] && !img.crypt);
	}
	free(bad);
	luks_file_free(&f);
}
END_TEST

/* ---- Deferred write data on an encrypted overlay ------------------------ */

#define D_SIZE		(4u << 20)
#define D_BATCH		16
#define D_MAX		(96u << 10)
#define D_SECRET	"--object secret,id=s,data=pw "

struct dop {
	struct qcow2_req *req;
	uint64_t off, len;
	uint8_t *buf, *dst;
	uint8_t pat;
	bool asked, done;
	int res;
};

static unsigned int landed_in_cow;

static void dop_fetch(struct qcow2_req *req, void *dst, void *priv)
{
	struct dop *o = priv;

	(void)req;
	o->asked = true;
	o->dst = dst;
	if (dst != o->buf)
		landed_in_cow++;
}

static void dop_done(struct qcow2_req *req, int res, void *priv)
{
	struct dop *o = priv;

	(void)req;
	o->res = res;
	o->done = true;
}

/*
 * Writes whose bytes come late (landing in the COW buffer between the old
 * bytes or in the submitted buffer) must be encrypted like the others:
 * qemu-img compares the overlay with the mirror through its own LUKS code.
 */
START_TEST(test_defer_encrypted)
{
	struct qcow2_encrypt_opts enc = { .format = "luks", .key = "pw", .key_len = 2,
					  .iter_time_ms = 10 };
	struct qcow2_create_opts copts = { .size = D_SIZE, .cluster_bits = 14,
					   .backing_file = "base.qcow2", .backing_fmt = "qcow2",
					   .encrypt = &enc };
	struct qcow2_key k = { "pw", 2 };
	struct qcow2_opts opts = { .keys = &k, .nr_keys = 1 };
	struct qcow2_io *io = qcow2_uring_new(32);
	char dir[] = "/tmp/uq-cdefer-XXXXXX", cmd[1024], path[64], err[256];
	uint8_t *mirror = malloc(D_SIZE);
	struct dop ops[D_BATCH];
	struct qcow2 *img;
	unsigned int seed = 7;
	int round, i;
	FILE *f;

	ck_assert_ptr_nonnull(io);
	ck_assert_ptr_nonnull(mirror);
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(cmd, sizeof(cmd), "set -e; cd %s; truncate -s 4M m.raw; "
		 "qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'write -P 0xa5 3M 1M' m.raw >/dev/null; "
		 "qemu-img convert -O qcow2 m.raw base.qcow2", dir);
	ck_assert_int_eq(system(cmd), 0);
	/* Created here: qemu-img's PBKDF2 benchmark fails now and then when loaded. */
	snprintf(path, sizeof(path), "%s/d.qcow2", dir);
	ck_assert_msg(qcow2_create(path, &copts, io, err, sizeof(err)) == 0, "%s", err);
	snprintf(path, sizeof(path), "%s/m.raw", dir);
	f = fopen(path, "rb");
	ck_assert_ptr_nonnull(f);
	ck_assert_int_eq(fread(mirror, 1, D_SIZE, f), D_SIZE);
	fclose(f);
	snprintf(path, sizeof(path), "%s/d.qcow2", dir);
	ck_assert_msg(qcow2_open(&img, path, &opts, io, err, sizeof(err)) == 0, "%s", err);
	for (i = 0; i < D_BATCH; i++) {
		ops[i].req = qcow2_req_new(img);
		ops[i].buf = malloc(D_MAX);
		ck_assert_ptr_nonnull(ops[i].req);
		ck_assert_ptr_nonnull(ops[i].buf);
	}
	for (round = 0; round < 20; round++) {
		for (i = 0; i < D_BATCH; i++) {
			struct dop *o = &ops[i];

			/* Disjoint 256 KiB lanes, sector-aligned pieces of them. */
			o->len = 512 * (1 + rand_r(&seed) % (rand_r(&seed) % 4 ? 16 : D_MAX / 512));
			o->off = i * (D_SIZE / D_BATCH) +
				 512 * (rand_r(&seed) % ((D_SIZE / D_BATCH - o->len) / 512 + 1));
			o->pat = 1 + rand_r(&seed) % 255;
			memset(o->buf, o->pat, o->len);
			o->asked = o->done = false;
			qcow2_req_defer_data(o->req, dop_fetch);
			qcow2_req_submit(o->req, QCOW2_OP_WRITE, o->off, o->len, o->buf,
					 dop_done, o);
		}
		for (;;) {
			bool all = true, given = false;

			for (i = 0; i < D_BATCH; i++) {
				all &= ops[i].done;
				if (ops[i].asked && !ops[i].done) {
					ops[i].asked = false;
					memcpy(ops[i].dst, ops[i].buf, ops[i].len);
					qcow2_req_data_ready(ops[i].req, 0);
					given = true;
				}
			}
			if (all)
				break;
			if (!given)
				ck_assert_int_ne(io->wait(io), -EAGAIN);
		}
		for (i = 0; i < D_BATCH; i++) {
			ck_assert_msg(ops[i].res == 0, "%s", qcow2_errmsg(img));
			memset(mirror + ops[i].off, ops[i].pat, ops[i].len);
		}
	}
	ck_assert_msg(landed_in_cow > 0, "no fetch landed in a COW buffer");
	for (i = 0; i < D_BATCH; i++) {
		qcow2_req_free(ops[i].req);
		free(ops[i].buf);
	}
	ck_assert_int_eq(qcow2_close(img), 0);
	snprintf(path, sizeof(path), "%s/m.raw", dir);
	f = fopen(path, "wb");
	ck_assert_ptr_nonnull(f);
	ck_assert_int_eq(fwrite(mirror, 1, D_SIZE, f), D_SIZE);
	fclose(f);
	snprintf(cmd, sizeof(cmd), "set -e; cd %s; "
		 "qemu-img check -q " D_SECRET "--image-opts "
		 "driver=qcow2,file.filename=d.qcow2,encrypt.key-secret=s; "
		 "qemu-img compare -q " D_SECRET "--image-opts "
		 "driver=qcow2,file.filename=d.qcow2,encrypt.key-secret=s "
		 "driver=raw,file.filename=m.raw", dir);
	ck_assert_int_eq(system(cmd), 0);
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	ck_assert_int_eq(system(cmd), 0);
	qcow2_uring_free(io);
	free(mirror);
}
END_TEST

static Suite *crypto_suite(void)
{
	Suite *s = suite_create("crypto");
	TCase *tc = tcase_create("crypto");

	tcase_add_test(tc, test_legacy_aes_vectors);
	tcase_add_test(tc, test_legacy_aes_rw_refused);
	tcase_add_test(tc, test_luks_sizes);
	tcase_add_test(tc, test_luks_bad_opts);
	tcase_add_test(tc, test_luks_unlock);
	tcase_add_test(tc, test_luks_keys);
	tcase_add_test(tc, test_luks_fuzz);
	tcase_add_test(tc, test_defer_encrypted);
	tcase_set_timeout(tc, 300);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return tu_suite_run(crypto_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
