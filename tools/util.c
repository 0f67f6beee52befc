// SPDX-License-Identifier: MIT
/*
 * Helpers shared by the subcommands: error lines, sizes, option lists,
 * qemu-img style size strings, JSON strings and backing file paths.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>

#include "util.h"

static bool log_verbose, log_syslog;

void uq_log_verbose(bool on)
{
	log_verbose = on;
}

bool uq_log_is_verbose(void)
{
	return log_verbose;
}

void uq_log_syslog(void)
{
	openlog(UQ_PROG, LOG_PID, LOG_DAEMON);
	log_syslog = true;
}

/* One line to stderr (a single write, so threads do not interleave) and syslog. */
static void log_line(int prio, const char *prefix, const char *fmt, va_list ap)
{
	char line[4096];
	int n;

	n = snprintf(line, sizeof(line), "%s", prefix);
	vsnprintf(line + n, sizeof(line) - n, fmt, ap);
	fflush(stdout);
	fprintf(stderr, UQ_PROG ": %s\n", line);
	if (log_syslog)
		syslog(prio, "%s", line);
}

void uq_err(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_line(LOG_ERR, "", fmt, ap);
	va_end(ap);
}

void uq_warn(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_line(LOG_WARNING, "warning: ", fmt, ap);
	va_end(ap);
}

void uq_debug(const char *fmt, ...)
{
	va_list ap;

	if (!log_verbose)
		return;
	va_start(ap, fmt);
	log_line(LOG_DEBUG, "debug: ", fmt, ap);
	va_end(ap);
}

void uq_log_line(const char *line)
{
	uq_err("%s", line);
}

static int suffix_shift(char c)
{
	switch (c) {
	case 'b': case 'B': return 0;
	case 'k': case 'K': return 10;
	case 'm': case 'M': return 20;
	case 'g': case 'G': return 30;
	case 't': case 'T': return 40;
	case 'p': case 'P': return 50;
	case 'e': case 'E': return 60;
	default: return -1;
	}
}

int uq_parse_size(const char *s, uint64_t *out)
{
	unsigned long long whole;
	uint64_t extra = 0;
	double frac = 0;
	char *end;
	int shift = 0;

	/* strtoull's leading blanks and '+', as qemu-img takes them; no '-'. */
	while (isspace((unsigned char)*s))
		s++;
	if (*s == '+')
		s++;
	if (!*s || *s == '-' || *s == '+' || isspace((unsigned char)*s))
		return -EINVAL;
	errno = 0;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		whole = strtoull(s + 2, &end, 16);
		if (end == s + 2)
			return -EINVAL;
	} else {
		whole = strtoull(s, &end, 10);
		if (end == s)
			return -EINVAL;
		if (*end == '.') {
			char *f = end;

			frac = strtod(f, &end);		/* ".5" */
			if (end == f)
				end = f + 1;		/* "1." and "1.k", as qemu-img */
			else if (memchr(f, 'e', end - f) || memchr(f, 'E', end - f))
				return -EINVAL;
		}
	}
	if (errno == ERANGE)
		return -ERANGE;
	if (*end) {
		shift = suffix_shift(*end);
		if (shift < 0 || end[1])
			return -EINVAL;
	}
	if (whole > (UINT64_MAX >> shift) - 1)
		return -ERANGE;
	if (frac != 0) {
		/* As QEMU: a fraction needs a suffix ("1.5" bytes is an error), and
		 * what it comes to is truncated to whole bytes ("1.1k" is 1126). */
		if (!shift)
			return -EINVAL;
		extra = (uint64_t)(frac * (double)(1ull << shift));
	}
	*out = ((uint64_t)whole << shift) + extra;
	return 0;
}

int uq_parse_opts(char *s, int (*fn)(void *opaque, const char *key, const char *val),
		  void *opaque)
{
	for (;;) {
		char *key = s, *val = NULL, *w = s, *r = s;
		bool last;
		int ret;

		/* Copy down over ",," escapes until a single comma ends the pair. */
		while (*r) {
			if (*r == ',') {
				if (r[1] != ',')
					break;
				r++;
			}
			*w++ = *r++;
		}
		last = !*r;
		s = r + !last;
		*w = '\0';
		val = strchr(key, '=');
		if (val)
			*val++ = '\0';
		ret = fn(opaque, key, val);
		if (ret || last)
			return ret;
	}
}

int uq_parse_bool(const char *s, bool *out)
{
	if (!strcasecmp(s, "on") || !strcasecmp(s, "yes") || !strcasecmp(s, "true") ||
	    !strcmp(s, "1")) {
		*out = true;
		return 0;
	}
	if (!strcasecmp(s, "off") || !strcasecmp(s, "no") || !strcasecmp(s, "false") ||
	    !strcmp(s, "0")) {
		*out = false;
		return 0;
	}
	return -EINVAL;
}

void uq_size_str(uint64_t bytes, char *buf, size_t len)
{
	static const char *const suffixes[] = { "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei" };
	/* QEMU switches unit once the integer part would reach 1000. */
	double x = (double)bytes * 1.024;
	int i = 0;

	while (i < 6 && x >= (double)(1ull << (10 * (i + 1))))
		i++;
	snprintf(buf, len, "%0.3g %sB", (double)bytes / (double)(1ull << (10 * i)),
		 suffixes[i]);
}

void uq_json_str(FILE *f, const char *s)
{
	const unsigned char *p = (const unsigned char *)s;

	fputc('"', f);
	for (; *p; p++) {
		switch (*p) {
		case '"': fputs("\\\"", f); break;
		case '\\': fputs("\\\\", f); break;
		case '\b': fputs("\\b", f); break;
		case '\f': fputs("\\f", f); break;
		case '\n': fputs("\\n", f); break;
		case '\r': fputs("\\r", f); break;
		case '\t': fputs("\\t", f); break;
		default:
			if (*p < 0x20 || *p == 0x7f)
				fprintf(f, "\\u%04x", *p);
			else
				fputc(*p, f);
		}
	}
	fputc('"', f);
}

static void json_member(struct uq_json *j, const char *key)
{
	if (j->depth)
		fprintf(j->f, "%s%*s", j->need_comma ? ",\n" : "\n", 4 * j->depth, "");
	if (key) {
		uq_json_str(j->f, key);
		fputs(": ", j->f);
	}
	j->need_comma = true;
}

void uq_json_open(struct uq_json *j, const char *key, char bracket)
{
	json_member(j, key);
	fputc(bracket, j->f);
	j->depth++;
	j->need_comma = false;
}

void uq_json_close(struct uq_json *j, char bracket)
{
	j->depth--;
	fprintf(j->f, "\n%*s%c", 4 * j->depth, "", bracket);
	j->need_comma = true;
	if (!j->depth)
		fputc('\n', j->f);
}

void uq_json_int(struct uq_json *j, const char *key, uint64_t v)
{
	json_member(j, key);
	fprintf(j->f, "%llu", (unsigned long long)v);
}

void uq_json_bool(struct uq_json *j, const char *key, bool v)
{
	json_member(j, key);
	fputs(v ? "true" : "false", j->f);
}

void uq_json_string(struct uq_json *j, const char *key, const char *v)
{
	json_member(j, key);
	uq_json_str(j->f, v);
}

int uq_usage_error(const char *cmd, char **argv, int c)
{
	char opt[3] = { '-', (char)optopt, '\0' };
	const char *name = optopt ? opt : argv[optind - 1];

	if (c == ':')
		uq_err("%s: option '%s' needs an argument (see '" UQ_PROG " %s --help')",
		       cmd, name, cmd);
	else
		uq_err("%s: unknown option '%s' (see '" UQ_PROG " %s --help')", cmd, name, cmd);
	return 1;
}

int uq_usage_args(const char *cmd, const char *expected)
{
	uq_err("%s: expected %s (see '" UQ_PROG " %s --help')", cmd, expected, cmd);
	return 1;
}

int uq_parse_output(const char *cmd, const char *arg, bool *json)
{
	if (strcmp(arg, "json") && strcmp(arg, "human")) {
		uq_err("%s: --output must be human or json", cmd);
		return -EINVAL;
	}
	*json = !strcmp(arg, "json");
	return 0;
}

char *uq_backing_path(const char *image, const char *backing)
{
	const char *slash = strrchr(image, '/');
	char *path;
	size_t dir;

	if (backing[0] == '/' || !slash)
		return strdup(backing);
	dir = slash - image + 1;
	path = malloc(dir + strlen(backing) + 1);
	if (path) {
		memcpy(path, image, dir);
		strcpy(path + dir, backing);
	}
	return path;
}

void uq_progress_init(struct uq_progress *p, bool on)
{
	p->on = on;
	p->last = -1;
}

void uq_progress_update(struct uq_progress *p, uint64_t done, uint64_t total)
{
	double percent = total ? (double)done * 100.0 / (double)total : 100.0;

	if (!p->on || (int)percent == p->last)
		return;
	p->last = (int)percent;
	fprintf(stderr, "    (%3.2f/100%%)\r", percent);
	fflush(stderr);
}

void uq_progress_done(struct uq_progress *p)
{
	if (!p->on)
		return;
	if (p->last != 100)
		fprintf(stderr, "    (100.00/100%%)\r");
	fputc('\n', stderr);
	p->on = false;
}
