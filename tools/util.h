/* SPDX-License-Identifier: MIT */
/*
 * Small helpers shared by the subcommands: the one error-line format, size
 * and option-list parsing, sizes printed the way qemu-img prints them, and
 * JSON strings. No image format knowledge lives here.
 */
#ifndef UQ_UTIL_H
#define UQ_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define UQ_PROG "ublk-qcow2"

/*
 * Print "ublk-qcow2: <message>" as one line on stderr, and to syslog
 * (LOG_ERR) once uq_log_syslog() was called.
 */
void uq_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* "ublk-qcow2: warning: <message>", as uq_err() (LOG_WARNING). */
void uq_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* With -v: "ublk-qcow2: debug: <message>" on stderr (and LOG_DEBUG). */
void uq_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* -v: let uq_debug() print. */
void uq_log_verbose(bool on);
bool uq_log_is_verbose(void);

/*
 * A detached daemon has no terminal: from now on uq_err() and uq_debug()
 * lines also go to syslog (facility daemon, tag ublk-qcow2, with the pid).
 */
void uq_log_syslog(void);

/* The same, for a line that is already formatted (the ublk library's). */
void uq_log_line(const char *line);

/*
 * Parse a byte count: decimal (optionally with a fraction) or 0x-hex, with
 * an optional suffix b/k/M/G/T/P/E (powers of 1024, any case).
 * 0 or -EINVAL (not a number) / -ERANGE (too large).
 */
int uq_parse_size(const char *s, uint64_t *out);

/*
 * Split an "a=b,c=d" list (",," stands for a literal comma) in place and
 * call @fn for each pair (@val is NULL for a bare "a"; @key is "" for an
 * empty pair, as ",a" or "a=1," or "=1" give). Stops at the first
 * nonzero return of @fn and returns it; 0 when every pair was accepted.
 */
int uq_parse_opts(char *s, int (*fn)(void *opaque, const char *key, const char *val),
		  void *opaque);

/* Parse "on"/"off" (and yes/no, true/false, 1/0). 0 or -EINVAL. */
int uq_parse_bool(const char *s, bool *out);

/* Format @bytes like QEMU's size_to_str ("196 KiB", "1 GiB"). */
void uq_size_str(uint64_t bytes, char *buf, size_t len);

/* Write @s as a JSON string literal, quotes included. */
void uq_json_str(FILE *f, const char *s);

/*
 * A JSON writer that indents like QEMU's pretty printer (4 spaces, one
 * member per line). Members come out in call order; @key is NULL for
 * array elements and the top level.
 */
struct uq_json {
	FILE *f;
	int depth;
	bool need_comma;
};

void uq_json_open(struct uq_json *j, const char *key, char bracket);
void uq_json_close(struct uq_json *j, char bracket);
void uq_json_int(struct uq_json *j, const char *key, uint64_t v);
void uq_json_bool(struct uq_json *j, const char *key, bool v);
void uq_json_string(struct uq_json *j, const char *key, const char *v);

/*
 * Report a getopt_long failure of subcommand @cmd (@c is ':' for a missing
 * argument, '?' otherwise; the optstring must start with ':').
 * Returns 1, the exit status for a usage error.
 */
int uq_usage_error(const char *cmd, char **argv, int c);

/* Report that @cmd wants @expected as its operands, in one line. Returns 1. */
int uq_usage_args(const char *cmd, const char *expected);

/*
 * --output human|json of subcommand @cmd: sets *@json. 0, or -EINVAL with
 * one error line printed.
 */
int uq_parse_output(const char *cmd, const char *arg, bool *json);

/*
 * A relative backing file name is relative to the directory of the image
 * naming it, as in QEMU. Returns a malloc'ed path, or NULL on ENOMEM.
 */
char *uq_backing_path(const char *image, const char *backing);

/*
 * qemu-img's progress line, "    (45.00/100%)" ended by '\r', on stderr:
 * printed at 0%, at each whole percent reached and at 100% (then a
 * newline). Only the percentage changes from line to line, so a log that
 * is not a terminal gets a bounded number of them.
 */
struct uq_progress {
	bool on;
	int last;			/* whole percent last printed, -1: none */
};

void uq_progress_init(struct uq_progress *p, bool on);
void uq_progress_update(struct uq_progress *p, uint64_t done, uint64_t total);
void uq_progress_done(struct uq_progress *p);

#endif
