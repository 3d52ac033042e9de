/*
 * _fastpath: the C datapath of the udp backend (batches, UDP GSO and GRO; no TUN
 * offloads yet).
 *
 * One packet thread per datapath moves packets between the TUN fd and the UDP socket
 * with the GIL released: it never calls into Python. Python only changes routes (under a
 * mutex held for one batch at a time) and reads counters (relaxed atomics).
 *
 * Semantics are the pure-Python datapath's (backends/datapath.py), counter for counter:
 * one inner IPv4 packet per datagram, TTL decremented on both ends with an incremental
 * checksum fix, ICMP net-unreachable for packets no peer subnet matches (never for ICMP
 * or non-first fragments), receive drops by reason. Batching: TUN reads are gathered
 * into up to BATCH packets, sent with one sendmmsg (runs for one peer as UDP GSO
 * messages); receives use recvmmsg.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define BATCH 64
#define VNET_HDR_LEN 10
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
/* Receive buffers: with UDP GRO one buffer may hold up to 64 KiB of coalesced datagrams. */
#define RX_BATCH 16
#define RX_SLOT 65536

/* Counter order: must match COUNTERS in backends/datapath.py. */
enum {
    TX_PACKETS, TX_BYTES, RX_PACKETS, RX_BYTES, RX_DATAGRAMS,
    TX_DROP_MALFORMED, TX_DROP_NO_ROUTE, TX_DROP_TTL, TX_DROP_SEND_ERROR,
    RX_DROP_UNKNOWN_SOURCE, RX_DROP_MALFORMED, RX_DROP_OVERSIZED,
    RX_DROP_SPOOFED_SOURCE, RX_DROP_TTL, RX_DROP_TUN_ERROR, ICMP_UNREACHABLE_SENT,
    GSO_SENDS, GRO_RECEIVES, COALESCED_WRITES,
    NCOUNTERS
};

struct route {
    uint32_t net, mask, peer; /* host byte order */
};

typedef struct {
    PyObject_HEAD
    int tun, udp, efd;
    uint16_t port;
    int mtu, check_source, vnet, gso;
    size_t slot;   /* bytes per send buffer slot */
    size_t rxslot; /* bytes per receive buffer slot */
    int gro;
    pthread_t thread;
    int running;
    pthread_mutex_t lock;
    struct route *routes;
    int nroutes, cap;
    _Atomic uint64_t counters[NCOUNTERS];
    uint8_t *txbuf, *rxbuf;
} Core;

static void count(Core *c, int i, uint64_t n)
{
    atomic_fetch_add_explicit(&c->counters[i], n, memory_order_relaxed);
}

static uint16_t csum(const uint8_t *p, size_t n)
{
    uint32_t s = 0;
    for (size_t i = 0; i + 1 < n; i += 2)
        s += (uint32_t)p[i] << 8 | p[i + 1];
    if (n & 1)
        s += (uint32_t)p[n - 1] << 8;
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return (uint16_t)~s;
}

/* TTL - 1 with the checksum patched in place (RFC 1141, and never 0xFFFF: RFC 1624).
 * Returns 0 when the TTL would reach 0. */
static int decrement_ttl(uint8_t *p)
{
    if (p[8] <= 1)
        return 0;
    p[8]--;
    uint32_t s = ((uint32_t)p[10] << 8 | p[11]) + 0x0100;
    s = (s & 0xFFFF) + (s >> 16);
    if (s == 0xFFFF)
        s = 0;
    p[10] = s >> 8;
    p[11] = s & 0xFF;
    return 1;
}

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Longest-prefix match; caller holds the lock. Returns the peer or 0. */
static uint32_t lookup(Core *c, uint32_t dst)
{
    uint32_t best_mask = 0, peer = 0;
    int found = 0;
    for (int i = 0; i < c->nroutes; i++) {
        struct route *r = &c->routes[i];
        if ((dst & r->mask) == r->net && (!found || r->mask > best_mask)) {
            best_mask = r->mask;
            peer = r->peer;
            found = 1;
        }
    }
    return peer;
}

/* 0: `peer` holds no route; 1: it does but not for `src`; 2: `src` is in its subnets. */
static int source_ok(Core *c, uint32_t peer, uint32_t src)
{
    int known = 0;
    for (int i = 0; i < c->nroutes; i++) {
        struct route *r = &c->routes[i];
        if (r->peer != peer)
            continue;
        known = 1;
        if ((src & r->mask) == r->net)
            return 2;
    }
    return known;
}

static void write_tun(Core *c, const uint8_t *p, size_t n, int ok_counter)
{
    static const uint8_t zero[VNET_HDR_LEN];
    struct iovec v[2];
    int k = 0;
    if (c->vnet) {
        v[k].iov_base = (void *)zero;
        v[k++].iov_len = VNET_HDR_LEN;
    }
    v[k].iov_base = (void *)p;
    v[k++].iov_len = n;
    if (writev(c->tun, v, k) < 0) {
        if (ok_counter == RX_PACKETS)
            count(c, RX_DROP_TUN_ERROR, 1);
        return;
    }
    if (ok_counter == RX_PACKETS) {
        count(c, RX_PACKETS, 1);
        count(c, RX_BYTES, n);
    } else {
        count(c, ok_counter, 1);
    }
}

/* ICMP destination unreachable (net) for `off`, from its destination (as flanneld does:
 * our own address would come back through the TUN as a martian). */
static void net_unreachable(Core *c, const uint8_t *off, size_t n)
{
    size_t ihl = (size_t)(off[0] & 0x0F) * 4;
    size_t total = (size_t)off[2] << 8 | off[3];
    if (ihl < 20 || total < ihl || total > n || off[9] == 1)
        return;
    if (((off[6] & 0x1F) << 8 | off[7]) != 0) /* not the first fragment */
        return;
    size_t quote = ihl + 8 <= n ? ihl + 8 : n;
    uint8_t pkt[20 + 8 + 60 + 8];
    size_t len = 20 + 8 + quote;
    memset(pkt, 0, 28);
    pkt[0] = 0x45;
    pkt[2] = len >> 8;
    pkt[3] = len & 0xFF;
    pkt[8] = 64;
    pkt[9] = 1;
    memcpy(pkt + 12, off + 16, 4);
    memcpy(pkt + 16, off + 12, 4);
    pkt[20] = 3; /* destination unreachable */
    pkt[21] = 0; /* net unreachable */
    memcpy(pkt + 28, off, quote);
    uint16_t ic = csum(pkt + 20, 8 + quote);
    pkt[22] = ic >> 8;
    pkt[23] = ic & 0xFF;
    uint16_t hc = csum(pkt, 20);
    pkt[10] = hc >> 8;
    pkt[11] = hc & 0xFF;
    write_tun(c, pkt, len, ICMP_UNREACHABLE_SENT);
}

/* Drain the TUN: read packets into the slots, then send them with one sendmmsg. With UDP
 * GSO, consecutive packets for one peer of one size (the last may be shorter) go as one
 * message with a UDP_SEGMENT cmsg; the kernel cuts it into one datagram per packet, so
 * the wire format is unchanged. */
static void from_tun(Core *c)
{
    struct mmsghdr m[BATCH];
    struct iovec v[BATCH];
    struct sockaddr_in to[BATCH];
    union {
        char buf[CMSG_SPACE(sizeof(uint16_t))];
        struct cmsghdr align;
    } cm[BATCH];
    int npkts[BATCH];
    uint32_t peers[BATCH];
    uint8_t hdr[VNET_HDR_LEN];
    for (;;) {
        int k = 0, eagain = 0;
        pthread_mutex_lock(&c->lock);
        while (k < BATCH) {
            uint8_t *p = c->txbuf + (size_t)k * c->slot;
            struct iovec rv[2] = {{hdr, VNET_HDR_LEN}, {p, c->slot}};
            ssize_t r = c->vnet ? readv(c->tun, rv, 2) : read(c->tun, p, c->slot);
            if (r < 0) {
                eagain = 1;
                break;
            }
            size_t n = (size_t)r - (c->vnet ? VNET_HDR_LEN : 0);
            if (c->vnet && r < VNET_HDR_LEN)
                n = 0;
            if (n < 20 || p[0] >> 4 != 4) {
                count(c, TX_DROP_MALFORMED, 1);
                continue;
            }
            uint32_t peer = lookup(c, be32(p + 16));
            if (!peer) {
                count(c, TX_DROP_NO_ROUTE, 1);
                net_unreachable(c, p, n);
                continue;
            }
            if (!decrement_ttl(p)) {
                count(c, TX_DROP_TTL, 1);
                continue;
            }
            v[k].iov_base = p;
            v[k].iov_len = n;
            peers[k] = peer;
            k++;
        }
        pthread_mutex_unlock(&c->lock);
        /* Group the packets into messages. */
        int nm = 0;
        for (int i = 0; i < k;) {
            size_t seg = v[i].iov_len, total = seg;
            int j = i + 1;
            while (c->gso && j < k && peers[j] == peers[i] && v[j - 1].iov_len == seg &&
                   v[j].iov_len <= seg && total + v[j].iov_len <= 65000 && j - i < 64) {
                total += v[j].iov_len;
                j++;
            }
            struct msghdr *h = &m[nm].msg_hdr;
            memset(&m[nm], 0, sizeof m[nm]);
            memset(&to[nm], 0, sizeof to[nm]);
            to[nm].sin_family = AF_INET;
            to[nm].sin_port = htons(c->port);
            to[nm].sin_addr.s_addr = htonl(peers[i]);
            h->msg_name = &to[nm];
            h->msg_namelen = sizeof to[nm];
            h->msg_iov = &v[i];
            h->msg_iovlen = (size_t)(j - i);
            if (j - i > 1) {
                h->msg_control = cm[nm].buf;
                h->msg_controllen = sizeof cm[nm].buf;
                struct cmsghdr *cmsg = CMSG_FIRSTHDR(h);
                cmsg->cmsg_level = SOL_UDP;
                cmsg->cmsg_type = UDP_SEGMENT;
                cmsg->cmsg_len = CMSG_LEN(sizeof(uint16_t));
                uint16_t s16 = (uint16_t)seg;
                memcpy(CMSG_DATA(cmsg), &s16, sizeof s16);
            }
            npkts[nm++] = j - i;
            i = j;
        }
        int sent = 0;
        while (sent < nm) {
            int r = sendmmsg(c->udp, m + sent, (unsigned)(nm - sent), MSG_DONTWAIT);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                if (errno != EAGAIN && errno != ENOBUFS && npkts[sent] > 1)
                    c->gso = 0; /* the path cannot segment: one datagram per call from now */
                /* Buffer full or unreachable: drop the rest, as a router would. */
                for (int i = sent; i < nm; i++)
                    count(c, TX_DROP_SEND_ERROR, (uint64_t)npkts[i]);
                break;
            }
            for (int i = sent; i < sent + r; i++) {
                uint64_t bytes = 0;
                for (size_t q = 0; q < m[i].msg_hdr.msg_iovlen; q++)
                    bytes += m[i].msg_hdr.msg_iov[q].iov_len;
                count(c, TX_PACKETS, (uint64_t)npkts[i]);
                count(c, TX_BYTES, bytes);
                if (npkts[i] > 1)
                    count(c, GSO_SENDS, 1);
            }
            sent += r;
        }
        if (eagain)
            return;
    }
}

/* One received inner packet at p (n bytes) from `peer`: check, patch, write to the TUN.
 * Caller holds the lock. */
static void deliver(Core *c, uint8_t *p, size_t n, uint32_t peer, int truncated)
{
    int known = source_ok(c, peer, n >= 16 ? be32(p + 12) : 0);
    if (c->check_source && known == 0) {
        count(c, RX_DROP_UNKNOWN_SOURCE, 1);
        return;
    }
    if (truncated || n > (size_t)c->mtu) {
        count(c, RX_DROP_OVERSIZED, 1);
        return;
    }
    if (n < 20 || p[0] >> 4 != 4) {
        count(c, RX_DROP_MALFORMED, 1);
        return;
    }
    size_t ihl = (size_t)(p[0] & 0x0F) * 4;
    size_t total = (size_t)p[2] << 8 | p[3];
    if (ihl < 20 || total < ihl || total > n) {
        count(c, RX_DROP_MALFORMED, 1);
        return;
    }
    if (c->check_source && known != 2) {
        count(c, RX_DROP_SPOOFED_SOURCE, 1);
        return;
    }
    if (!decrement_ttl(p)) {
        count(c, RX_DROP_TTL, 1);
        return;
    }
    write_tun(c, p, total, RX_PACKETS);
}

/* Drain the socket with recvmmsg. With UDP GRO the kernel may hand over several
 * datagrams of one sender in one buffer, with their size in a cmsg: split it again. */
static void from_udp(Core *c)
{
    struct mmsghdr m[RX_BATCH];
    struct iovec v[RX_BATCH];
    struct sockaddr_in from[RX_BATCH];
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } cm[RX_BATCH];
    for (;;) {
        for (int i = 0; i < RX_BATCH; i++) {
            v[i].iov_base = c->rxbuf + (size_t)i * c->rxslot;
            v[i].iov_len = c->rxslot;
            memset(&m[i], 0, sizeof m[i]);
            m[i].msg_hdr.msg_iov = &v[i];
            m[i].msg_hdr.msg_iovlen = 1;
            m[i].msg_hdr.msg_name = &from[i];
            m[i].msg_hdr.msg_namelen = sizeof from[i];
            m[i].msg_hdr.msg_control = cm[i].buf;
            m[i].msg_hdr.msg_controllen = sizeof cm[i].buf;
        }
        int r = recvmmsg(c->udp, m, RX_BATCH, MSG_DONTWAIT, NULL);
        if (r <= 0) {
            if (r < 0 && errno == EINTR)
                continue;
            return;
        }
        pthread_mutex_lock(&c->lock);
        for (int i = 0; i < r; i++) {
            uint8_t *p = v[i].iov_base;
            size_t n = m[i].msg_len;
            size_t seg = n;
            for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&m[i].msg_hdr); cmsg;
                 cmsg = CMSG_NXTHDR(&m[i].msg_hdr, cmsg)) {
                if (cmsg->cmsg_level == SOL_UDP && cmsg->cmsg_type == UDP_GRO) {
                    int gs;
                    memcpy(&gs, CMSG_DATA(cmsg), sizeof gs);
                    if (gs > 0 && (size_t)gs < n) {
                        seg = (size_t)gs;
                        count(c, GRO_RECEIVES, 1);
                    }
                }
            }
            uint32_t peer = ntohl(from[i].sin_addr.s_addr);
            int truncated = (m[i].msg_hdr.msg_flags & MSG_TRUNC) != 0;
            if (seg == n || n == 0) {
                count(c, RX_DATAGRAMS, 1);
                deliver(c, p, n, peer, truncated);
                continue;
            }
            for (size_t pos = 0; pos < n; pos += seg) {
                count(c, RX_DATAGRAMS, 1);
                deliver(c, p + pos, n - pos < seg ? n - pos : seg, peer, 0);
            }
        }
        pthread_mutex_unlock(&c->lock);
        if (r < RX_BATCH)
            return;
    }
}

static void *loop(void *arg)
{
    Core *c = arg;
    struct pollfd fds[3] = {{c->tun, POLLIN, 0}, {c->udp, POLLIN, 0}, {c->efd, POLLIN, 0}};
    for (;;) {
        if (poll(fds, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (fds[2].revents)
            break;
        if (fds[0].revents & POLLIN)
            from_tun(c);
        if (fds[1].revents & POLLIN)
            from_udp(c);
    }
    return NULL;
}

/* ---- Python side ---------------------------------------------------------------- */

static int Core_init(Core *c, PyObject *args, PyObject *kw)
{
    static char *names[] = {"tun_fd", "sock_fd", "port", "mtu", "check_source", "vnet_hdr",
                            "gso", "gro", NULL};
    int port, check = 1, vnet = 0, gso = 1, gro = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiii|pppp", names, &c->tun, &c->udp, &port,
                                     &c->mtu, &check, &vnet, &gso, &gro))
        return -1;
    int one = 1;
    c->gro = gro && setsockopt(c->udp, SOL_UDP, UDP_GRO, &one, sizeof one) == 0;
    /* Probe UDP GSO once: a kernel without it refuses the option. */
    int zero = 0;
    c->gso = gso && setsockopt(c->udp, SOL_UDP, UDP_SEGMENT, &zero, sizeof zero) == 0;
    if (c->mtu < 68 || c->mtu > 65535 || port < 1 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "bad mtu or port");
        return -1;
    }
    /* The loop drains each fd until EAGAIN: both must be non-blocking. */
    for (int i = 0; i < 2; i++) {
        int fd = i ? c->udp : c->tun;
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    c->port = (uint16_t)port;
    c->check_source = check;
    c->vnet = vnet;
    c->slot = (size_t)c->mtu + 64; /* room to see a datagram is oversized (MSG_TRUNC) */
    c->txbuf = PyMem_RawMalloc(c->slot * BATCH);
    /* Without GRO a slot a little over the MTU shows oversized datagrams by MSG_TRUNC. */
    c->rxslot = c->gro ? RX_SLOT : c->slot;
    c->rxbuf = PyMem_RawMalloc(c->rxslot * RX_BATCH);
    c->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!c->txbuf || !c->rxbuf || c->efd < 0) {
        PyErr_NoMemory();
        return -1;
    }
    pthread_mutex_init(&c->lock, NULL);
    return 0;
}

static void Core_dealloc(Core *c)
{
    if (c->running) {
        uint64_t one = 1;
        (void)!write(c->efd, &one, sizeof one);
        pthread_join(c->thread, NULL);
    }
    if (c->efd > 0)
        close(c->efd);
    PyMem_RawFree(c->txbuf);
    PyMem_RawFree(c->rxbuf);
    PyMem_RawFree(c->routes);
    pthread_mutex_destroy(&c->lock);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *Core_set_route(Core *c, PyObject *args)
{
    unsigned int net, mask, peer;
    if (!PyArg_ParseTuple(args, "III", &net, &mask, &peer))
        return NULL;
    pthread_mutex_lock(&c->lock);
    int i;
    for (i = 0; i < c->nroutes; i++)
        if (c->routes[i].net == net && c->routes[i].mask == mask)
            break;
    if (i == c->nroutes) {
        if (c->nroutes == c->cap) {
            int cap = c->cap ? c->cap * 2 : 16;
            struct route *r = PyMem_RawRealloc(c->routes, sizeof *r * (size_t)cap);
            if (!r) {
                pthread_mutex_unlock(&c->lock);
                return PyErr_NoMemory();
            }
            c->routes = r;
            c->cap = cap;
        }
        c->nroutes++;
    }
    c->routes[i] = (struct route){net & mask, mask, peer};
    pthread_mutex_unlock(&c->lock);
    Py_RETURN_NONE;
}

static PyObject *Core_del_route(Core *c, PyObject *args)
{
    unsigned int net, mask;
    if (!PyArg_ParseTuple(args, "II", &net, &mask))
        return NULL;
    pthread_mutex_lock(&c->lock);
    for (int i = 0; i < c->nroutes; i++) {
        if (c->routes[i].net == (net & mask) && c->routes[i].mask == mask) {
            c->routes[i] = c->routes[--c->nroutes];
            break;
        }
    }
    pthread_mutex_unlock(&c->lock);
    Py_RETURN_NONE;
}

static PyObject *Core_start(Core *c, PyObject *unused)
{
    (void)unused;
    if (c->running)
        Py_RETURN_NONE;
    int err = pthread_create(&c->thread, NULL, loop, c);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    c->running = 1;
    Py_RETURN_NONE;
}

static PyObject *Core_stop(Core *c, PyObject *unused)
{
    (void)unused;
    if (!c->running)
        Py_RETURN_NONE;
    uint64_t one = 1;
    (void)!write(c->efd, &one, sizeof one);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(c->thread, NULL);
    Py_END_ALLOW_THREADS
    c->running = 0;
    uint64_t drain;
    (void)!read(c->efd, &drain, sizeof drain);
    Py_RETURN_NONE;
}

static PyObject *Core_gso(Core *c, PyObject *unused)
{
    (void)unused;
    return PyBool_FromLong(c->gso);
}

static PyObject *Core_gro(Core *c, PyObject *unused)
{
    (void)unused;
    return PyBool_FromLong(c->gro);
}

static PyObject *Core_counters(Core *c, PyObject *unused)
{
    (void)unused;
    PyObject *t = PyTuple_New(NCOUNTERS);
    if (!t)
        return NULL;
    for (int i = 0; i < NCOUNTERS; i++) {
        uint64_t v = atomic_load_explicit(&c->counters[i], memory_order_relaxed);
        PyObject *o = PyLong_FromUnsignedLongLong(v);
        if (!o) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, o);
    }
    return t;
}

static PyMethodDef Core_methods[] = {
    {"set_route", (PyCFunction)Core_set_route, METH_VARARGS, "set_route(net, mask, peer)"},
    {"del_route", (PyCFunction)Core_del_route, METH_VARARGS, "del_route(net, mask)"},
    {"start", (PyCFunction)Core_start, METH_NOARGS, "start the packet thread"},
    {"stop", (PyCFunction)Core_stop, METH_NOARGS, "stop and join the packet thread"},
    {"counters", (PyCFunction)Core_counters, METH_NOARGS, "counters as a tuple"},
    {"gso", (PyCFunction)Core_gso, METH_NOARGS, "whether UDP GSO is in use"},
    {"gro", (PyCFunction)Core_gro, METH_NOARGS, "whether UDP GRO is in use"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "backends._fastpath.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The C packet loop: one thread between a TUN fd and a UDP socket.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath", "The udp backend's C datapath core.", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (PyType_Ready(&CoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "BATCH", BATCH);
    return m;
}
