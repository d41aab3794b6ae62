/*
 * netbench: TCP latency loops for the guest side of bench/vhost_user_peers.py.
 *
 *     netbench connect ADDR PORT N WARMUP [BUDGET_S]
 *     netbench rr      ADDR PORT N WARMUP [BUDGET_S]
 *
 * connect: N times (after WARMUP unrecorded ones) a new TCP connection to ADDR:PORT, 8
 *          bytes written, the 8 echoed bytes read back, close; one sample is socket() to
 *          close() returned.
 * rr:      one TCP connection (TCP_NODELAY), then N times 1 byte written and the echoed
 *          byte read back; one sample is write() to the byte read.
 *
 * The host's echo server (bench/net/echo_server.py) echoes every byte. Each loop stops
 * after BUDGET_S seconds (default 30) whatever N is; a connect, write or read that takes
 * over IO_TIMEOUT_S fails its sample (counted in "errors", the first reason kept). The result is one line,
 *     @@NB {"op":"connect","asked":N,"n":DONE,"errors":E,"p50_us":..,"p99_us":..,...}
 * which the runner picks out of the serial console. Percentiles are nearest-rank.
 * Built on the host with `gcc -O2 -static` (the guest has no libc of its own).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define CONNECT_BYTES 8
#define DEFAULT_BUDGET_S 30.0
#define MAX_SAMPLES 1000000
#define IO_TIMEOUT_S 5 /* a lost SYN or echo fails one sample instead of the whole loop */

static const char *stage = ""; /* where the last failure happened, for first_error */

static double now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

/* Nearest rank: the smallest sample with at least pct% of the samples at or below it. */
static double percentile(const double *sorted, long n, double pct)
{
	long rank = (long)((pct / 100.0) * n + 0.999999);
	if (rank < 1)
		rank = 1;
	if (rank > n)
		rank = n;
	return sorted[rank - 1];
}

static int write_all(int fd, const char *buf, size_t len)
{
	stage = "write";
	while (len) {
		ssize_t w = write(fd, buf, len);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		buf += w;
		len -= (size_t)w;
	}
	return 0;
}

static int read_all(int fd, char *buf, size_t len)
{
	stage = "read";
	while (len) {
		ssize_t r = read(fd, buf, len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			if (r == 0)
				errno = ECONNRESET;
			return -1;
		}
		buf += r;
		len -= (size_t)r;
	}
	return 0;
}

static int open_conn(const struct sockaddr_in *to)
{
	int one = 1;
	struct timeval tv = { .tv_sec = IO_TIMEOUT_S };
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return -1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	/* SO_SNDTIMEO bounds connect() too (socket(7)). */
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	stage = "connect";
	if (connect(fd, (const struct sockaddr *)to, sizeof(*to)) < 0) {
		int saved = errno;
		close(fd);
		errno = saved;
		return -1;
	}
	return fd;
}

/* One connect+echo+close; 0 or -1 with errno set. */
static int one_connect(const struct sockaddr_in *to)
{
	char out[CONNECT_BYTES] = "netbench", in[CONNECT_BYTES];
	int fd = open_conn(to);
	if (fd < 0)
		return -1;
	if (write_all(fd, out, sizeof(out)) < 0 || read_all(fd, in, sizeof(in)) < 0) {
		int saved = errno;
		close(fd);
		errno = saved;
		return -1;
	}
	close(fd);
	return memcmp(in, out, sizeof(in)) ? (errno = EBADMSG, -1) : 0;
}

static void report(const char *op, long asked, long n, long errors, const char *first_error,
		   double *samples, double elapsed_us)
{
	printf("@@NB {\"op\":\"%s\",\"asked\":%ld,\"n\":%ld,\"errors\":%ld", op, asked, n, errors);
	if (first_error)
		printf(",\"first_error\":\"%s\"", first_error);
	if (n > 0) {
		double sum = 0;
		for (long i = 0; i < n; i++)
			sum += samples[i];
		qsort(samples, (size_t)n, sizeof(double), cmp_double);
		printf(",\"p50_us\":%.1f,\"p99_us\":%.1f,\"min_us\":%.1f,\"max_us\":%.1f,"
		       "\"mean_us\":%.1f,\"per_s\":%.1f",
		       percentile(samples, n, 50), percentile(samples, n, 99), samples[0],
		       samples[n - 1], sum / n, elapsed_us > 0 ? n / (elapsed_us / 1e6) : 0.0);
	}
	printf("}\n");
	fflush(stdout);
}

int main(int argc, char **argv)
{
	if (argc < 6) {
		fprintf(stderr, "usage: netbench connect|rr ADDR PORT N WARMUP [BUDGET_S]\n");
		return 2;
	}
	const char *op = argv[1];
	struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[3])) };
	if (inet_pton(AF_INET, argv[2], &to.sin_addr) != 1) {
		fprintf(stderr, "netbench: bad address %s\n", argv[2]);
		return 2;
	}
	long asked = atol(argv[4]), warmup = atol(argv[5]);
	double budget_us = (argc > 6 ? atof(argv[6]) : DEFAULT_BUDGET_S) * 1e6;
	if (asked < 1 || asked > MAX_SAMPLES || warmup < 0) {
		fprintf(stderr, "netbench: N must be 1..%d\n", MAX_SAMPLES);
		return 2;
	}
	double *samples = calloc((size_t)asked, sizeof(double));
	if (!samples)
		return 1;
	long n = 0, errors = 0;
	char first_error[128] = "";
	double start = now_us(), deadline = start + budget_us, measured_from = 0;

	if (!strcmp(op, "connect")) {
		for (long i = 0; i < warmup + asked && now_us() < deadline; i++) {
			if (i == warmup)
				measured_from = now_us();
			double t0 = now_us();
			if (one_connect(&to) < 0) {
				if (!errors++)
					snprintf(first_error, sizeof(first_error), "%s: %s", stage,
						 strerror(errno));
				continue;
			}
			if (i >= warmup)
				samples[n++] = now_us() - t0;
		}
	} else if (!strcmp(op, "rr")) {
		int fd = open_conn(&to);
		if (fd < 0) {
			snprintf(first_error, sizeof(first_error), "connect: %s", strerror(errno));
			report(op, asked, 0, 1, first_error, samples, 0);
			return 1;
		}
		char c = 'x', back;
		for (long i = 0; i < warmup + asked && now_us() < deadline; i++) {
			if (i == warmup)
				measured_from = now_us();
			double t0 = now_us();
			if (write_all(fd, &c, 1) < 0 || read_all(fd, &back, 1) < 0 || back != c) {
				errors++;
				snprintf(first_error, sizeof(first_error), "%s: %s", stage, strerror(errno));
				break; /* the connection is gone */
			}
			if (i >= warmup)
				samples[n++] = now_us() - t0;
		}
		close(fd);
	} else {
		fprintf(stderr, "netbench: unknown op %s\n", op);
		return 2;
	}
	report(op, asked, n, errors, errors ? first_error : NULL, samples,
	       measured_from ? now_us() - measured_from : 0);
	return 0;
}
