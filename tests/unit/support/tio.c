// SPDX-License-Identifier: MIT
/*
 * The recording, fault-injecting test backend (tio.h). Each operation the
 * engine submits travels to the io_uring backend as a shadow that carries
 * it, so the completion passes here first: logged, or turned into an error.
 * A failed operation that never reaches the file completes from the next
 * wait(), never from inside submit(), as a real backend would.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "tio.h"

struct tio_shadow {
	struct qcow2_aio aio;
	struct qcow2_aio *orig;
	struct tio *t;
	int file;		/* tracked file index, or -1 */
	int64_t rec;		/* write or sync record, or -1 */
	int err;		/* injected result, or 0 */
	struct iovec half;	/* a short write's only piece */
	struct tio_shadow *next;
};

static int grow(void **arr, uint32_t *alloc, uint32_t nr, size_t size)
{
	void *n;
	uint32_t cap;

	if (nr < *alloc)
		return 0;
	cap = *alloc ? 2 * *alloc : 256;
	n = realloc(*arr, (size_t)cap * size);
	if (!n)
		return -ENOMEM;
	*arr = n;
	*alloc = cap;
	return 0;
}

static int log_ev(struct tio *t, enum tio_ev_kind kind, uint32_t ref, uint32_t *at)
{
	if (grow((void **)&t->evs, &t->evs_alloc, t->nr_evs, sizeof(*t->evs)))
		return -ENOMEM;
	if (at)
		*at = t->nr_evs;
	t->evs[t->nr_evs++] = (struct tio_ev){ .kind = kind, .ref = ref };
	return 0;
}

int tio_guest(struct tio *t, enum tio_ev_kind kind, uint32_t ref)
{
	return t->logging ? log_ev(t, kind, ref, NULL) : 0;
}

static int file_of(struct tio *t, int fd)
{
	struct stat st;
	int i;

	if (fstat(fd, &st) < 0)
		return -1;
	for (i = 0; i < t->nr_files; i++)
		if (t->files[i].dev == st.st_dev && t->files[i].ino == st.st_ino)
			return i;
	return -1;
}

static uint64_t rnd(struct tio *t)
{
	t->rng ^= t->rng << 13;
	t->rng ^= t->rng >> 7;
	t->rng ^= t->rng << 17;
	return t->rng;
}

/* Does the fault rule hit this operation? */
static bool fault_hits(struct tio *t, enum qcow2_aio_op op)
{
	const struct tio_fault *f = &t->fault;

	if (!(f->ops & (1u << op)))
		return false;
	t->matched++;
	if (f->nth)
		return t->matched == f->nth || (f->persist && t->matched > f->nth);
	return (rnd(t) & 0xffff) < f->per_64k;
}

static void shadow_done(struct qcow2_aio *aio, int res)
{
	struct tio_shadow *sh = (struct tio_shadow *)aio;
	struct qcow2_aio *orig = sh->orig;
	struct tio *t = sh->t;

	if (sh->err)
		res = sh->err;
	if (sh->rec >= 0 && orig->op == QCOW2_AIO_WRITE) {
		t->writes[sh->rec].res = res;
		log_ev(t, TIO_W_DONE, sh->rec, &t->writes[sh->rec].done);
	} else if (sh->rec >= 0) {
		t->syncs[sh->rec].res = res;
		log_ev(t, TIO_F_DONE, sh->rec, &t->syncs[sh->rec].done);
	}
	t->inflight--;
	free(sh);
	orig->done(orig, res);
}

/* Log a write about to reach the file: its bytes as submitted. */
static int log_write(struct tio *t, struct tio_shadow *sh)
{
	const struct qcow2_aio *aio = &sh->aio;	/* as forwarded: a short write's part */
	struct tio_write *w;
	uint64_t len = 0, pos = 0;
	unsigned int i;

	for (i = 0; i < aio->iovcnt; i++)
		len += aio->iov[i].iov_len;
	if (grow((void **)&t->writes, &t->writes_alloc, t->nr_writes, sizeof(*t->writes)))
		return -ENOMEM;
	w = &t->writes[t->nr_writes];
	*w = (struct tio_write){ .file = sh->file, .off = aio->off, .len = len,
				 .done = UINT32_MAX };
	w->data = malloc(len ? len : 1);
	if (!w->data)
		return -ENOMEM;
	for (i = 0; i < aio->iovcnt; i++) {
		memcpy(w->data + pos, aio->iov[i].iov_base, aio->iov[i].iov_len);
		pos += aio->iov[i].iov_len;
	}
	sh->rec = t->nr_writes++;
	return log_ev(t, TIO_W_SUB, sh->rec, &w->sub);
}

static int log_sync(struct tio *t, struct tio_shadow *sh)
{
	struct tio_sync *s;

	if (grow((void **)&t->syncs, &t->syncs_alloc, t->nr_syncs, sizeof(*t->syncs)))
		return -ENOMEM;
	s = &t->syncs[t->nr_syncs];
	*s = (struct tio_sync){ .file = sh->file, .done = UINT32_MAX };
	sh->rec = t->nr_syncs++;
	return log_ev(t, TIO_F_SUB, sh->rec, &s->sub);
}

static int tio_submit(struct qcow2_io *io, struct qcow2_aio *aio)
{
	struct tio *t = (struct tio *)io;
	struct tio_shadow *sh = calloc(1, sizeof(*sh));
	bool forward = true;
	int ret;

	if (!sh)
		return -ENOMEM;
	sh->aio = *aio;
	sh->aio.done = shadow_done;
	sh->orig = aio;
	sh->t = t;
	sh->rec = -1;
	sh->file = aio->op == QCOW2_AIO_READ ? -1 : file_of(t, aio->fd);
	if (fault_hits(t, aio->op)) {
		t->injected++;
		if (t->fault.short_write) {
			/* Half the first piece lands; the file system's count comes back. */
			sh->half = (struct iovec){ .iov_base = aio->iov[0].iov_base,
						   .iov_len = aio->iov[0].iov_len / 2 };
			sh->aio.iov = &sh->half;
			sh->aio.iovcnt = 1;
		} else {
			sh->err = t->fault.err;
			forward = aio->op == QCOW2_AIO_WRITE && t->fault.land;
		}
	}
	if (aio->op == QCOW2_AIO_WRITE && sh->file < 0 && forward)
		t->stray_writes++;
	if (t->logging && sh->file >= 0 && forward) {
		ret = aio->op == QCOW2_AIO_WRITE ? log_write(t, sh) : log_sync(t, sh);
		if (ret < 0) {
			free(sh);
			return ret;
		}
	}
	t->inflight++;
	if (!forward) {
		if (t->failed_tail)
			t->failed_tail->next = sh;
		else
			t->failed = sh;
		t->failed_tail = sh;
		return 0;
	}
	ret = t->inner->submit(t->inner, &sh->aio);
	if (ret < 0) {
		/* Not queued: no completion will come. */
		t->inflight--;
		if (sh->rec >= 0 && aio->op == QCOW2_AIO_WRITE)
			t->writes[sh->rec].res = ret;
		else if (sh->rec >= 0)
			t->syncs[sh->rec].res = ret;
		free(sh);
	}
	return ret;
}

static int tio_wait(struct qcow2_io *io)
{
	struct tio *t = (struct tio *)io;
	struct tio_shadow *sh = t->failed;

	if (!sh)
		return t->inner->wait(t->inner);
	/* Complete the failed ones queued so far; their callbacks may queue more. */
	t->failed = t->failed_tail = NULL;
	while (sh) {
		struct tio_shadow *next = sh->next;

		shadow_done(&sh->aio, sh->err);
		sh = next;
	}
	return 0;
}

struct tio *tio_new(unsigned int depth)
{
	struct tio *t = calloc(1, sizeof(*t));

	if (!t)
		return NULL;
	t->inner = qcow2_uring_new(depth);
	if (!t->inner) {
		free(t);
		return NULL;
	}
	t->io.submit = tio_submit;
	t->io.wait = tio_wait;
	t->rng = 88172645463325252ull;
	return t;
}

void tio_log_clear(struct tio *t)
{
	uint32_t i;

	for (i = 0; i < t->nr_writes; i++)
		free(t->writes[i].data);
	t->nr_writes = t->nr_syncs = t->nr_evs = 0;
	t->stray_writes = 0;
}

void tio_free(struct tio *t)
{
	int i;

	if (!t)
		return;
	tio_log_clear(t);
	free(t->writes);
	free(t->syncs);
	free(t->evs);
	for (i = 0; i < t->nr_files; i++)
		free(t->files[i].path);
	qcow2_uring_free(t->inner);
	free(t);
}

int tio_track(struct tio *t, const char *path)
{
	struct stat st;

	if (t->nr_files == TIO_MAX_FILES)
		return -ENOSPC;
	if (stat(path, &st) < 0)
		return -errno;
	t->files[t->nr_files].dev = st.st_dev;
	t->files[t->nr_files].ino = st.st_ino;
	t->files[t->nr_files].path = strdup(path);
	if (!t->files[t->nr_files].path)
		return -ENOMEM;
	return t->nr_files++;
}

void tio_fault_set(struct tio *t, const struct tio_fault *f)
{
	if (f)
		t->fault = *f;
	else
		memset(&t->fault, 0, sizeof(t->fault));
	t->matched = 0;
	t->injected = 0;
	t->rng = (f && f->seed ? f->seed : 88172645463325252ull);
}
