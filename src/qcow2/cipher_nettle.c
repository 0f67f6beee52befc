// SPDX-License-Identifier: MIT
/*
 * The block ciphers QEMU's LUKS writes that OpenSSL lacks: serpent and
 * twofish (128/192/256-bit keys), in ECB, CBC, CTR and XTS, through nettle
 * (QEMU's own crypto backend here). crypto.c drives them per sector with the
 * IV it generates; this file knows nothing of LUKS or sectors.
 *
 * As QEMU's crypto/xts.c: XTS splits the key in halves, the first keys the
 * data, the second the tweak (the IV). CTR counts big-endian from the IV.
 */
#include <stdlib.h>
#include <string.h>

#include <nettle/cbc.h>
#include <nettle/ctr.h>
#include <nettle/nettle-meta.h>
#include <nettle/xts.h>

#include "internal.h"

struct qcow2_nettle {
	const struct nettle_cipher *alg;
	enum qcow2_cipher_mode mode;
	void *enc, *dec, *tweak;	/* key schedules, context_size bytes each */
	size_t ctx_bytes;
};

/* nettle's cipher for @name with a @key_bytes key (one half of an XTS key). */
static const struct nettle_cipher *alg_lookup(const char *name, uint32_t key_bytes)
{
	static const struct {
		const char *name;
		const struct nettle_cipher *alg;
	} algs[] = {
		{ "serpent", &nettle_serpent128 }, { "serpent", &nettle_serpent192 },
		{ "serpent", &nettle_serpent256 }, { "twofish", &nettle_twofish128 },
		{ "twofish", &nettle_twofish192 }, { "twofish", &nettle_twofish256 },
	};
	size_t i;

	for (i = 0; i < sizeof(algs) / sizeof(algs[0]); i++)
		if (!strcmp(name, algs[i].name) && algs[i].alg->key_size == key_bytes)
			return algs[i].alg;
	return NULL;
}

/**
 * qcow2_nettle_has - does this file do @name in @mode with a @key_bytes key?
 * @key_bytes: the whole key (both halves for XTS)
 */
bool qcow2_nettle_has(const char *name, enum qcow2_cipher_mode mode, uint32_t key_bytes)
{
	if (mode == QCOW2_CIPHER_XTS) {
		if (key_bytes % 2)
			return false;
		key_bytes /= 2;
	}
	return alg_lookup(name, key_bytes) != NULL;
}

/**
 * qcow2_nettle_new - key a cipher (see qcow2_nettle_has for the arguments)
 *
 * Returns 0 with *@out, -ENOTSUP (not a cipher of this file) or -ENOMEM.
 */
int qcow2_nettle_new(struct qcow2_nettle **out, const char *name, enum qcow2_cipher_mode mode,
		     const uint8_t *key, uint32_t key_bytes)
{
	uint32_t half = mode == QCOW2_CIPHER_XTS ? key_bytes / 2 : key_bytes;
	const struct nettle_cipher *alg;
	struct qcow2_nettle *n;

	if (!qcow2_nettle_has(name, mode, key_bytes))
		return -ENOTSUP;
	alg = alg_lookup(name, half);
	n = calloc(1, sizeof(*n));
	if (!n)
		return -ENOMEM;
	n->alg = alg;
	n->mode = mode;
	n->ctx_bytes = alg->context_size;
	n->enc = calloc(3, n->ctx_bytes);
	if (!n->enc) {
		free(n);
		return -ENOMEM;
	}
	n->dec = (uint8_t *)n->enc + n->ctx_bytes;
	n->tweak = (uint8_t *)n->enc + 2 * n->ctx_bytes;
	alg->set_encrypt_key(n->enc, key);
	alg->set_decrypt_key(n->dec, key);
	if (mode == QCOW2_CIPHER_XTS)
		alg->set_encrypt_key(n->tweak, key + half);
	*out = n;
	return 0;
}

/* Block size of @n's cipher (16 for both). */
size_t qcow2_nettle_block_size(const struct qcow2_nettle *n)
{
	return n->alg->block_size;
}

/**
 * qcow2_nettle_crypt - en/decrypt @len bytes of @buf in place
 * @iv: a block (ignored by ECB); not changed
 *
 * @len is a multiple of the block size (XTS: at least one block). 0 or -EINVAL.
 */
int qcow2_nettle_crypt(struct qcow2_nettle *n, const uint8_t *iv, uint8_t *buf, size_t len,
		       bool enc)
{
	size_t bs = n->alg->block_size;
	uint8_t tmp[16];	/* serpent and twofish blocks */

	if (len % bs || (n->mode == QCOW2_CIPHER_XTS && len < bs))
		return -EINVAL;
	switch (n->mode) {
	case QCOW2_CIPHER_ECB:
		(enc ? n->alg->encrypt : n->alg->decrypt)(enc ? n->enc : n->dec, len, buf, buf);
		break;
	case QCOW2_CIPHER_CBC:
		memcpy(tmp, iv, bs);
		if (enc)
			cbc_encrypt(n->enc, n->alg->encrypt, bs, tmp, len, buf, buf);
		else
			cbc_decrypt(n->dec, n->alg->decrypt, bs, tmp, len, buf, buf);
		break;
	case QCOW2_CIPHER_CTR:
		memcpy(tmp, iv, bs);
		ctr_crypt(n->enc, n->alg->encrypt, bs, tmp, len, buf, buf);
		break;
	case QCOW2_CIPHER_XTS:
		if (enc)
			xts_encrypt_message(n->enc, n->tweak, n->alg->encrypt, iv, len, buf, buf);
		else
			xts_decrypt_message(n->dec, n->tweak, n->alg->decrypt, n->alg->encrypt, iv,
					    len, buf, buf);
		break;
	}
	return 0;
}

/* Wipe the key schedules and free @n (NULL is fine). */
void qcow2_nettle_free(struct qcow2_nettle *n)
{
	if (!n)
		return;
	explicit_bzero(n->enc, 3 * n->ctx_bytes);
	free(n->enc);
	free(n);
}
