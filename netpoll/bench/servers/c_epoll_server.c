/* A plain C epoll echo / length-prefixed server: the reference ceiling for
 * bench/run_bench.py ("how fast can one core answer at all, with no Python").
 *
 *   c_epoll_server --mode echo|framed --port P [--host H]
 *
 * Same protocol and socket options as the Python servers: level-triggered
 * epoll, non-blocking sockets, TCP_NODELAY, MSG_NOSIGNAL, one recv and one
 * send per ready connection in the common case. Replies that do not fit the
 * socket buffer are kept and sent on EPOLLOUT. Prints "READY <port>".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define RX_SIZE (256 * 1024)

typedef struct {
    int fd;
    char *in;           /* framed: bytes of an incomplete frame */
    size_t in_len, in_cap;
    char *out;          /* bytes the socket did not take yet */
    size_t out_off, out_len, out_cap;
} conn_t;

static int framed;
static int ep;
static char rx[RX_SIZE];

static void die(const char *what) {
    printf("FAILED %s: %s\n", what, strerror(errno));
    fflush(stdout);
    exit(1);
}

static int grow(char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    size_t n = *cap ? *cap : 4096;
    while (n < need) n *= 2;
    char *p = realloc(*buf, n);
    if (!p) return -1;
    *buf = p;
    *cap = n;
    return 0;
}

static void drop(conn_t *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
}

/* Send data (after anything already queued); queue what the socket refuses. */
static int reply(conn_t *c, const char *data, size_t n) {
    if (c->out_len == 0) {
        ssize_t r = send(c->fd, data, n, MSG_NOSIGNAL);
        if (r < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
            r = 0;
        }
        data += r;
        n -= (size_t)r;
        if (n == 0) return 0;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->out_off = 0;
    }
    if (grow(&c->out, &c->out_cap, c->out_off + c->out_len + n) < 0) return -1;
    memcpy(c->out + c->out_off + c->out_len, data, n);
    c->out_len += n;
    return 0;
}

static int on_writable(conn_t *c) {
    while (c->out_len) {
        ssize_t r = send(c->fd, c->out + c->out_off, c->out_len, MSG_NOSIGNAL);
        if (r < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
        c->out_off += (size_t)r;
        c->out_len -= (size_t)r;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->out_off = 0;
    return 0;
}

/* framed: answer every complete frame of buf[0:n]; returns bytes consumed. */
static long answer_frames(conn_t *c, const char *buf, size_t n) {
    size_t off = 0;
    while (n - off >= 4) {
        uint32_t len;
        memcpy(&len, buf + off, 4);
        len = ntohl(len);
        if (n - off < 4 + (size_t)len) break;
        if (reply(c, buf + off, 4 + (size_t)len) < 0) return -1;
        off += 4 + (size_t)len;
    }
    return (long)off;
}

static int on_readable(conn_t *c) {
    ssize_t r = recv(c->fd, rx, sizeof rx, 0);
    if (r == 0) return -1;
    if (r < 0) return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;
    if (!framed) return reply(c, rx, (size_t)r);
    if (c->in_len == 0) {
        long used = answer_frames(c, rx, (size_t)r);
        if (used < 0) return -1;
        if ((size_t)used == (size_t)r) return 0;
        if (grow(&c->in, &c->in_cap, (size_t)r - (size_t)used) < 0) return -1;
        memcpy(c->in, rx + used, (size_t)r - (size_t)used);
        c->in_len = (size_t)r - (size_t)used;
        return 0;
    }
    if (grow(&c->in, &c->in_cap, c->in_len + (size_t)r) < 0) return -1;
    memcpy(c->in + c->in_len, rx, (size_t)r);
    c->in_len += (size_t)r;
    long used = answer_frames(c, c->in, c->in_len);
    if (used < 0) return -1;
    memmove(c->in, c->in + used, c->in_len - (size_t)used);
    c->in_len -= (size_t)used;
    return 0;
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--mode")) framed = !strcmp(argv[i + 1], "framed");
        else if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--host")) host = argv[i + 1];
    }
    signal(SIGPIPE, SIG_IGN);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) die("host (IPv4 only)");
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(lfd, 1024) < 0) die("listen");
    socklen_t sl = sizeof sa;
    getsockname(lfd, (struct sockaddr *)&sa, &sl);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    printf("READY %d\n", ntohs(sa.sin_port));
    fflush(stdout);

    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c == NULL) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *nc = calloc(1, sizeof *nc);
                    if (!nc) { close(fd); continue; }
                    nc->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            int bad = 0;
            if (evs[i].events & EPOLLOUT) bad = on_writable(c) < 0;
            if (!bad && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) bad = on_readable(c) < 0;
            if (bad) drop(c);
        }
    }
}
