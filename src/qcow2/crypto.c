// SPDX-License-Identifier: MIT
/*
 * Encrypted images: the LUKS1 header QEMU keeps in the clusters the crypto
 * header extension points at (parse, validate, unlock with a passphrase,
 * create), legacy AES-CBC (crypt_method 1, read-only), and the per-sector
 * encryption of data clusters: AES and CAST5 through OpenSSL, serpent and
 * twofish (which OpenSSL lacks) through nettle (cipher_nettle.c). Knows
 * nothing of where the requests come from; request.c and write.c call in at
 * the few points where data meets the file.
 *
 * Facts (QEMU crypto/block-luks.c, block-qcow.c, afsplit.c, ivgen-*.c):
 * sectors are 512 bytes and each is encrypted on its own with an IV from the
 * IV generator: plain (le32 sector), plain64 (le64 sector) or essiv (the
 * le64 sector, zero-padded to a block, encrypted in ECB mode with a key that
 * is the hash of the master key). LUKS images number sectors by HOST offset,
 * legacy AES ones by GUEST offset. A key slot holds the master key, split by
 * the anti-forensic splitter into `stripes` copies and encrypted like data
 * (sectors numbered from 0) with a key derived by PBKDF2 from the passphrase;
 * the master key is right when PBKDF2 of it matches the header's digest.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <pthread.h>

#include <openssl/evp.h>
#include <openssl/provider.h>
#include <openssl/rand.h>

#include "internal.h"

#define LUKS_MAGIC_LEN		6
#define LUKS_NAME_LEN		32
#define LUKS_DIGEST_LEN		20
#define LUKS_SALT_LEN		32
#define LUKS_UUID_LEN		40
#define LUKS_SLOTS		8
#define LUKS_STRIPES		4000
#define LUKS_HEADER_BYTES	592
#define LUKS_SLOT_ALIGN		4096	/* key material offsets, as QEMU/cryptsetup */
#define LUKS_SLOT_ENABLED	0x00AC71F3u
#define LUKS_SLOT_DISABLED	0x0000DEADu
#define LUKS_MIN_ITERS		1000
#define LUKS_MAX_ITERS		(1u << 30)	/* beyond: refuse rather than spin */
#define LUKS_MAX_KEY_BYTES	64
#define LUKS_MAX_STRIPES	65536
#define CRYPT_SECTOR		512u
#define MAX_HDR_BYTES		(64u << 20)

/* LUKS header field offsets (big-endian). */
enum {
	LH_MAGIC = 0, LH_VERSION = 6, LH_CIPHER = 8, LH_MODE = 40, LH_HASH = 72,
	LH_PAYLOAD = 104, LH_KEY_BYTES = 108, LH_MK_DIGEST = 112, LH_MK_SALT = 132,
	LH_MK_ITERS = 164, LH_UUID = 168, LH_SLOTS = 208, LH_SLOT_BYTES = 48,
};

static const uint8_t luks_magic[LUKS_MAGIC_LEN] = { 'L', 'U', 'K', 'S', 0xba, 0xbe };

enum crypt_mode {
	MODE_ECB = QCOW2_CIPHER_ECB, MODE_CBC = QCOW2_CIPHER_CBC,
	MODE_XTS = QCOW2_CIPHER_XTS, MODE_CTR = QCOW2_CIPHER_CTR,
};
enum crypt_ivgen { IV_NONE, IV_PLAIN, IV_PLAIN64, IV_ESSIV };

static inline void put_le32(void *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static inline void put_le64(void *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }

static const char *const mode_names[] = { "ecb", "cbc", "xts", "ctr" };
static const char *const ivgen_names[] = { "none", "plain", "plain64", "essiv" };

/* A cipher as a header names it. */
struct crypt_spec {
	char cipher_name[LUKS_NAME_LEN + 1];	/* "aes" */
	uint32_t key_bytes;			/* of the master key (both halves for XTS) */
	enum crypt_mode mode;
	enum crypt_ivgen ivgen;
	char ivhash_name[LUKS_NAME_LEN + 1];
	char hash_name[LUKS_NAME_LEN + 1];
	const EVP_CIPHER *cipher;		/* NULL for the nettle ciphers */
	const EVP_CIPHER *essiv_cipher;
	bool nettle;				/* serpent, twofish: cipher_nettle.c */
	const EVP_MD *ivhash;
	const EVP_MD *hash;			/* PBKDF2 and the AF splitter */
};

/* A keyed cipher: contexts set up once, only the IV changes per sector. */
struct crypt_ctx {
	const struct crypt_spec *spec;
	EVP_CIPHER_CTX *enc, *dec, *essiv;
	struct qcow2_nettle *nettle, *nettle_essiv;	/* instead, for spec->nettle */
};

struct luks_slot {
	uint32_t active, iters, key_offset, stripes;	/* key_offset in sectors */
	uint8_t salt[LUKS_SALT_LEN];
};

struct qcow2_crypt {
	int method;				/* 1 legacy AES, 2 LUKS */
	struct crypt_spec spec;
	uint32_t payload_offset;		/* sectors */
	uint32_t mk_iters;
	uint8_t mk_digest[LUKS_DIGEST_LEN];
	uint8_t mk_salt[LUKS_SALT_LEN];
	char uuid[LUKS_UUID_LEN + 1];
	struct luks_slot slots[LUKS_SLOTS];
	bool unlocked;
	struct crypt_ctx data;			/* the master key's, once unlocked */
};

/* ---- Ciphers ---------------------------------------------------------------- */

static const EVP_CIPHER *aes_cipher(enum crypt_mode mode, uint32_t key_bytes)
{
	switch (mode) {
	case MODE_ECB:
		return key_bytes == 16 ? EVP_aes_128_ecb() : key_bytes == 24 ? EVP_aes_192_ecb() :
		       key_bytes == 32 ? EVP_aes_256_ecb() : NULL;
	case MODE_CBC:
		return key_bytes == 16 ? EVP_aes_128_cbc() : key_bytes == 24 ? EVP_aes_192_cbc() :
		       key_bytes == 32 ? EVP_aes_256_cbc() : NULL;
	case MODE_CTR:
		return key_bytes == 16 ? EVP_aes_128_ctr() : key_bytes == 24 ? EVP_aes_192_ctr() :
		       key_bytes == 32 ? EVP_aes_256_ctr() : NULL;
	case MODE_XTS:
		return key_bytes == 32 ? EVP_aes_128_xts() : key_bytes == 64 ? EVP_aes_256_xts() :
		       NULL;
	}
	return NULL;
}

static const EVP_CIPHER *cast5_cbc, *cast5_ecb;

/*
 * CAST5 lives in OpenSSL 3's legacy provider. Loading a provider switches
 * off the implicit default one, so the default is loaded too; both stay
 * for the life of the process, as do the fetched ciphers.
 */
static void cast5_fetch(void)
{
	if (!OSSL_PROVIDER_load(NULL, "legacy") || !OSSL_PROVIDER_load(NULL, "default"))
		return;
	cast5_cbc = EVP_CIPHER_fetch(NULL, "CAST5-CBC", NULL);
	cast5_ecb = EVP_CIPHER_fetch(NULL, "CAST5-ECB", NULL);
}

/* QEMU's cast5-128: CBC and ECB only (OpenSSL has no CAST5 CTR or XTS). */
static const EVP_CIPHER *cast5_cipher(enum crypt_mode mode, uint32_t key_bytes)
{
	static pthread_once_t once = PTHREAD_ONCE_INIT;

	if (key_bytes != 16 || (mode != MODE_CBC && mode != MODE_ECB))
		return NULL;
	pthread_once(&once, cast5_fetch);
	return mode == MODE_CBC ? cast5_cbc : cast5_ecb;
}

static const EVP_CIPHER *cipher_lookup(const char *name, enum crypt_mode mode,
				       uint32_t key_bytes)
{
	if (!strcmp(name, "aes"))
		return aes_cipher(mode, key_bytes);
	if (!strcmp(name, "cast5"))
		return cast5_cipher(mode, key_bytes);
	return NULL;
}

/* QEMU's hash names are OpenSSL's, except for the ripemd spelling. */
static const EVP_MD *hash_lookup(const char *name)
{
	static const char *const known[] = { "md5", "sha1", "sha224", "sha256", "sha384",
					     "sha512", "ripemd160" };
	size_t i;

	for (i = 0; i < sizeof(known) / sizeof(known[0]); i++)
		if (!strcmp(name, known[i]))
			return EVP_get_digestbyname(name);
	return NULL;
}

static int name_index(const char *name, const char *const *names, int n)
{
	int i;

	for (i = 0; i < n; i++)
		if (!strcmp(name, names[i]))
			return i;
	return -1;
}

/*
 * Resolve the names in @s (cipher_name, key_bytes, hash_name set; @mode_spec
 * is "<mode>-<ivgen>[:<hash>]"). 0 or -ENOTSUP/-EINVAL with @why filled.
 */
static int spec_resolve(struct crypt_spec *s, const char *mode_spec, char *why, size_t whylen)
{
	char buf[LUKS_NAME_LEN + 1], *iv, *ivhash;
	int m, g;

	snprintf(buf, sizeof(buf), "%s", mode_spec);
	iv = strchr(buf, '-');
	if (!iv) {
		snprintf(why, whylen, "unexpected cipher mode string '%s'", mode_spec);
		return -EINVAL;
	}
	*iv++ = '\0';
	ivhash = strchr(iv, ':');
	if (ivhash)
		*ivhash++ = '\0';
	m = name_index(buf, mode_names, 4);
	g = name_index(iv, ivgen_names, 4);
	if (m < 0 || g < 0) {
		snprintf(why, whylen, "unsupported cipher mode '%s'", mode_spec);
		return -ENOTSUP;
	}
	s->mode = m;
	s->ivgen = g;
	s->nettle = !strcmp(s->cipher_name, "serpent") || !strcmp(s->cipher_name, "twofish");
	if (strcmp(s->cipher_name, "aes") && strcmp(s->cipher_name, "cast5") && !s->nettle) {
		snprintf(why, whylen,
			 "unsupported cipher '%s' (only aes, cast5, serpent and twofish are)",
			 s->cipher_name);
		return -ENOTSUP;
	}
	s->cipher = cipher_lookup(s->cipher_name, s->mode, s->key_bytes);
	if (s->nettle ? !qcow2_nettle_has(s->cipher_name, m, s->key_bytes) : !s->cipher) {
		snprintf(why, whylen, "unsupported key size %u or mode for %s-%s", s->key_bytes,
			 s->cipher_name, mode_names[s->mode]);
		return -ENOTSUP;
	}
	s->hash = hash_lookup(s->hash_name);
	if (!s->hash) {
		snprintf(why, whylen, "unsupported hash '%s'", s->hash_name);
		return -ENOTSUP;
	}
	s->essiv_cipher = NULL;
	s->ivhash = NULL;
	snprintf(s->ivhash_name, sizeof(s->ivhash_name), "%s", ivhash ? ivhash : "");
	if (s->ivgen == IV_ESSIV) {
		int dlen;

		/*
		 * dm-crypt's ESSIV keys the same cipher with the digest's size
		 * (QEMU follows): cast5 only with a 16-byte digest.
		 */
		s->ivhash = ivhash ? hash_lookup(ivhash) : NULL;
		dlen = s->ivhash ? EVP_MD_get_size(s->ivhash) : 0;
		s->essiv_cipher = cipher_lookup(s->cipher_name, MODE_ECB, dlen);
		if (s->nettle ? !dlen || !qcow2_nettle_has(s->cipher_name, QCOW2_CIPHER_ECB, dlen) :
				!s->essiv_cipher) {
			snprintf(why, whylen, "unsupported ESSIV hash '%s'", ivhash ? ivhash : "");
			return -ENOTSUP;
		}
	}
	if (s->ivgen == IV_NONE && s->mode != MODE_ECB) {
		snprintf(why, whylen, "cipher mode '%s' needs an IV generator", mode_spec);
		return -ENOTSUP;
	}
	return 0;
}

static void ctx_free(struct crypt_ctx *c)
{
	EVP_CIPHER_CTX_free(c->enc);
	EVP_CIPHER_CTX_free(c->dec);
	EVP_CIPHER_CTX_free(c->essiv);
	qcow2_nettle_free(c->nettle);
	qcow2_nettle_free(c->nettle_essiv);
	c->enc = c->dec = c->essiv = NULL;
	c->nettle = c->nettle_essiv = NULL;
}

/* ctx_init for serpent and twofish: the same steps through cipher_nettle.c. */
static int ctx_init_nettle(struct crypt_ctx *c, const struct crypt_spec *spec,
			   const uint8_t *key)
{
	uint8_t salt[EVP_MAX_MD_SIZE];
	unsigned int slen;
	int ret;

	c->spec = spec;
	ret = qcow2_nettle_new(&c->nettle, spec->cipher_name, (enum qcow2_cipher_mode)spec->mode,
			       key, spec->key_bytes);
	if (!ret && spec->ivgen == IV_ESSIV) {
		ret = EVP_Digest(key, spec->key_bytes, salt, &slen, spec->ivhash, NULL) ?
		      qcow2_nettle_new(&c->nettle_essiv, spec->cipher_name, QCOW2_CIPHER_ECB, salt,
				       slen) : -EINVAL;
		OPENSSL_cleanse(salt, sizeof(salt));
	}
	if (ret < 0)
		ctx_free(c);
	return ret;
}

/* Key @c with @key (spec->key_bytes). 0 or -ENOMEM/-EINVAL. */
static int ctx_init(struct crypt_ctx *c, const struct crypt_spec *spec, const uint8_t *key)
{
	uint8_t salt[EVP_MAX_MD_SIZE];
	unsigned int slen;

	if (spec->nettle)
		return ctx_init_nettle(c, spec, key);
	c->spec = spec;
	c->enc = EVP_CIPHER_CTX_new();
	c->dec = EVP_CIPHER_CTX_new();
	c->essiv = spec->essiv_cipher ? EVP_CIPHER_CTX_new() : NULL;
	if (!c->enc || !c->dec || (spec->essiv_cipher && !c->essiv))
		goto fail;
	if (!EVP_EncryptInit_ex(c->enc, spec->cipher, NULL, key, NULL) ||
	    !EVP_DecryptInit_ex(c->dec, spec->cipher, NULL, key, NULL))
		goto fail;
	EVP_CIPHER_CTX_set_padding(c->enc, 0);
	EVP_CIPHER_CTX_set_padding(c->dec, 0);
	if (c->essiv) {
		if (!EVP_Digest(key, spec->key_bytes, salt, &slen, spec->ivhash, NULL) ||
		    !EVP_EncryptInit_ex(c->essiv, spec->essiv_cipher, NULL, salt, NULL))
			goto fail;
		EVP_CIPHER_CTX_set_padding(c->essiv, 0);
	}
	OPENSSL_cleanse(salt, sizeof(salt));
	return 0;
fail:
	OPENSSL_cleanse(salt, sizeof(salt));
	ctx_free(c);
	return -EINVAL;
}

/*
 * En/decrypt @len bytes in place, sector by sector from @sector (a last
 * partial sector is processed as it is, as QEMU does for key material).
 * 0 or -EIO.
 */
static int ctx_run(struct crypt_ctx *c, uint64_t sector, uint8_t *buf, size_t len, bool enc)
{
	EVP_CIPHER_CTX *x = enc ? c->enc : c->dec;
	uint8_t iv[16], blk[16];
	int outl;

	while (len) {
		size_t n = len < CRYPT_SECTOR ? len : CRYPT_SECTOR;

		memset(iv, 0, sizeof(iv));
		switch (c->spec->ivgen) {
		case IV_NONE:
			break;
		case IV_PLAIN:
			put_le32(iv, (uint32_t)sector);
			break;
		case IV_PLAIN64:
			put_le64(iv, sector);
			break;
		case IV_ESSIV:
			/*
			 * One block of the ESSIV cipher: 16 bytes for AES,
			 * serpent and twofish, 8 for CAST5.
			 */
			memset(blk, 0, sizeof(blk));
			put_le64(blk, sector);
			if (c->nettle_essiv) {
				if (qcow2_nettle_crypt(c->nettle_essiv, blk, blk, 16, true) < 0)
					return -EIO;
				memcpy(iv, blk, sizeof(iv));
			} else if (!EVP_EncryptUpdate(c->essiv, iv, &outl, blk,
						      EVP_CIPHER_CTX_get_block_size(c->essiv))) {
				return -EIO;
			}
			break;
		}
		if (c->nettle) {
			if (qcow2_nettle_crypt(c->nettle, iv, buf, n, enc) < 0)
				return -EIO;
		} else if (c->spec->ivgen != IV_NONE &&
			   !EVP_CipherInit_ex(x, NULL, NULL, NULL, iv, -1)) {
			return -EIO;
		} else if (!EVP_CipherUpdate(x, buf, &outl, buf, n) || (size_t)outl != n) {
			return -EIO;
		}
		buf += n;
		len -= n;
		sector++;
	}
	return 0;
}

static int pbkdf2(const struct crypt_spec *s, const void *pass, size_t pass_len,
		  const uint8_t *salt, uint32_t iters, uint8_t *out, size_t out_len)
{
	return PKCS5_PBKDF2_HMAC(pass, pass_len, salt, LUKS_SALT_LEN, iters, s->hash,
				 out_len, out) ? 0 : -EIO;
}

/* The AF splitter's diffusion: hash each digest-sized piece with its index. */
static int af_diffuse(const EVP_MD *md, uint8_t *block, size_t len)
{
	size_t dlen = EVP_MD_get_size(md), off;
	uint8_t out[EVP_MAX_MD_SIZE], idx[4];
	EVP_MD_CTX *h = EVP_MD_CTX_new();
	uint32_t i;
	int ret = 0;

	if (!h)
		return -ENOMEM;
	for (i = 0, off = 0; off < len; i++, off += dlen) {
		size_t n = len - off < dlen ? len - off : dlen;

		put_be32(idx, i);
		if (!EVP_DigestInit_ex(h, md, NULL) || !EVP_DigestUpdate(h, idx, 4) ||
		    !EVP_DigestUpdate(h, block + off, n) || !EVP_DigestFinal_ex(h, out, NULL)) {
			ret = -EIO;
			break;
		}
		memcpy(block + off, out, n);
	}
	EVP_MD_CTX_free(h);
	return ret;
}

/* Merge @stripes stripes of @len bytes in @split into @key. */
static int af_merge(const EVP_MD *md, const uint8_t *split, uint32_t stripes, size_t len,
		    uint8_t *key)
{
	uint8_t block[LUKS_MAX_KEY_BYTES] = { 0 };
	uint32_t i;
	size_t j;
	int ret;

	for (i = 0; i + 1 < stripes; i++) {
		for (j = 0; j < len; j++)
			block[j] ^= split[i * len + j];
		ret = af_diffuse(md, block, len);
		if (ret < 0)
			return ret;
	}
	for (j = 0; j < len; j++)
		key[j] = block[j] ^ split[(size_t)i * len + j];
	OPENSSL_cleanse(block, sizeof(block));
	return 0;
}

/* Split @key into @stripes stripes (random but the last). */
static int af_split(const EVP_MD *md, const uint8_t *key, uint32_t stripes, size_t len,
		    uint8_t *split)
{
	uint8_t block[LUKS_MAX_KEY_BYTES] = { 0 };
	uint32_t i;
	size_t j;
	int ret;

	for (i = 0; i + 1 < stripes; i++) {
		if (RAND_bytes(split + (size_t)i * len, len) != 1)
			return -EIO;
		for (j = 0; j < len; j++)
			block[j] ^= split[(size_t)i * len + j];
		ret = af_diffuse(md, block, len);
		if (ret < 0)
			return ret;
	}
	for (j = 0; j < len; j++)
		split[(size_t)i * len + j] = block[j] ^ key[j];
	OPENSSL_cleanse(block, sizeof(block));
	return 0;
}

/* ---- The LUKS header -------------------------------------------------------- */

static void get_name(char *dst, const uint8_t *src)
{
	memcpy(dst, src, LUKS_NAME_LEN);
	dst[LUKS_NAME_LEN] = '\0';
}

/* Parse and bound every field of the header area @h (@len bytes). */
static int luks_parse(struct qcow2 *img, struct qcow2_crypt *c, const uint8_t *h, uint64_t len)
{
	char mode[LUKS_NAME_LEN + 1], why[128];
	uint64_t end;
	int i, ret;

	if (memcmp(h + LH_MAGIC, luks_magic, LUKS_MAGIC_LEN))
		return qcow2_error(img, -EINVAL, "encryption header is not in LUKS format");
	if (get_be16(h + LH_VERSION) != 1)
		return qcow2_error(img, -ENOTSUP, "LUKS version %u is not supported",
				   get_be16(h + LH_VERSION));
	get_name(c->spec.cipher_name, h + LH_CIPHER);
	get_name(mode, h + LH_MODE);
	get_name(c->spec.hash_name, h + LH_HASH);
	c->payload_offset = get_be32(h + LH_PAYLOAD);
	c->spec.key_bytes = get_be32(h + LH_KEY_BYTES);
	memcpy(c->mk_digest, h + LH_MK_DIGEST, LUKS_DIGEST_LEN);
	memcpy(c->mk_salt, h + LH_MK_SALT, LUKS_SALT_LEN);
	c->mk_iters = get_be32(h + LH_MK_ITERS);
	memcpy(c->uuid, h + LH_UUID, LUKS_UUID_LEN);
	c->uuid[LUKS_UUID_LEN] = '\0';
	if (!c->spec.key_bytes || c->spec.key_bytes > LUKS_MAX_KEY_BYTES)
		return qcow2_error(img, -EINVAL, "LUKS master key size %u out of range",
				   c->spec.key_bytes);
	ret = spec_resolve(&c->spec, mode, why, sizeof(why));
	if (ret < 0)
		return qcow2_error(img, ret, "LUKS header: %s", why);
	if (!c->mk_iters || c->mk_iters > LUKS_MAX_ITERS)
		return qcow2_error(img, -EINVAL, "LUKS master key iterations %u out of range",
				   c->mk_iters);
	for (i = 0; i < LUKS_SLOTS; i++) {
		const uint8_t *p = h + LH_SLOTS + i * LH_SLOT_BYTES;
		struct luks_slot *s = &c->slots[i];

		s->active = get_be32(p);
		s->iters = get_be32(p + 4);
		memcpy(s->salt, p + 8, LUKS_SALT_LEN);
		s->key_offset = get_be32(p + 40);
		s->stripes = get_be32(p + 44);
		if (s->active != LUKS_SLOT_ENABLED && s->active != LUKS_SLOT_DISABLED)
			return qcow2_error(img, -EINVAL, "LUKS key slot %d has invalid state 0x%x",
					   i, s->active);
		if (s->active != LUKS_SLOT_ENABLED)
			continue;
		if (!s->iters || s->iters > LUKS_MAX_ITERS || !s->stripes ||
		    s->stripes > LUKS_MAX_STRIPES)
			return qcow2_error(img, -EINVAL,
					   "LUKS key slot %d: iterations %u or stripes %u "
					   "out of range",
					   i, s->iters, s->stripes);
		end = (uint64_t)s->key_offset * CRYPT_SECTOR +
		      (uint64_t)s->stripes * c->spec.key_bytes;
		if (s->key_offset * (uint64_t)CRYPT_SECTOR < LUKS_HEADER_BYTES || end > len)
			return qcow2_error(img, -EINVAL,
					   "LUKS key slot %d material (sector %u) lies outside "
					   "the encryption header",
					   i, s->key_offset);
	}
	return 0;
}

/* Try key slot @s with @key; 1 unlocked (master key in @mk), 0 wrong key, -errno. */
static int luks_try_slot(struct qcow2_crypt *c, const struct luks_slot *s, const uint8_t *hdr,
			 const void *key, size_t key_len, uint8_t *mk)
{
	size_t kb = c->spec.key_bytes, split_len = (size_t)s->stripes * kb;
	uint8_t slot_key[LUKS_MAX_KEY_BYTES], digest[LUKS_DIGEST_LEN];
	struct crypt_ctx ctx = { 0 };
	uint8_t *split = malloc(split_len);
	int ret;

	if (!split)
		return -ENOMEM;
	memcpy(split, hdr + (size_t)s->key_offset * CRYPT_SECTOR, split_len);
	ret = pbkdf2(&c->spec, key, key_len, s->salt, s->iters, slot_key, kb);
	if (!ret)
		ret = ctx_init(&ctx, &c->spec, slot_key);
	if (!ret)
		ret = ctx_run(&ctx, 0, split, split_len, false);
	if (!ret)
		ret = af_merge(c->spec.hash, split, s->stripes, kb, mk);
	if (!ret)
		ret = pbkdf2(&c->spec, mk, kb, c->mk_salt, c->mk_iters, digest, LUKS_DIGEST_LEN);
	if (!ret)
		ret = !CRYPTO_memcmp(digest, c->mk_digest, LUKS_DIGEST_LEN);
	ctx_free(&ctx);
	OPENSSL_cleanse(slot_key, sizeof(slot_key));
	OPENSSL_cleanse(split, split_len);
	free(split);
	return ret;
}

static int luks_open(struct qcow2 *img, struct qcow2_crypt *c, const struct qcow2_opts *opts)
{
	uint64_t len = img->crypt_hdr_len, rlen = (len + 4095) & ~4095ull;
	uint8_t mk[LUKS_MAX_KEY_BYTES];
	unsigned int k;
	uint8_t *h;
	int i, ret;

	if (posix_memalign((void **)&h, 4096, rlen))
		return -ENOMEM;
	ret = qcow2_io_pread(img->io, img->fd, h, rlen, img->crypt_hdr_off);
	if (ret < 0) {
		ret = qcow2_error(img, ret, "cannot read the encryption header: %s",
				  strerror(-ret));
		goto out;
	}
	ret = luks_parse(img, c, h, len);
	if (ret < 0 || !opts->nr_keys)
		goto out;
	/* The first key that opens a slot: each layer of a chain may have its own. */
	for (k = 0, ret = 0; k < opts->nr_keys && !ret; k++)
		for (i = 0; i < LUKS_SLOTS && !ret; i++)
			if (c->slots[i].active == LUKS_SLOT_ENABLED)
				ret = luks_try_slot(c, &c->slots[i], h, opts->keys[k].data,
						    opts->keys[k].len, mk);
	if (ret < 0) {
		ret = qcow2_error(img, ret, "cannot unlock the encryption key: %s", strerror(-ret));
		goto out;
	}
	if (!ret && opts->nr_keys == 1) {
		ret = qcow2_error(img, -EACCES,
				  "invalid password: no LUKS key slot opens with the given key");
		goto out;
	}
	if (!ret) {
		ret = qcow2_error(img, -EACCES, "invalid password: no LUKS key slot opens with "
				  "any of the %u given keys", opts->nr_keys);
		goto out;
	}
	ret = ctx_init(&c->data, &c->spec, mk);
	c->unlocked = !ret;
out:
	OPENSSL_cleanse(mk, sizeof(mk));
	free(h);
	return ret;
}

/*
 * Legacy AES: the passphrase's first 16 bytes, zero-padded, key AES-128-CBC.
 * Nothing tells a wrong key from a right one: the first key given is it.
 */
static int aes_open(struct qcow2 *img, struct qcow2_crypt *c, const struct qcow2_opts *opts)
{
	uint8_t key[16] = { 0 };
	char why[64];
	int ret;

	if (!img->read_only)
		return qcow2_error(img, -EROFS,
				   "legacy AES encryption is read-only; convert the image");
	snprintf(c->spec.cipher_name, sizeof(c->spec.cipher_name), "aes");
	snprintf(c->spec.hash_name, sizeof(c->spec.hash_name), "sha256");
	c->spec.key_bytes = 16;
	ret = spec_resolve(&c->spec, "cbc-plain64", why, sizeof(why));
	if (ret < 0 || !opts->nr_keys)
		return ret;
	memcpy(key, opts->keys[0].data, opts->keys[0].len < 16 ? opts->keys[0].len : 16);
	ret = ctx_init(&c->data, &c->spec, key);
	c->unlocked = !ret;
	OPENSSL_cleanse(key, sizeof(key));
	return ret;
}

/**
 * qcow2_crypt_open - set up the encryption of a freshly parsed image
 *
 * Nothing to do for an unencrypted image. Otherwise parses the encryption
 * header and, with opts->keys, unlocks the master key with the first key
 * that opens a key slot (legacy AES: the first key); without a key the
 * image opens only with opts->no_key (metadata only: data I/O then fails).
 *
 * Returns 0, -EACCES (wrong key), -ENOKEY (no key given), -EROFS (legacy AES
 * opened read-write), or -EINVAL/-ENOTSUP/-ENOMEM, with img->errmsg set.
 */
int qcow2_crypt_open(struct qcow2 *img, const struct qcow2_opts *opts)
{
	struct qcow2_crypt *c;
	int ret;

	if (!img->h.crypt_method)
		return 0;
	if (!opts->nr_keys && !opts->no_key)
		return qcow2_error(img, -ENOKEY,
				   "image is encrypted: a key is needed (--key-file/--key-secret)");
	if (img->h.size % CRYPT_SECTOR)
		return qcow2_error(img, -EINVAL,
				   "encrypted image size %llu is not a multiple of 512",
				   (unsigned long long)img->h.size);
	c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->method = img->h.crypt_method;
	img->crypt = c;
	ret = c->method == 1 ? aes_open(img, c, opts) : luks_open(img, c, opts);
	if (ret < 0) {
		qcow2_crypt_free(img);
		if (ret == -ENOMEM && !img->errmsg[0])
			qcow2_error(img, ret, "out of memory");
	}
	return ret;
}

void qcow2_crypt_free(struct qcow2 *img)
{
	if (!img->crypt)
		return;
	ctx_free(&img->crypt->data);
	OPENSSL_cleanse(img->crypt, sizeof(*img->crypt));
	free(img->crypt);
	img->crypt = NULL;
}

/* ---- Data ---------------------------------------------------------------------- */

/**
 * qcow2_crypt_buf - en/decrypt data cluster bytes in place
 * @host_off: where the bytes lie in the image file (LUKS numbers sectors by it)
 * @guest_off: where the guest sees them (legacy AES numbers sectors by it)
 * @len: a multiple of 512; both offsets 512-aligned
 *
 * Returns 0, -ENOKEY (opened without a key) or -EIO, with img->errmsg set.
 */
int qcow2_crypt_buf(struct qcow2 *img, uint64_t host_off, uint64_t guest_off, uint8_t *buf,
		    size_t len, bool encrypt)
{
	struct qcow2_crypt *c = img->crypt;
	uint64_t off = c->method == 1 ? guest_off : host_off;

	if (!c->unlocked)
		return qcow2_error(img, -ENOKEY,
				   "image is encrypted: a key is needed (--key-file/--key-secret)");
	if ((off | len) % CRYPT_SECTOR)
		return qcow2_error(img, -EINVAL, "unaligned encrypted I/O at 0x%llx",
				   (unsigned long long)off);
	if (ctx_run(&c->data, off / CRYPT_SECTOR, buf, len, encrypt) < 0)
		return qcow2_error(img, -EIO, "%s at 0x%llx failed",
				   encrypt ? "encryption" : "decryption",
				   (unsigned long long)host_off);
	return 0;
}

/**
 * qcow2_crypt_iov - encrypt what a write is about to write, into a bounce
 *
 * Gathers @iov[0..@iovcnt) into the request's bounce buffer, encrypts it for
 * @host_off and makes iov[0] point at it. Returns 1 (the new iovcnt) or
 * -errno. Only one such write per request may be in flight (qcow2_crypt_busy).
 */
int qcow2_crypt_iov(struct qcow2_req *r, struct iovec *iov, unsigned int iovcnt,
		    uint64_t host_off, uint64_t guest_off)
{
	size_t len = 0, done = 0;
	unsigned int i;
	int ret;

	for (i = 0; i < iovcnt; i++)
		len += iov[i].iov_len;
	if (len > r->crypt_buf_len) {
		uint8_t *n;

		if (posix_memalign((void **)&n, 4096, len))
			return -ENOMEM;
		free(r->crypt_buf);
		r->img->scratch_bytes += len - r->crypt_buf_len;
		r->crypt_buf = n;
		r->crypt_buf_len = len;
	}
	for (i = 0; i < iovcnt; i++) {
		memcpy(r->crypt_buf + done, iov[i].iov_base, iov[i].iov_len);
		done += iov[i].iov_len;
	}
	ret = qcow2_crypt_buf(r->img, host_off, guest_off, r->crypt_buf, len, true);
	if (ret < 0)
		return ret;
	iov[0] = (struct iovec){ .iov_base = r->crypt_buf, .iov_len = len };
	return 1;
}

/* True while a write of @r from its bounce buffer is in flight. */
bool qcow2_crypt_busy(const struct qcow2_req *r)
{
	unsigned int i;

	for (i = 0; i < REQ_AIOS; i++)
		if (r->aios[i].busy && r->aios[i].aio.op == QCOW2_AIO_WRITE &&
		    r->aios[i].iov[0].iov_base == r->crypt_buf)
			return true;
	return false;
}

/**
 * qcow2_crypt_unaligned - blocking I/O not aligned to 512 bytes
 *
 * Encrypted sectors are all or nothing: partial ones are read, merged and
 * written back whole; the aligned middle goes straight through. @op is
 * READ, WRITE or WRITE_ZEROES. Returns 0 or -errno.
 */
int qcow2_crypt_unaligned(struct qcow2 *img, enum qcow2_op op, void *buf, uint64_t len,
			  uint64_t off)
{
	uint8_t *p = buf, *sec;
	int ret = 0;

	if (posix_memalign((void **)&sec, 4096, CRYPT_SECTOR))
		return -ENOMEM;
	while (len && !ret) {
		uint64_t in = off % CRYPT_SECTOR, n;

		if (in || len < CRYPT_SECTOR) {
			n = CRYPT_SECTOR - in < len ? CRYPT_SECTOR - in : len;
			ret = qcow2_pread(img, sec, CRYPT_SECTOR, off - in);
			if (ret < 0)
				break;
			if (op == QCOW2_OP_READ) {
				memcpy(p, sec + in, n);
			} else {
				if (op == QCOW2_OP_WRITE)
					memcpy(sec + in, p, n);
				else
					memset(sec + in, 0, n);
				ret = qcow2_pwrite(img, sec, CRYPT_SECTOR, off - in);
			}
		} else {
			n = len & ~(uint64_t)(CRYPT_SECTOR - 1);
			if (op == QCOW2_OP_READ)
				ret = qcow2_pread(img, p, n, off);
			else if (op == QCOW2_OP_WRITE)
				ret = qcow2_pwrite(img, p, n, off);
			else
				ret = qcow2_write_zeroes(img, n, off, op == QCOW2_OP_WRITE_ZEROES);
		}
		if (p)
			p += n;
		off += n;
		len -= n;
	}
	free(sec);
	return ret;
}

/* ---- Information ---------------------------------------------------------------- */

int qcow2_get_crypt_info(const struct qcow2 *img, struct qcow2_crypt_info *ci)
{
	const struct qcow2_crypt *c = img->crypt;
	int i;

	memset(ci, 0, sizeof(*ci));
	if (!c)
		return -ENOENT;
	ci->format = c->method == 1 ? "aes" : "luks";
	if (c->method == 1)
		return 0;
	snprintf(ci->cipher_alg, sizeof(ci->cipher_alg), "%s-%u", c->spec.cipher_name,
		 (c->spec.mode == MODE_XTS ? c->spec.key_bytes / 2 : c->spec.key_bytes) * 8);
	ci->cipher_mode = mode_names[c->spec.mode];
	ci->ivgen_alg = ivgen_names[c->spec.ivgen];
	ci->ivgen_hash_alg = c->spec.ivgen == IV_ESSIV ? c->spec.ivhash_name : NULL;
	ci->hash_alg = c->spec.hash_name;
	ci->uuid = c->uuid;
	ci->payload_offset = (uint64_t)c->payload_offset * CRYPT_SECTOR;
	ci->master_key_iters = c->mk_iters;
	for (i = 0; i < LUKS_SLOTS; i++) {
		ci->slots[i].active = c->slots[i].active == LUKS_SLOT_ENABLED;
		ci->slots[i].iters = c->slots[i].iters;
		ci->slots[i].stripes = c->slots[i].stripes;
		ci->slots[i].key_offset = (uint64_t)c->slots[i].key_offset * CRYPT_SECTOR;
	}
	return 0;
}

/* ---- Creation --------------------------------------------------------------------- */

/* PBKDF2 iterations of @md that take @ms milliseconds here (at least 1000). */
static uint32_t pbkdf2_iters_for(const struct crypt_spec *s, size_t out_len, uint32_t ms)
{
	uint8_t salt[LUKS_SALT_LEN] = { 0 }, out[LUKS_MAX_KEY_BYTES];
	uint64_t iters = 1000, ns = 0, total;
	struct timespec a, b;

	while (ns < 20 * 1000000ull && iters < (1u << 28)) {
		iters *= 2;
		clock_gettime(CLOCK_MONOTONIC, &a);
		pbkdf2(s, "benchmark", 9, salt, iters, out, out_len);
		clock_gettime(CLOCK_MONOTONIC, &b);
		ns = (b.tv_sec - a.tv_sec) * 1000000000ull + b.tv_nsec - a.tv_nsec;
	}
	total = ns ? iters * ms * 1000000ull / ns : iters;
	if (total > LUKS_MAX_ITERS)
		total = LUKS_MAX_ITERS;
	return total < LUKS_MIN_ITERS ? LUKS_MIN_ITERS : total;
}

static void uuid_str(char *out)
{
	uint8_t u[16];

	RAND_bytes(u, sizeof(u));
	u[6] = (u[6] & 0x0f) | 0x40;
	u[8] = (u[8] & 0x3f) | 0x80;
	snprintf(out, LUKS_UUID_LEN + 1,
		 "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
		 u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11],
		 u[12], u[13], u[14], u[15]);
}

static int spec_from_opts(struct crypt_spec *s, const struct qcow2_encrypt_opts *o,
			  char *mode_spec, char *why, size_t whylen)
{
	const char *alg = o->cipher_alg ? o->cipher_alg : "aes-256";
	const char *mode = o->cipher_mode ? o->cipher_mode : "xts";
	const char *ivgen = o->ivgen_alg ? o->ivgen_alg : "plain64";
	const char *ivhash = o->ivgen_hash_alg;
	unsigned int bits;

	if (!strcmp(alg, "cast5-128")) {
		bits = 128;
		snprintf(s->cipher_name, sizeof(s->cipher_name), "cast5");
	} else if ((sscanf(alg, "aes-%u", &bits) == 1 || sscanf(alg, "serpent-%u", &bits) == 1 ||
		    sscanf(alg, "twofish-%u", &bits) == 1) &&
		   (bits == 128 || bits == 192 || bits == 256)) {
		snprintf(s->cipher_name, sizeof(s->cipher_name), "%.*s",
			 (int)(strchr(alg, '-') - alg), alg);
	} else {
		snprintf(why, whylen, "unsupported cipher algorithm '%s'", alg);
		return -ENOTSUP;
	}
	s->key_bytes = bits / 8 * (!strcmp(mode, "xts") ? 2 : 1);
	/* QEMU (7.2) asserts on key material that ends inside a sector: 24 x 4000 bytes. */
	if (s->key_bytes * LUKS_STRIPES % CRYPT_SECTOR) {
		snprintf(why, whylen, "cipher %s in mode %s: QEMU cannot open it (its key "
			 "material is not whole sectors); use xts or another key size", alg, mode);
		return -ENOTSUP;
	}
	snprintf(s->hash_name, sizeof(s->hash_name), "%s", o->hash_alg ? o->hash_alg : "sha256");
	if (!strcmp(ivgen, "essiv") && !ivhash)
		ivhash = "sha256";
	if (strlen(mode) + strlen(ivgen) + (ivhash ? strlen(ivhash) + 1 : 0) + 1 >= LUKS_NAME_LEN) {
		snprintf(why, whylen, "cipher mode '%s-%s' is too long", mode, ivgen);
		return -EINVAL;
	}
	if (ivhash)
		snprintf(mode_spec, LUKS_NAME_LEN, "%s-%s:%s", mode, ivgen, ivhash);
	else
		snprintf(mode_spec, LUKS_NAME_LEN, "%s-%s", mode, ivgen);
	return spec_resolve(s, mode_spec, why, whylen);
}

/* Key material of one slot, rounded as QEMU/cryptsetup lay it out (sectors). */
static uint32_t slot_sectors(uint32_t key_bytes)
{
	uint32_t sectors = (key_bytes * LUKS_STRIPES + CRYPT_SECTOR - 1) / CRYPT_SECTOR;
	uint32_t align = LUKS_SLOT_ALIGN / CRYPT_SECTOR;

	return (sectors + align - 1) / align * align;
}

/**
 * qcow2_luks_header_size - bytes of the LUKS header area @o asks for
 *
 * 0 with *@bytes, or -ENOTSUP/-EINVAL with @err (one line, no file name).
 */
int qcow2_luks_header_size(const struct qcow2_encrypt_opts *o, uint64_t *bytes,
			   char *err, size_t errlen)
{
	struct crypt_spec s = { 0 };
	char mode[LUKS_NAME_LEN];
	int ret;

	if (!o->format || strcmp(o->format, "luks")) {
		snprintf(err, errlen, "unsupported encryption format '%s' (only luks is created)",
			 o->format ? o->format : "");
		return -ENOTSUP;
	}
	if (!o->key) {
		snprintf(err, errlen, "encryption needs a key (encrypt.key-secret or --key-file)");
		return -EINVAL;
	}
	ret = spec_from_opts(&s, o, mode, err, errlen);
	if (ret < 0)
		return ret;
	*bytes = (uint64_t)(LUKS_SLOT_ALIGN / CRYPT_SECTOR + slot_sectors(s.key_bytes) *
			    LUKS_SLOTS) * CRYPT_SECTOR;
	return 0;
}

/**
 * qcow2_luks_header_build - lay out a new LUKS header area in @out
 *
 * @out holds qcow2_luks_header_size() bytes, zeroed by the caller. A random
 * master key, one active key slot (slot 0) opened by o->key, iterations
 * measured for o->iter_time_ms (QEMU's default 2000 when 0).
 * Returns 0 or -errno with @err.
 */
int qcow2_luks_header_build(const struct qcow2_encrypt_opts *o, uint8_t *out,
			    char *err, size_t errlen)
{
	uint32_t ms = o->iter_time_ms ? o->iter_time_ms : 2000, iters, spl, i;
	uint8_t mk[LUKS_MAX_KEY_BYTES], slot_key[LUKS_MAX_KEY_BYTES], *split = NULL;
	struct crypt_spec s = { 0 };
	struct crypt_ctx ctx = { 0 };
	char mode[LUKS_NAME_LEN], uuid[LUKS_UUID_LEN + 1];
	uint8_t *slot;
	size_t split_len;
	int ret;

	if (errlen)
		err[0] = '\0';
	ret = spec_from_opts(&s, o, mode, err, errlen);
	if (ret < 0)
		return ret;
	split_len = (size_t)s.key_bytes * LUKS_STRIPES;
	spl = slot_sectors(s.key_bytes);
	split = malloc(split_len);
	ret = -ENOMEM;
	if (!split)
		goto fail;
	ret = -EIO;
	memcpy(out + LH_MAGIC, luks_magic, LUKS_MAGIC_LEN);
	put_be16(out + LH_VERSION, 1);
	memcpy(out + LH_CIPHER, s.cipher_name, strlen(s.cipher_name));
	memcpy(out + LH_MODE, mode, strlen(mode));
	memcpy(out + LH_HASH, s.hash_name, strlen(s.hash_name));
	put_be32(out + LH_PAYLOAD, LUKS_SLOT_ALIGN / CRYPT_SECTOR + spl * LUKS_SLOTS);
	put_be32(out + LH_KEY_BYTES, s.key_bytes);
	if (RAND_bytes(mk, s.key_bytes) != 1 || RAND_bytes(out + LH_MK_SALT, LUKS_SALT_LEN) != 1)
		goto fail;
	/* As QEMU: the digest costs an eighth of the time, the slot all of it. */
	iters = pbkdf2_iters_for(&s, LUKS_DIGEST_LEN, ms) / 8;
	iters = iters < LUKS_MIN_ITERS ? LUKS_MIN_ITERS : iters;
	put_be32(out + LH_MK_ITERS, iters);
	if (pbkdf2(&s, mk, s.key_bytes, out + LH_MK_SALT, iters, out + LH_MK_DIGEST,
		   LUKS_DIGEST_LEN) < 0)
		goto fail;
	uuid_str(uuid);
	memcpy(out + LH_UUID, uuid, strlen(uuid));
	for (i = 0; i < LUKS_SLOTS; i++) {
		slot = out + LH_SLOTS + i * LH_SLOT_BYTES;
		put_be32(slot, i ? LUKS_SLOT_DISABLED : LUKS_SLOT_ENABLED);
		put_be32(slot + 40, LUKS_SLOT_ALIGN / CRYPT_SECTOR + spl * i);
		put_be32(slot + 44, LUKS_STRIPES);
	}
	slot = out + LH_SLOTS;
	iters = pbkdf2_iters_for(&s, s.key_bytes, ms);
	put_be32(slot + 4, iters);
	if (RAND_bytes(slot + 8, LUKS_SALT_LEN) != 1 ||
	    pbkdf2(&s, o->key, o->key_len, slot + 8, iters, slot_key, s.key_bytes) < 0)
		goto fail;
	ret = ctx_init(&ctx, &s, slot_key);
	if (ret < 0)
		goto fail;
	ret = af_split(s.hash, mk, LUKS_STRIPES, s.key_bytes, split);
	if (!ret)
		ret = ctx_run(&ctx, 0, split, split_len, true);
	if (ret < 0)
		goto fail;
	memcpy(out + LUKS_SLOT_ALIGN, split, split_len);
	ret = 0;
fail:
	if (ret < 0 && !err[0])
		snprintf(err, errlen, "cannot build the LUKS header: %s", strerror(-ret));
	ctx_free(&ctx);
	OPENSSL_cleanse(mk, sizeof(mk));
	OPENSSL_cleanse(slot_key, sizeof(slot_key));
	if (split)
		OPENSSL_cleanse(split, split_len);
	free(split);
	return ret;
}
