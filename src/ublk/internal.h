/* SPDX-License-Identifier: MIT */
/*
 * Structures shared inside src/ublk: the device, its queues and their
 * per-tag state. Nothing here is visible to targets or tools.
 */
#ifndef UBLK_INTERNAL_H
#define UBLK_INTERNAL_H

#include <pthread.h>
#include <semaphore.h>

#include "ublk.h"

/* user_data of a queue ring's CQEs: the top bits say whose it is. */
#define UBLK_UD_TGT		(1ULL << 63)	/* target I/O, data below */
#define UBLK_UD_WAKE		(1ULL << 62)	/* the queue's eventfd read */
#define UBLK_UD_COPY		(1ULL << 61)	/* USER_COPY read or write, tag below */
#define UBLK_UD_DATA_MASK	((1ULL << 62) - 1)

enum ublk_tag_state {
	UBLK_TAG_KERNEL,	/* an IO command is with the driver */
	UBLK_TAG_TARGET,	/* the target serves the request */
	UBLK_TAG_PENDING,	/* a command waits for a free SQE */
	UBLK_TAG_DONE,		/* aborted: never issued again */
	UBLK_TAG_DEAD,		/* aborted while the target holds it: no commit */
	UBLK_TAG_BUFWAIT,	/* a request waits for buffer pages */
};

/* pool.c: a queue's data buffers, 4 KiB pages handed out first-fit. */
#define UBLK_POOL_PAGE		4096u
#define UBLK_POOL_BYTES		(4u << 20)	/* per queue, unless one request needs more */

/* Pages [first, first + pages) of a queue's pool. */
struct ublk_buf_run {
	uint32_t first;
	uint32_t pages;
};

struct ublk_pool {
	uint8_t *base;
	uint64_t *map;		/* a bit per page: in use */
	unsigned int pages;
	unsigned int free;
};

int ublk_pool_init(struct ublk_pool *p, size_t bytes);
void ublk_pool_fini(struct ublk_pool *p);
int ublk_pool_alloc(struct ublk_pool *p, unsigned int n);
void ublk_pool_free(struct ublk_pool *p, unsigned int first, unsigned int n);

struct ublk_tag {
	uint8_t state;		/* enum ublk_tag_state */
	uint8_t next_cmd;	/* UBLK_IO_* to send when PENDING */
	int res;		/* result carried by COMMIT_AND_FETCH_REQ */
	bool get_data;		/* NEED_GET_DATA sent for the target: data_ready() follows */
	bool owes_data;		/* a WRITE the target holds before its NEED_GET_DATA */
	bool commit_after;	/* NEED_GET_DATA owed by a finished WRITE: commit next */
	void *addr;		/* where NEED_GET_DATA copies to (NULL: the tag's buffer) */
	uint32_t buf_first;	/* the tag's buffer: pool pages [first, first + pages) */
	uint32_t buf_pages;	/* 0: holds no buffer */
	bool copy;		/* zero copy device, but this request copies (ublk_queue_copy) */
};

struct ublk_queue {
	struct ublk_dev *dev;
	struct ublk_tgt *tgt;
	unsigned int q_id;
	unsigned int depth;
	struct io_uring ring;

	struct ublksrv_io_desc *iods;	/* the driver's io-desc array (mmap) */
	size_t iods_len;
	struct ublk_pool pool;		/* the requests' data buffers */
	size_t buf_bytes;		/* the largest request */
	struct ublk_tag *tags;
	uint16_t *pending;		/* tags in UBLK_TAG_PENDING, FIFO */
	unsigned int pending_head, nr_pending;
	uint16_t *bufwait;		/* tags in UBLK_TAG_BUFWAIT, FIFO */
	unsigned int bufwait_head, nr_bufwait;
	struct ublk_buf_run *release;	/* READ buffers to free once their commit is submitted */
	unsigned int nr_release;	/* (at most one per pool page) */

	unsigned int nr_cmds;		/* IO commands with the driver */
	unsigned int nr_target;		/* requests the target holds */
	unsigned int nr_tgt_io;		/* target SQEs in flight */
	unsigned int nr_copies;		/* USER_COPY reads and writes in flight */
	uint64_t wake_val;
	bool wake_armed;
	int wake_fd;			/* eventfd behind ublk_queue_wake() */

	cpu_set_t cpus;
	bool pin;
	pthread_t thread;
	bool thread_started;
	int err;			/* why the thread stopped early */
};

struct ublk_dev {
	struct ublk_ctrl *ctrl;
	struct ublk_tgt *tgt;
	struct ublk_dev_cfg cfg;
	struct ublksrv_ctrl_dev_info info;
	bool added;
	bool started;			/* START_DEV succeeded */
	bool recovering;		/* START_USER_RECOVERY sent: END it, not START_DEV */
	bool stop_sent;
	int char_fd;
	bool io_ioctl;			/* IO commands use ioctl encoding */
	bool user_copy;			/* UBLK_F_USER_COPY: data moves by read/write on char_fd */
	bool zero_copy;			/* UBLK_F_AUTO_BUF_REG: requests' pages in the rings */
	struct ublk_queue *queues;
	unsigned int nr_setup;		/* queues through ublk_queue_setup() */
	unsigned int nr_threads;	/* queue threads started */
	unsigned int nr_exited;
	int exit_fd;			/* eventfd: a queue thread finished */
	sem_t ready;
};

/* queue.c */
int ublk_queue_setup(struct ublk_queue *q, struct ublk_dev *dev, unsigned int q_id);
void ublk_queue_teardown(struct ublk_queue *q);
void *ublk_queue_thread(void *arg);

/* ctrl.c: log one line on stderr ("ublk: ..."), for the daemon's log. */
void ublk_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
