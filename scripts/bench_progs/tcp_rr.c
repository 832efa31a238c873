/* tcp_rr.c - request/response load for scripts/bench_proxy.py: the netperf TCP_RR pattern.
 *
 *   tcp_rr server PORT SECONDS            echo every byte back; exits after SECONDS
 *   tcp_rr client HOST PORT CONNS SIZE SECONDS
 *
 * The client opens CONNS connections and keeps one SIZE-byte request outstanding on each:
 * send SIZE bytes, wait until SIZE bytes have come back, send the next. After SECONDS it stops
 * and prints one JSON line: transactions, elapsed seconds, errors, and latency percentiles.
 * Both sides are one thread on epoll, with TCP_NODELAY (a request is one write), so that the
 * load generator costs little next to the proxy being measured. Both stop by themselves.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define MAX_SIZE (1 << 20)
#define LAT_BUCKETS 4096 /* latency histogram: 10 us buckets, up to ~41 ms, then the last */

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "tcp_rr: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void nodelay(int fd)
{
	int one = 1;

	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static int server(int port, double seconds)
{
	struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port),
				 .sin6_addr = IN6ADDR_ANY_INIT};
	struct epoll_event ev, evs[MAX_EVENTS];
	static char buf[65536];
	int one = 1, lfd, ep;
	double end = now() + seconds;

	lfd = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (lfd < 0)
		die("socket");
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, (struct sockaddr *)&a, sizeof(a)) || listen(lfd, 4096))
		die("bind/listen");
	ep = epoll_create1(0);
	ev.events = EPOLLIN;
	ev.data.fd = lfd;
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
	printf("listening\n");
	fflush(stdout);
	while (now() < end) {
		int n = epoll_wait(ep, evs, MAX_EVENTS, 100);

		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;

			if (fd == lfd) {
				int c;

				while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
					nodelay(c);
					ev.events = EPOLLIN;
					ev.data.fd = c;
					epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
				}
				continue;
			}
			ssize_t r = read(fd, buf, sizeof(buf));

			if (r <= 0) {
				if (r < 0 && errno == EAGAIN)
					continue;
				close(fd);
				continue;
			}
			/* One request in flight per connection: the echo fits the send buffer. */
			for (ssize_t off = 0; off < r;) {
				ssize_t w = write(fd, buf + off, r - off);

				if (w < 0) {
					if (errno == EAGAIN)
						continue;
					close(fd);
					break;
				}
				off += w;
			}
		}
	}
	return 0;
}

struct conn {
	int fd;
	size_t got;
	double sent_at;
};

static int client(const char *host, int port, int nconns, int size, double seconds)
{
	struct epoll_event ev, evs[MAX_EVENTS];
	struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
	static unsigned long long lat[LAT_BUCKETS];
	unsigned long long transactions = 0, errors = 0;
	char portstr[16], *req, *buf;
	struct conn *conns;
	double start, end, t;
	int ep;

	if (size <= 0 || size > MAX_SIZE || nconns <= 0)
		return fprintf(stderr, "tcp_rr: bad size or connection count\n"), 2;
	snprintf(portstr, sizeof(portstr), "%d", port);
	if (getaddrinfo(host, portstr, &hints, &ai))
		return fprintf(stderr, "tcp_rr: cannot resolve %s\n", host), 2;
	req = malloc(size);
	buf = malloc(MAX_SIZE);
	conns = calloc(nconns, sizeof(*conns));
	memset(req, 'r', size);
	ep = epoll_create1(0);
	for (int i = 0; i < nconns; i++) {
		int fd = socket(ai->ai_family, SOCK_STREAM, 0);

		if (fd < 0 || connect(fd, ai->ai_addr, ai->ai_addrlen))
			die("connect");
		nodelay(fd);
		conns[i].fd = fd;
		ev.events = EPOLLIN;
		ev.data.u32 = i;
		epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
	}
	start = now();
	end = start + seconds;
	for (int i = 0; i < nconns; i++) {
		conns[i].sent_at = now();
		if (write(conns[i].fd, req, size) != size)
			die("write");
	}
	while ((t = now()) < end) {
		int n = epoll_wait(ep, evs, MAX_EVENTS, 100);

		for (int i = 0; i < n; i++) {
			struct conn *c = &conns[evs[i].data.u32];
			ssize_t r = read(c->fd, buf, MAX_SIZE);

			if (r <= 0) {
				errors++;
				epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
				continue;
			}
			c->got += r;
			if (c->got < (size_t)size)
				continue;
			t = now();
			long us10 = (long)((t - c->sent_at) * 1e5);

			lat[us10 < LAT_BUCKETS ? us10 : LAT_BUCKETS - 1]++;
			transactions++;
			c->got -= size;
			c->sent_at = t;
			if (t < end && write(c->fd, req, size) != size)
				errors++;
		}
	}
	t = now();
	for (int i = 0; i < nconns; i++)
		close(conns[i].fd);
	double pct[3] = {0.5, 0.99, 0.999}, res[3] = {0};
	unsigned long long seen = 0;

	for (int b = 0, p = 0; b < LAT_BUCKETS && p < 3; b++) {
		seen += lat[b];
		while (p < 3 && seen >= pct[p] * transactions && transactions)
			res[p++] = (b + 1) * 10.0;
	}
	printf("{\"transactions\": %llu, \"seconds\": %.4f, \"errors\": %llu, "
	       "\"p50_us\": %.0f, \"p99_us\": %.0f, \"p999_us\": %.0f}\n",
	       transactions, t - start, errors, res[0], res[1], res[2]);
	return errors ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "server"))
		return server(atoi(argv[2]), atof(argv[3]));
	if (argc == 7 && !strcmp(argv[1], "client"))
		return client(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), atof(argv[6]));
	fprintf(stderr, "usage: tcp_rr server PORT SECONDS | "
			"tcp_rr client HOST PORT CONNS SIZE SECONDS\n");
	return 2;
}
