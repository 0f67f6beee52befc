// SPDX-License-Identifier: MIT
/*
 * Workloads and the read-back model (wl.h). Requests of one batch never
 * overlap and a batch drains before the next starts, so op order (their
 * index) is the order their effects stack in.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "wl.h"

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ull;
	x ^= x >> 33;
	return x;
}

uint8_t wl_byte(uint32_t seed, uint64_t off)
{
	return mix(((uint64_t)seed << 40) ^ (off >> 3)) >> (8 * (off & 7));
}

void wl_fill(uint32_t seed, uint64_t off, uint8_t *buf, uint64_t len)
{
	uint64_t i = 0;

	/* A word of pattern per aligned 8 bytes: one hash, not eight. */
	while (i < len) {
		uint64_t word = mix(((uint64_t)seed << 40) ^ ((off + i) >> 3));
		unsigned int k;

		for (k = (off + i) & 7; k < 8 && i < len; k++, i++)
			buf[i] = word >> (8 * k);
	}
}

static uint64_t rnd(struct wl *w)
{
	w->rng ^= w->rng << 13;
	w->rng ^= w->rng >> 7;
	w->rng ^= w->rng << 17;
	return w->rng;
}

int wl_init(struct wl *w, struct qcow2 *img, struct tio *t, const struct wl_cfg *cfg)
{
	unsigned int i;

	memset(w, 0, sizeof(*w));
	w->cfg = *cfg;
	w->img = img;
	w->t = t;
	w->rng = cfg->seed ? cfg->seed : 1;
	w->reqs = calloc(cfg->batch, sizeof(*w->reqs));
	w->bufs = calloc(cfg->batch, sizeof(*w->bufs));
	if (!w->reqs || !w->bufs)
		return -ENOMEM;
	for (i = 0; i < cfg->batch; i++) {
		w->reqs[i] = qcow2_req_new(img);
		w->bufs[i] = malloc(cfg->max_len);
		if (!w->reqs[i] || !w->bufs[i])
			return -ENOMEM;
	}
	return 0;
}

void wl_fini(struct wl *w)
{
	unsigned int i;

	for (i = 0; w->reqs && i < w->cfg.batch; i++) {
		qcow2_req_free(w->reqs[i]);
		free(w->bufs[i]);
	}
	free(w->reqs);
	free(w->bufs);
	free(w->ops);
	memset(w, 0, sizeof(*w));
}

struct slot {
	struct wl *w;
	uint32_t op;
};

static void op_done(struct qcow2_req *req, int res, void *priv)
{
	struct slot *s = priv;
	struct wl_op *o = &s->w->ops[s->op];

	(void)req;
	o->res = res;
	o->done = true;
	o->ack_ev = s->w->t->nr_evs;
	tio_guest(s->w->t, TIO_G_DONE, s->op);
}

static bool overlaps(const struct wl *w, uint32_t first, uint64_t off, uint64_t len)
{
	uint32_t i;

	for (i = first; i < w->nr_ops; i++)
		if (w->ops[i].op != QCOW2_OP_FLUSH &&
		    off < w->ops[i].off + w->ops[i].len && w->ops[i].off < off + len)
			return true;
	return false;
}

static int add_op(struct wl *w, uint32_t first)
{
	const struct wl_cfg *c = &w->cfg;
	struct wl_op *o;
	uint64_t kind;

	if (w->nr_ops == w->ops_alloc) {
		uint32_t n = w->ops_alloc ? 2 * w->ops_alloc : 256;
		struct wl_op *no = realloc(w->ops, n * sizeof(*no));

		if (!no)
			return -ENOMEM;
		w->ops = no;
		w->ops_alloc = n;
	}
	o = &w->ops[w->nr_ops];
	memset(o, 0, sizeof(*o));
	kind = rnd(w) % 100;
	if (kind < c->flush_pct) {
		o->op = QCOW2_OP_FLUSH;
	} else if (kind < c->flush_pct + 14) {
		o->op = kind & 1 ? QCOW2_OP_WRITE_ZEROES : QCOW2_OP_WRITE_ZEROES_NOUNMAP;
	} else if (c->discard && kind < c->flush_pct + 28) {
		o->op = QCOW2_OP_DISCARD;
	} else {
		o->op = QCOW2_OP_WRITE;
		o->seed = (uint32_t)rnd(w) | 1;
	}
	while (o->op != QCOW2_OP_FLUSH) {
		o->len = 1 + rnd(w) % c->max_len;
		o->off = rnd(w) % (c->disk - o->len + 1);
		if (o->op == QCOW2_OP_DISCARD) {
			/* Whole units only: a partial one is not discarded at all. */
			o->off -= o->off % c->align;
			o->len = (o->len + c->align - 1) / c->align * c->align;
			if (o->off + o->len > c->disk)
				o->len = c->disk - o->off;
		}
		if (!overlaps(w, first, o->off, o->len))
			break;
	}
	w->nr_ops++;
	return 0;
}

static int run(struct wl *w, uint32_t first)
{
	struct slot *slots = calloc(w->nr_ops - first, sizeof(*slots));
	uint32_t i;
	int ret;

	if (!slots)
		return -ENOMEM;
	for (i = first; i < w->nr_ops; i++) {
		struct wl_op *o = &w->ops[i];
		uint8_t *buf = w->bufs[i - first];

		if (o->op == QCOW2_OP_WRITE)
			wl_fill(o->seed, o->off, buf, o->len);
		slots[i - first] = (struct slot){ .w = w, .op = i };
		o->sub_ev = w->t->nr_evs;
		tio_guest(w->t, TIO_G_SUB, i);
		qcow2_req_submit(w->reqs[i - first], o->op, o->off, o->len, buf, op_done,
				 &slots[i - first]);
	}
	ret = qcow2_drain(w->img);
	for (i = first; !ret && i < w->nr_ops; i++)
		if (!w->ops[i].done)
			ret = -EIO;
	free(slots);
	return ret;
}

int wl_batch(struct wl *w)
{
	uint32_t first = w->nr_ops;
	unsigned int i;
	int ret;

	for (i = 0; i < w->cfg.batch; i++) {
		ret = add_op(w, first);
		if (ret < 0)
			return ret;
	}
	return run(w, first);
}

int wl_flush(struct wl *w)
{
	uint32_t first = w->nr_ops;
	int ret;

	if (add_op(w, first) < 0)
		return -ENOMEM;
	w->ops[first] = (struct wl_op){ .op = QCOW2_OP_FLUSH };
	ret = run(w, first);
	return ret < 0 ? ret : w->ops[first].res;
}

/* ---- The model ------------------------------------------------------------ */

int wl_model_init(struct wl_model *md, const uint8_t *base, uint64_t disk)
{
	memset(md, 0, sizeof(*md));
	md->disk = disk;
	md->m = malloc(disk);
	md->last = malloc(disk * sizeof(*md->last));
	md->ok = malloc(disk);
	if (!md->m || !md->last || !md->ok)
		return -ENOMEM;
	wl_model_reset(md, base);
	return 0;
}

void wl_model_reset(struct wl_model *md, const uint8_t *base)
{
	memcpy(md->m, base, md->disk);
	memset(md->last, 0, md->disk * sizeof(*md->last));
	md->seq = 0;
	md->nr_unc = 0;
}

void wl_model_free(struct wl_model *md)
{
	free(md->m);
	free(md->last);
	free(md->ok);
	free(md->unc);
	memset(md, 0, sizeof(*md));
}

int wl_model_apply(struct wl_model *md, const struct wl_op *op, bool certain)
{
	uint64_t i;

	if (op->op == QCOW2_OP_FLUSH || op->op == QCOW2_OP_READ)
		return 0;
	md->seq++;
	if (!certain) {
		if (md->nr_unc == md->unc_alloc) {
			uint32_t n = md->unc_alloc ? 2 * md->unc_alloc : 64;
			struct wl_unc *nu = realloc(md->unc, n * sizeof(*nu));

			if (!nu)
				return -ENOMEM;
			md->unc = nu;
			md->unc_alloc = n;
		}
		md->unc[md->nr_unc++] = (struct wl_unc){ .op = op, .seq = md->seq };
		return 0;
	}
	if (op->op == QCOW2_OP_WRITE)
		wl_fill(op->seed, op->off, md->m + op->off, op->len);
	else
		memset(md->m + op->off, 0, op->len);
	for (i = op->off; i < op->off + op->len; i++)
		md->last[i] = md->seq;
	return 0;
}

void wl_model_drop_unc(struct wl_model *md)
{
	md->nr_unc = 0;
}

/*
 * Mark in @ok the bytes an op of unknown outcome could have left as @data
 * shows them: the op's value, and no certain op over it later.
 */
static int unc_explain(const struct wl_model *md, const uint8_t *data, uint8_t *ok)
{
	uint32_t i;
	uint64_t b;

	for (i = 0; i < md->nr_unc; i++) {
		const struct wl_op *o = md->unc[i].op;
		uint8_t *v = calloc(1, o->len ? o->len : 1);

		if (!v)
			return -ENOMEM;
		if (o->op == QCOW2_OP_WRITE)
			wl_fill(o->seed, o->off, v, o->len);
		for (b = 0; b < o->len; b++)
			if (data[o->off + b] == v[b] && md->unc[i].seq >= md->last[o->off + b])
				ok[o->off + b] = 1;
		free(v);
	}
	return 0;
}

int64_t wl_model_check(const struct wl_model *md, const uint8_t *data)
{
	uint8_t *ok = NULL;
	int64_t bad = -1;

	uint64_t i;

	for (i = 0; i < md->disk; i++) {
		/* Most of the disk is as certain: skip it a block at a time. */
		if (!(i & 4095) && md->disk - i >= 4096 && !memcmp(data + i, md->m + i, 4096)) {
			i += 4095;
			continue;
		}
		if (data[i] == md->m[i])
			continue;
		if (!ok) {
			ok = md->ok;
			memset(ok, 0, md->disk);
			if (unc_explain(md, data, ok) < 0)
				return i;
		}
		if (!ok[i]) {
			bad = i;
			break;
		}
	}
	return bad;
}
