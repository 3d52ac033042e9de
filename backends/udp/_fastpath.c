/*
 * _fastpath: the C datapath of the udp backend (C11: <stdatomic.h>; setup.py builds it
 * with -std=c11).
 *
 * Threads. One packet thread per datapath moves packets between the TUN fd and the UDP
 * socket without the GIL: it never calls into Python. Python (holding the GIL) changes
 * routes and our subnet, reads counters and offloads, and starts and stops the thread.
 * What the two share, and how:
 *  - the routes of both families, our v6 subnet and the v6 peers' addresses (peer6,
 *    peer6_ids): a read-write lock. The packet thread
 *    takes the read lock for one lookup (a route for a destination, a sender's source
 *    check, or a v6 packet's source and destination checks together) and drops it before
 *    doing anything else, so it never holds it across I/O; Python takes the write lock
 *    with the GIL released, so that a Python thread waiting for it does not stall the
 *    others;
 *  - the counters, the `gso` flag (the packet thread turns GSO off when a send cannot
 *    segment; Python reads it in offloads()), our subnet (`own`, one 64-bit value written
 *    by set_subnet) and `tun_lost` (set by the packet thread before it ends on a TUN
 *    error): C11 atomics, relaxed, since each is a value on its own and orders nothing
 *    else (pthread_join orders what the ended thread did before Python looks further);
 *  - everything else the packet thread reads (the fds, the MTU, the port, the flags) is
 *    written while no packet thread exists: in Core_init, which refuses a second call, or
 *    in set_tun, which refuses to run while the thread does; start() refuses an
 *    uninitialised Core. The buffers, the send state of a held batch and the ICMP rate
 *    buckets belong to the packet thread while it runs; the test hooks (drain_tun,
 *    drain_udp, step) refuse to run then.
 *
 * Neither direction waits for the other. A full socket buffer (sendmmsg: EAGAIN) holds
 * the batch being sent, stops reading the TUN (the TUN's queue then pushes back on the
 * senders) and asks poll() for POLLOUT, while received datagrams keep going to the TUN; a
 * batch still held after SEND_HOLD_MS is dropped, as a router with a full queue would.
 * Each wake-up handles at most a few batches of each side before poll() looks at both
 * again. POLLERR/POLLHUP on the TUN (flannel0 deleted) ends the thread with `tun_lost`
 * set and the `done` eventfd written, which Python watches: it makes a new device and
 * hands it over with set_tun.
 *
 * IPv6 inner packets (issue 14) follow the same rules in their v6 form (the rules in
 * backends/udp/packet6.py): hop limit for TTL, ICMPv6 time exceeded and no route, a
 * 128-bit route table beside the 32-bit one; ff00::/8 and fe80::/10 are not forwarded.
 * Peers at IPv6 addresses are reached through a second, AF_INET6 socket (udp6, set in
 * Core_init like udp): a route's value is then the peer's id (IS_PEER6).
 *
 * Semantics are the pure-Python datapath's (backends/udp/python_datapath.py, contract in
 * backends/udp/datapath.py), counter for counter, and one test suite runs against both
 * (tests/unit/test_datapath.py): one inner IPv4 packet per datagram, TTL decremented on
 * both ends with an incremental checksum fix, ICMP net-unreachable for packets no peer
 * subnet matches (never for ICMP or non-first fragments), ICMP time exceeded from our
 * subnet's first address when a TTL runs out (into the TUN on the sending side, back to
 * the sender's peer on the receiving side), both rate-limited per destination as the
 * kernel's icmp_ratelimit, receive drops by reason (also for destinations outside our
 * subnet). The
 * algorithms are the same too: the per-prefix-length route table of backends/udp/lpm.py,
 * the same send runs and batches, the same coalescing rule and caps.
 *
 * What makes it fast, each step probed at start and turned off when the kernel refuses:
 *  - batches: each fd is drained until EAGAIN; sends go out with one sendmmsg, receives
 *    come in with recvmmsg, into buffers allocated once;
 *  - TUN offloads (vnet header + TUNSETOFFLOAD TSO4/TSO6/CSUM): the kernel hands us TCP
 *    super-packets of up to 64 KiB; we cut them into MTU-sized packets ourselves, each
 *    with its own IP and TCP header, the payload never copied (scatter-gather iovecs);
 *  - UDP GSO: a run of equal-sized packets for one peer leaves in one message with
 *    UDP_SEGMENT, the kernel cutting it into one datagram per packet (the wire format
 *    does not change);
 *  - UDP GRO: several datagrams of one sender arrive in one buffer, cut by segment size;
 *  - coalesced TUN writes: in-order TCP segments of one flow are written to the TUN as one
 *    GSO super-packet with a virtio_net_hdr, so the kernel runs its receive path once.
 *
 * The segmentation and coalescing functions are pure (no I/O) and exposed to Python as
 * `segment` and `coalesce` so that tests can check them against an independent
 * implementation.
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
#include <time.h>
#include <arpa/inet.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

/* struct virtio_net_hdr as the TUN reads and writes it (host byte order). */
struct vnet_hdr {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
};
#define VNET_HDR_LEN 10
#define VNET_F_NEEDS_CSUM 1
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define VNET_GSO_TCPV6 4
#define VNET_GSO_ECN 0x80

#define BATCH 64          /* TUN reads per send batch (TUN_BATCH in datapath.py) */
#define READ_MAX 65536    /* one TUN read: the largest IPv4 packet */
#define TX_ARENA (8 * READ_MAX)
#define MAX_SEGS 1024     /* packets per send batch */
#define HDR_SLOT 128      /* room for one segment's IP + TCP headers (60 + 60 at most) */
#define GSO_SEGS 64       /* Linux takes at most 64 segments per UDP GSO send... */
#define GSO_BYTES 65000   /* ...and about 64 KiB */
#define RX_BATCH 16       /* receives (recvmmsg) per batch written to the TUN */
#define RX_SLOT 65536     /* with UDP GRO one buffer may hold up to 64 KiB of datagrams */
#define PEND_MAX 2048     /* received packets waiting to be written to the TUN */
#define MERGE_MAX 64      /* segments per coalesced write (COALESCE_MAX_SEGMENTS) */
#define MERGE_BYTES 65000
#define CMSG_SLOT CMSG_SPACE(sizeof(uint16_t))
#define SEND_HOLD_MS 60   /* how long a full socket buffer may hold a send batch */
#define TUN_BUDGET 4      /* send batches per wake-up before poll() looks at both sides */
#define UDP_BUDGET 4      /* receive batches per wake-up */
/* ICMP errors per destination, as the kernel's (net.ipv4.icmp_ratelimit and
 * XRLIM_BURST_FACTOR): ICMP_RATELIMIT_MS, ICMP_BURST and ICMP_BUCKET_BITS in
 * backends/udp/packet.py. */
#define ICMP_BURST 6
#define ICMP_BUCKET_BITS 6
#define ICMP_BUCKETS (1 << ICMP_BUCKET_BITS)

/* Counter order: must match COUNTERS in backends/udp/datapath.py. */
enum {
    TX_PACKETS, TX_BYTES, RX_PACKETS, RX_BYTES, RX_DATAGRAMS,
    TX_DROP_MALFORMED, TX_DROP_NO_ROUTE, TX_DROP_TTL, TX_DROP_SEND_ERROR,
    RX_DROP_UNKNOWN_SOURCE, RX_DROP_MALFORMED, RX_DROP_OVERSIZED,
    RX_DROP_SPOOFED_SOURCE, RX_DROP_TTL, RX_DROP_TUN_ERROR, ICMP_UNREACHABLE_SENT,
    GSO_SENDS, GRO_RECEIVES, COALESCED_WRITES, TSO_READS,
    RX_DROP_DST_OUTSIDE, ICMP_TIME_EXCEEDED_SENT, ICMP_RATE_LIMITED, TX_SOCKET_FULL,
    TX_DROP_LOCAL_SCOPE, /* IPv6 destinations in ff00::/8 or fe80::/10 */
    NCOUNTERS
};

/* A hash table from a 32-bit key to a 32-bit value (addresses in host byte order):
 * open addressing with linear probing, at most half full, deletion by backward shift (no
 * tombstones), so a probe is short whatever the history of changes. */
struct slot {
    uint32_t key, val;
    uint32_t used;
};

struct table {
    struct slot *slots;
    uint32_t cap;   /* a power of two (0 before the first insert) */
    uint32_t bits;  /* log2(cap) */
    uint32_t count;
};

/* The routes, as in backends/udp/lpm.py: for each prefix length present, a table from
 * the masked address to the peer, probed longest first (peer subnets usually share one
 * length, so a lookup is one mask and one probe); and a table from each peer to how many
 * subnets it holds, for the receive side's "is this sender a peer" check. */
struct routes {
    struct table len[33];   /* by prefix length */
    uint8_t order[33];      /* the lengths present, longest first */
    int nlen;
    struct table peers;     /* peer -> number of subnets (v4 and v6 subnets alike) */
};

/* The same for IPv6 subnets (issue 14): 128-bit keys as two 64-bit halves, in host
 * order, the value still a peer's v4 underlay address (this loop has one AF_INET socket:
 * peers at v6 underlay addresses are the python datapath's). Our v6 subnet lives here
 * too, under the same lock: the receive side reads it in the same locked section as the
 * sender's source check, and set_subnet may change it while the thread runs. */
struct slot6 {
    uint64_t hi, lo;
    uint32_t val, used;
};

struct table6 {
    struct slot6 *slots;
    uint32_t cap, bits, count;
};

struct routes6 {
    struct table6 len[129];
    uint8_t order[129];
    int nlen;
    uint64_t own_hi, own_lo; /* our v6 subnet's network address (flannel0's)... */
    int own_plen;            /* ...and prefix length; 0: not set */
};

/* One packet to send: two iovecs (headers, payload; a plain packet leaves the second
 * empty) in the batch's iovec array at 2 * index. */
struct seg {
    uint32_t peer;
    uint32_t len;
};

/* One packet to write to the TUN. */
struct pend {
    uint8_t *p;
    uint32_t len;
};

/* A token bucket of the ICMP rate limit (ms of tokens, as the kernel's). */
struct bucket {
    int64_t tokens, last;
    int used; /* 0: never used, full */
};

/* A peer's underlay address for sendmsg: IPv4 or IPv6. */
union peer_sa {
    struct sockaddr_in v4;
    struct sockaddr_in6 v6;
};

/* Route values are uint32: a peer at an IPv4 address is that address; a peer at an IPv6
 * address is a small id (1 .. PEER6_MAX - 1, so in 0.0.0.0/8, which no peer's PublicIP
 * can be) naming its address in the peer6 array. 0 is "no route". */
#define PEER6_MAX 0x01000000u
#define IS_PEER6(p) ((p) < PEER6_MAX)

typedef struct {
    PyObject_HEAD
    int tun, udp, efd, done;
    int udp6;              /* the AF_INET6 socket for peers at v6 addresses, or -1 */
    uint16_t port;
    int mtu, check_source, vnet, gro, tso, coalesce; /* set while no thread runs */
    int tso_wanted;        /* the tso option, for a TUN handed over by set_tun */
    int icmp_interval;     /* ms of tokens per ICMP error; 0: no limit */
    atomic_int gso;        /* on until a send cannot segment; read by Python */
    _Atomic uint64_t own;  /* our subnet: mask << 32 | network; 0 until set_subnet */
    atomic_int tun_lost;   /* the packet thread ended on POLLERR/POLLHUP of the TUN */
    int ready;             /* Core_init succeeded: buffers, eventfds and lock are there */
    int lock_ready;        /* the lock was initialised (so dealloc destroys it) */
    int efd_open, done_open; /* efd and done are ours to close */
    pthread_t thread;
    int running;           /* Python's side only (under the GIL) */
    pthread_rwlock_t lock; /* the routes: the packet thread reads, Python writes */
    struct routes routes;
    struct routes6 routes6; /* under the same lock */
    uint8_t (*peer6)[16];   /* v6 peer id -> address (under the lock; grows) */
    uint32_t npeer6;        /* its room, in ids */
    struct table6 peer6_ids; /* v6 address -> id, for a sender's id (under the lock) */
    _Atomic uint64_t counters[NCOUNTERS];
    /* send side */
    uint8_t *txbuf;        /* TX_ARENA: packets as read from the TUN */
    uint8_t *hdrs;         /* MAX_SEGS * HDR_SLOT: headers of cut segments */
    struct seg *segs;      /* MAX_SEGS */
    struct iovec *iov;     /* 2 * MAX_SEGS */
    struct mmsghdr *msgs;  /* MAX_SEGS */
    union peer_sa *to;
    int *npkts;
    uint8_t *cmsgs;        /* MAX_SEGS * CMSG_SLOT: UDP_SEGMENT control data */
    int nsegs;
    int nm, sent;          /* messages of the batch being sent, and how many went */
    int held;              /* that batch waits for room in the socket buffer... */
    int held_fd;           /* ...of this socket (udp or udp6)... */
    int64_t held_until;    /* ...until then (ms, CLOCK_MONOTONIC) */
    size_t off;            /* where the next TUN read goes in txbuf... */
    int reads;             /* ...and the reads of this batch so far */
    int carry;             /* a packet read but not yet cut when the batch was held: */
    size_t carry_off, carry_n;
    uint32_t carry_peer;
    struct vnet_hdr carry_vh;
    struct bucket buckets[ICMP_BUCKETS];
    /* receive side */
    uint8_t *rxbuf;        /* RX_BATCH * rxslot */
    size_t rxslot;
    struct pend *pend;     /* PEND_MAX */
    int npend;
} Core;

static void count(Core *c, int i, uint64_t n)
{
    atomic_fetch_add_explicit(&c->counters[i], n, memory_order_relaxed);
}

/* ---- checksums ------------------------------------------------------------------
 * The Internet checksum is a ones' complement sum of 16-bit words. Summing native-order
 * 32-bit words into 64 bits and folding gives the same sum (2^16 = 1 mod 0xFFFF) in the
 * host's byte order; stored back with memcpy it is right in network order on any host. */

static uint64_t sum_add(uint64_t acc, const uint8_t *p, size_t n)
{
    while (n >= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        acc += w;
        p += 4;
        n -= 4;
    }
    if (n >= 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        acc += w;
        p += 2;
        n -= 2;
    }
    if (n) { /* an odd last byte is the high half of a zero-padded word */
        uint16_t w = 0;
        memcpy(&w, p, 1);
        acc += w;
    }
    return acc;
}

static uint16_t sum_fold(uint64_t acc)
{
    while (acc >> 16)
        acc = (acc & 0xFFFF) + (acc >> 16);
    return (uint16_t)acc;
}

/* Store the checksum of a sum at p (two bytes). */
static void put_csum(uint8_t *p, uint64_t acc)
{
    uint16_t v = (uint16_t)~sum_fold(acc);
    memcpy(p, &v, 2);
}

/* The pseudo-header sum of an IPv4 packet's TCP or UDP segment of `len` bytes. */
static uint64_t pseudo_sum(const uint8_t *ip, uint8_t proto, size_t len)
{
    uint64_t acc = sum_add(0, ip + 12, 8);
    return acc + htons(proto) + htons((uint16_t)len);
}

static void ip_csum(uint8_t *ip, size_t ihl)
{
    ip[10] = ip[11] = 0;
    put_csum(ip + 10, sum_add(0, ip, ihl));
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

static void put_be16(uint8_t *p, uint32_t v)
{
    p[0] = (v >> 8) & 0xFF;
    p[1] = v & 0xFF;
}

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24;
    p[1] = (v >> 16) & 0xFF;
    p[2] = (v >> 8) & 0xFF;
    p[3] = v & 0xFF;
}

/* ---- segmentation (TUN TSO -> packets on the wire) -------------------------------- */

/* Cut what one TUN read gave (`h`, then p[0..n)) into wire packets: iov gets two entries
 * per packet, len[] their sizes, hdrs room for HDR_SLOT bytes per packet. A plain packet
 * is one entry (its checksum completed if the kernel left it partial); a TCP
 * super-packet becomes ceil(payload / gso_size) packets with the super-packet's headers,
 * the IP id and TCP sequence advanced, FIN and PSH on the last only, CWR on the first
 * only, and both checksums computed. Returns the count, -1 if malformed, -2 if more than
 * `max` packets would be needed. */
static int tso_split6(const struct vnet_hdr *h, uint8_t *p, size_t n, uint8_t *hdrs,
                      struct iovec *iov, uint32_t *len, int max);

static int tso_split(const struct vnet_hdr *h, uint8_t *p, size_t n, uint8_t *hdrs,
                     struct iovec *iov, uint32_t *len, int max)
{
    int v6 = n >= 40 && p[0] >> 4 == 6;
    if (max < 1)
        return -2;
    if (!v6 && (n < 20 || p[0] >> 4 != 4))
        return -1;
    if (h->gso_type == VNET_GSO_NONE) {
        if (h->flags & VNET_F_NEEDS_CSUM) {
            size_t at = (size_t)h->csum_start + h->csum_offset;
            if (h->csum_start < (v6 ? 40 : 20) || at + 2 > n)
                return -1;
            /* The field holds the pseudo-header sum: summing over it finishes the job.
             * A result of 0 goes out as 0xFFFF, as the kernel does: for UDP, 0 would
             * mean "no checksum". */
            uint16_t v = (uint16_t)~sum_fold(sum_add(0, p + h->csum_start, n - h->csum_start));
            if (v == 0)
                v = 0xFFFF;
            memcpy(p + at, &v, 2);
        }
        iov[0].iov_base = p;
        iov[0].iov_len = n;
        iov[1].iov_base = NULL;
        iov[1].iov_len = 0;
        len[0] = (uint32_t)n;
        return 1;
    }
    if (v6)
        return tso_split6(h, p, n, hdrs, iov, len, max);
    if ((h->gso_type & ~VNET_GSO_ECN) != VNET_GSO_TCPV4 || h->gso_size == 0)
        return -1;
    size_t ihl = (size_t)(p[0] & 0x0F) * 4;
    if (ihl < 20 || p[9] != 6 || ihl + 20 > n)
        return -1;
    size_t thl = (size_t)(p[ihl + 12] >> 4) * 4;
    size_t hl = ihl + thl;
    if (thl < 20 || hl >= n || hl > HDR_SLOT)
        return -1;
    size_t mss = h->gso_size, payload = n - hl;
    size_t nseg = (payload + mss - 1) / mss;
    if (nseg > (size_t)max)
        return -2;
    uint32_t id = (uint32_t)p[4] << 8 | p[5];
    uint32_t seq = be32(p + ihl + 4);
    uint8_t flags = p[ihl + 13];
    for (size_t k = 0; k < nseg; k++) {
        size_t plen = k + 1 < nseg ? mss : payload - k * mss;
        uint8_t *s = hdrs + k * HDR_SLOT, *tcp = s + ihl;
        const uint8_t *data = p + hl + k * mss;
        memcpy(s, p, hl);
        put_be16(s + 2, (uint32_t)(hl + plen));
        put_be16(s + 4, id + (uint32_t)k);
        ip_csum(s, ihl);
        put_be32(tcp + 4, seq + (uint32_t)(k * mss));
        uint8_t f = flags;
        if (k + 1 < nseg)
            f &= (uint8_t)~0x09; /* FIN, PSH: last segment only */
        if (k > 0)
            f &= (uint8_t)~0x80; /* CWR: first segment only */
        tcp[13] = f;
        tcp[16] = tcp[17] = 0;
        uint64_t acc = pseudo_sum(s, 6, thl + plen);
        acc = sum_add(acc, tcp, thl);
        acc = sum_add(acc, data, plen);
        put_csum(tcp + 16, acc);
        iov[2 * k].iov_base = s;
        iov[2 * k].iov_len = hl;
        iov[2 * k + 1].iov_base = (void *)data;
        iov[2 * k + 1].iov_len = plen;
        len[k] = (uint32_t)(hl + plen);
    }
    return (int)nseg;
}

/* tso_split for a TCP/IPv6 super-packet (TSO6): the same cut, with the v6 header's
 * payload length set per segment (no IP id, no header checksum) and the TCP checksum over
 * the v6 pseudo header. The TCP header must follow the fixed header directly: the kernel
 * hands over extension headers rarely, and such a packet is refused as malformed. */
static int tso_split6(const struct vnet_hdr *h, uint8_t *p, size_t n, uint8_t *hdrs,
                      struct iovec *iov, uint32_t *len, int max)
{
    if ((h->gso_type & ~VNET_GSO_ECN) != VNET_GSO_TCPV6 || h->gso_size == 0)
        return -1;
    if (p[6] != 6 || n < 60)
        return -1;
    size_t thl = (size_t)(p[52] >> 4) * 4, hl = 40 + thl;
    if (thl < 20 || hl >= n || hl > HDR_SLOT)
        return -1;
    size_t mss = h->gso_size, payload = n - hl;
    size_t nseg = (payload + mss - 1) / mss;
    if (nseg > (size_t)max)
        return -2;
    uint32_t seq = be32(p + 44);
    uint8_t flags = p[53];
    for (size_t k = 0; k < nseg; k++) {
        size_t plen = k + 1 < nseg ? mss : payload - k * mss;
        uint8_t *s = hdrs + k * HDR_SLOT, *tcp = s + 40;
        const uint8_t *data = p + hl + k * mss;
        memcpy(s, p, hl);
        put_be16(s + 4, (uint32_t)(thl + plen));
        put_be32(tcp + 4, seq + (uint32_t)(k * mss));
        uint8_t f = flags;
        if (k + 1 < nseg)
            f &= (uint8_t)~0x09; /* FIN, PSH: last segment only */
        if (k > 0)
            f &= (uint8_t)~0x80; /* CWR: first segment only */
        tcp[13] = f;
        tcp[16] = tcp[17] = 0;
        /* v6 pseudo header: addresses, 32-bit length (under 64 KiB: its high word 0), 6. */
        uint64_t acc = sum_add(0, s + 8, 32) + htons((uint16_t)(thl + plen)) + htons(6);
        acc = sum_add(acc, tcp, thl);
        acc = sum_add(acc, data, plen);
        put_csum(tcp + 16, acc);
        iov[2 * k].iov_base = s;
        iov[2 * k].iov_len = hl;
        iov[2 * k + 1].iov_base = (void *)data;
        iov[2 * k + 1].iov_len = plen;
        len[k] = (uint32_t)(hl + plen);
    }
    return (int)nseg;
}

/* ---- coalescing (packets from the wire -> TCP super-packets on the TUN) ----------- */

/* The TCP header length if the packet may be merged with its neighbours: plain IPv4 (no
 * options), TCP, not a fragment, flags ACK or ACK|PSH, some payload. Else 0. */
static size_t mergeable(const uint8_t *p, size_t n)
{
    if (n < 40 || p[0] != 0x45 || p[9] != 6 || (p[6] & 0x3F) || p[7])
        return 0;
    size_t thl = (size_t)(p[32] >> 4) * 4;
    uint8_t f = p[33];
    if (thl < 20 || n <= 20 + thl || (f != 0x10 && f != 0x18))
        return 0;
    return thl;
}

/* Two segments belong to one merge when everything but the IP id, lengths, checksums,
 * sequence number and PSH matches: TOS, TTL, DF, addresses, ports, ack, data offset and
 * the reserved/AE bits (AccECN), window, TCP options. */
static int same_flow(const uint8_t *a, const uint8_t *b, size_t thl)
{
    return a[1] == b[1] && a[8] == b[8] && (a[6] & 0x40) == (b[6] & 0x40) &&
           a[32] == b[32] && (size_t)(b[32] >> 4) * 4 == thl &&
           memcmp(a + 12, b + 12, 12) == 0 && memcmp(a + 28, b + 28, 4) == 0 &&
           memcmp(a + 34, b + 34, 2) == 0 && memcmp(a + 40, b + 40, thl - 20) == 0;
}

/* How many packets from pk[i] on can be written as one super-packet (at least 1):
 * in-order segments of one flow, each as long as the first except the last, PSH only
 * on the last, within MERGE_MAX segments and MERGE_BYTES. */
static int merge_run(const struct pend *pk, int i, int n)
{
    size_t thl = mergeable(pk[i].p, pk[i].len);
    if (!thl)
        return 1;
    const uint8_t *first = pk[i].p;
    size_t mss = pk[i].len - 20 - thl, size = pk[i].len;
    uint32_t seq = be32(first + 24) + (uint32_t)mss;
    int j = i + 1;
    while (j < n && j - i < MERGE_MAX && pk[j - 1].p[33] == 0x10) {
        const uint8_t *q = pk[j].p;
        size_t plen = pk[j].len - 20 - thl;
        if (mergeable(q, pk[j].len) != thl || plen > mss || size + plen > MERGE_BYTES ||
            !same_flow(first, q, thl) || be32(q + 24) != seq)
            break;
        size += plen;
        seq += (uint32_t)plen;
        j++;
        if (plen < mss)
            break; /* only the last segment may be short */
    }
    return j - i;
}

/* The vnet header and the IP + TCP headers (into hdr) of the super-packet merging
 * pk[i..i+k). The kernel finishes the TCP checksum (NEEDS_CSUM) from the pseudo-header
 * sum left in the field. Returns the header length. */
static size_t merge_headers(const struct pend *pk, int i, int k, struct vnet_hdr *vh,
                            uint8_t *hdr)
{
    const uint8_t *first = pk[i].p;
    size_t thl = (size_t)(first[32] >> 4) * 4, hl = 20 + thl, payload = 0;
    for (int q = i; q < i + k; q++)
        payload += pk[q].len - hl;
    memcpy(hdr, first, hl);
    put_be16(hdr + 2, (uint32_t)(hl + payload));
    ip_csum(hdr, 20);
    hdr[33] |= pk[i + k - 1].p[33] & 0x08; /* PSH of the last segment */
    hdr[36] = hdr[37] = 0;
    uint16_t ps = sum_fold(pseudo_sum(hdr, 6, thl + payload));
    memcpy(hdr + 36, &ps, 2);
    vh->flags = VNET_F_NEEDS_CSUM;
    vh->gso_type = VNET_GSO_TCPV4;
    vh->hdr_len = (uint16_t)hl;
    vh->gso_size = (uint16_t)(pk[i].len - hl);
    vh->csum_start = 20;
    vh->csum_offset = 16;
    return hl;
}

/* ---- routes ----------------------------------------------------------------------- */

static uint32_t prefix_mask(int plen)
{
    return plen ? 0xFFFFFFFFu << (32 - plen) : 0;
}

/* Fibonacci hashing: the top bits of key * 2^32/phi, good for masked addresses whose low
 * bits are all zero. */
static uint32_t slot_of(const struct table *t, uint32_t key)
{
    return t->bits ? (uint32_t)(key * 2654435769u) >> (32 - t->bits) : 0;
}

static struct slot *table_find(const struct table *t, uint32_t key)
{
    if (!t->count)
        return NULL;
    uint32_t m = t->cap - 1;
    for (uint32_t i = slot_of(t, key);; i = (i + 1) & m) {
        struct slot *s = &t->slots[i];
        if (!s->used)
            return NULL;
        if (s->key == key)
            return s;
    }
}

/* Room for one more entry (grown so that the table stays at most half full); -1 if out
 * of memory, the table unchanged. */
static int table_reserve(struct table *t)
{
    if (2 * (t->count + 1) <= t->cap)
        return 0;
    uint32_t bits = t->cap ? t->bits + 1 : 3, cap = 1u << bits;
    struct slot *slots = PyMem_RawCalloc(cap, sizeof *slots);
    if (!slots)
        return -1;
    struct table bigger = {slots, cap, bits, t->count};
    for (uint32_t i = 0; i < t->cap; i++) {
        if (!t->slots[i].used)
            continue;
        uint32_t j = slot_of(&bigger, t->slots[i].key);
        while (slots[j].used)
            j = (j + 1) & (cap - 1);
        slots[j] = t->slots[i];
    }
    PyMem_RawFree(t->slots);
    *t = bigger;
    return 0;
}

/* Insert or replace; table_reserve must have made room. */
static void table_put(struct table *t, uint32_t key, uint32_t val)
{
    uint32_t m = t->cap - 1, i = slot_of(t, key);
    while (t->slots[i].used && t->slots[i].key != key)
        i = (i + 1) & m;
    if (!t->slots[i].used)
        t->count++;
    t->slots[i] = (struct slot){key, val, 1};
}

/* Remove `key` if present. Backward shift: each entry after the hole that may move into
 * it (its home slot is not between the hole and itself) does, so probes stay unbroken. */
static void table_del(struct table *t, uint32_t key)
{
    struct slot *s = table_find(t, key);
    if (!s)
        return;
    uint32_t m = t->cap - 1, hole = (uint32_t)(s - t->slots);
    for (uint32_t j = (hole + 1) & m; t->slots[j].used; j = (j + 1) & m) {
        uint32_t home = slot_of(t, t->slots[j].key);
        int stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
        if (!stays) {
            t->slots[hole] = t->slots[j];
            hole = j;
        }
    }
    t->slots[hole].used = 0;
    if (--t->count == 0) { /* an empty table gives its memory back */
        PyMem_RawFree(t->slots);
        *t = (struct table){0};
    }
}

static void routes_reorder(struct routes *r)
{
    r->nlen = 0;
    for (int plen = 32; plen >= 0; plen--)
        if (r->len[plen].count)
            r->order[r->nlen++] = (uint8_t)plen;
}

static void peer_add(struct routes *r, uint32_t peer, int delta)
{
    struct slot *s = table_find(&r->peers, peer);
    uint32_t n = (s ? s->val : 0) + (uint32_t)delta;
    if (n)
        table_put(&r->peers, peer, n); /* room: reserved by the caller when new */
    else
        table_del(&r->peers, peer);
}

/* Packets for net/plen go to `peer`, which may send from it. -1 if out of memory (the
 * routes unchanged). Caller holds the write lock. */
static int routes_set(struct routes *r, uint32_t net, int plen, uint32_t peer)
{
    struct table *t = &r->len[plen];
    net &= prefix_mask(plen);
    if (table_reserve(t) < 0 || table_reserve(&r->peers) < 0)
        return -1;
    struct slot *old = table_find(t, net);
    if (old && old->val == peer)
        return 0;
    /* The new peer is counted before the old one is uncounted: uncounting may empty and
     * free the peer table, whose room was reserved above. */
    peer_add(r, peer, 1);
    if (old) {
        uint32_t was = old->val;
        old->val = peer;
        peer_add(r, was, -1);
    } else {
        table_put(t, net, peer);
        if (t->count == 1)
            routes_reorder(r);
    }
    return 0;
}

/* Caller holds the write lock. */
static void routes_del(struct routes *r, uint32_t net, int plen)
{
    struct table *t = &r->len[plen];
    net &= prefix_mask(plen);
    struct slot *old = table_find(t, net);
    if (!old)
        return;
    peer_add(r, old->val, -1);
    table_del(t, net);
    if (t->count == 0)
        routes_reorder(r);
}

static void routes_free(struct routes *r)
{
    for (int plen = 0; plen <= 32; plen++)
        PyMem_RawFree(r->len[plen].slots);
    PyMem_RawFree(r->peers.slots);
    memset(r, 0, sizeof *r);
}

/* Longest-prefix match: the peer, or 0 for no route. Caller holds the read lock. */
static uint32_t lookup(const struct routes *r, uint32_t dst)
{
    for (int i = 0; i < r->nlen; i++) {
        int plen = r->order[i];
        const struct slot *s = table_find(&r->len[plen], dst & prefix_mask(plen));
        if (s)
            return s->val;
    }
    return 0;
}

/* 0: `peer` holds no route; 1: it does but not for `src`; 2: `src` is in one of its
 * subnets (a subnet is the peer's when its entry names the peer, so each length present
 * is one probe). Caller holds the read lock. */
static int source_ok(const struct routes *r, uint32_t peer, uint32_t src)
{
    if (!table_find(&r->peers, peer))
        return 0;
    for (int i = 0; i < r->nlen; i++) {
        int plen = r->order[i];
        const struct slot *s = table_find(&r->len[plen], src & prefix_mask(plen));
        if (s && s->val == peer)
            return 2;
    }
    return 1;
}

/* The two lookups of the packet path, each under the read lock for that lookup only. */
static uint32_t route_for(Core *c, uint32_t dst)
{
    pthread_rwlock_rdlock(&c->lock);
    uint32_t peer = lookup(&c->routes, dst);
    pthread_rwlock_unlock(&c->lock);
    return peer;
}

static int source_check(Core *c, uint32_t peer, uint32_t src)
{
    pthread_rwlock_rdlock(&c->lock);
    int known = source_ok(&c->routes, peer, src);
    pthread_rwlock_unlock(&c->lock);
    return known;
}

/* ---- IPv6 routes -------------------------------------------------------------------
 * The v4 table's twin on 128-bit keys (backends/udp/lpm.py with width 128): one
 * open-addressing table per prefix length, probed longest first. */

static void mask6(int plen, uint64_t *hi, uint64_t *lo)
{
    *hi = plen >= 64 ? ~(uint64_t)0 : plen ? ~(uint64_t)0 << (64 - plen) : 0;
    *lo = plen <= 64 ? 0 : ~(uint64_t)0 << (128 - plen);
}

/* Fibonacci hashing of the key folded to 32 bits (a /64's low half is all zero). */
static uint32_t slot6_of(const struct table6 *t, uint64_t hi, uint64_t lo)
{
    uint64_t f = hi ^ lo;
    uint32_t k = (uint32_t)(f ^ (f >> 32));
    return t->bits ? (uint32_t)(k * 2654435769u) >> (32 - t->bits) : 0;
}

static struct slot6 *table6_find(const struct table6 *t, uint64_t hi, uint64_t lo)
{
    if (!t->count)
        return NULL;
    uint32_t m = t->cap - 1;
    for (uint32_t i = slot6_of(t, hi, lo);; i = (i + 1) & m) {
        struct slot6 *s = &t->slots[i];
        if (!s->used)
            return NULL;
        if (s->hi == hi && s->lo == lo)
            return s;
    }
}

/* As table_reserve: at most half full; -1 if out of memory, the table unchanged. */
static int table6_reserve(struct table6 *t)
{
    if (2 * (t->count + 1) <= t->cap)
        return 0;
    uint32_t bits = t->cap ? t->bits + 1 : 3, cap = 1u << bits;
    struct slot6 *slots = PyMem_RawCalloc(cap, sizeof *slots);
    if (!slots)
        return -1;
    struct table6 bigger = {slots, cap, bits, t->count};
    for (uint32_t i = 0; i < t->cap; i++) {
        if (!t->slots[i].used)
            continue;
        uint32_t j = slot6_of(&bigger, t->slots[i].hi, t->slots[i].lo);
        while (slots[j].used)
            j = (j + 1) & (cap - 1);
        slots[j] = t->slots[i];
    }
    PyMem_RawFree(t->slots);
    *t = bigger;
    return 0;
}

static void table6_put(struct table6 *t, uint64_t hi, uint64_t lo, uint32_t val)
{
    uint32_t m = t->cap - 1, i = slot6_of(t, hi, lo);
    while (t->slots[i].used && !(t->slots[i].hi == hi && t->slots[i].lo == lo))
        i = (i + 1) & m;
    if (!t->slots[i].used)
        t->count++;
    t->slots[i] = (struct slot6){hi, lo, val, 1};
}

/* Backward-shift deletion, as table_del. */
static void table6_del(struct table6 *t, uint64_t hi, uint64_t lo)
{
    struct slot6 *s = table6_find(t, hi, lo);
    if (!s)
        return;
    uint32_t m = t->cap - 1, hole = (uint32_t)(s - t->slots);
    for (uint32_t j = (hole + 1) & m; t->slots[j].used; j = (j + 1) & m) {
        uint32_t home = slot6_of(t, t->slots[j].hi, t->slots[j].lo);
        int stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
        if (!stays) {
            t->slots[hole] = t->slots[j];
            hole = j;
        }
    }
    t->slots[hole].used = 0;
    if (--t->count == 0) {
        PyMem_RawFree(t->slots);
        *t = (struct table6){0};
    }
}

static void routes6_reorder(struct routes6 *r)
{
    r->nlen = 0;
    for (int plen = 128; plen >= 0; plen--)
        if (r->len[plen].count)
            r->order[r->nlen++] = (uint8_t)plen;
}

/* Packets for hi:lo/plen go to `peer` (a v4 address); the peer is counted in the v4
 * routes' peer table, the sender check of both families. -1 if out of memory (nothing
 * changed). Caller holds the write lock. */
static int routes6_set(struct routes *r4, struct routes6 *r, uint64_t hi, uint64_t lo,
                       int plen, uint32_t peer)
{
    struct table6 *t = &r->len[plen];
    uint64_t mh, ml;
    mask6(plen, &mh, &ml);
    hi &= mh;
    lo &= ml;
    if (table6_reserve(t) < 0 || table_reserve(&r4->peers) < 0)
        return -1;
    struct slot6 *old = table6_find(t, hi, lo);
    if (old && old->val == peer)
        return 0;
    peer_add(r4, peer, 1); /* before the old one is uncounted, as in routes_set */
    if (old) {
        uint32_t was = old->val;
        old->val = peer;
        peer_add(r4, was, -1);
    } else {
        table6_put(t, hi, lo, peer);
        if (t->count == 1)
            routes6_reorder(r);
    }
    return 0;
}

static void routes6_del(struct routes *r4, struct routes6 *r, uint64_t hi, uint64_t lo,
                        int plen)
{
    struct table6 *t = &r->len[plen];
    uint64_t mh, ml;
    mask6(plen, &mh, &ml);
    struct slot6 *old = table6_find(t, hi & mh, lo & ml);
    if (!old)
        return;
    peer_add(r4, old->val, -1);
    table6_del(t, hi & mh, lo & ml);
    if (t->count == 0)
        routes6_reorder(r);
}

static void routes6_free(struct routes6 *r)
{
    for (int plen = 0; plen <= 128; plen++)
        PyMem_RawFree(r->len[plen].slots);
    memset(r, 0, sizeof *r);
}

/* Longest-prefix match: the peer, or 0. Caller holds the read lock. */
static uint32_t lookup6(const struct routes6 *r, uint64_t hi, uint64_t lo)
{
    for (int i = 0; i < r->nlen; i++) {
        int plen = r->order[i];
        uint64_t mh, ml;
        mask6(plen, &mh, &ml);
        const struct slot6 *s = table6_find(&r->len[plen], hi & mh, lo & ml);
        if (s)
            return s->val;
    }
    return 0;
}

static uint64_t be64(const uint8_t *p)
{
    return (uint64_t)be32(p) << 32 | be32(p + 4);
}

static void put_be64(uint8_t *p, uint64_t v)
{
    put_be32(p, (uint32_t)(v >> 32));
    put_be32(p + 4, (uint32_t)v);
}

static uint32_t route6_for(Core *c, const uint8_t *addr)
{
    pthread_rwlock_rdlock(&c->lock);
    uint32_t peer = lookup6(&c->routes6, be64(addr), be64(addr + 8));
    pthread_rwlock_unlock(&c->lock);
    return peer;
}

/* Flannel0's v6 address (our v6 subnet's first) into out; 0 if no v6 subnet is set. */
static int own6_addr(Core *c, uint8_t *out)
{
    pthread_rwlock_rdlock(&c->lock);
    int set = c->routes6.own_plen != 0;
    put_be64(out, c->routes6.own_hi);
    put_be64(out + 8, c->routes6.own_lo);
    pthread_rwlock_unlock(&c->lock);
    return set;
}

/* The receive checks of a v6 packet that need the tables, in one locked section: 0 if
 * it may go on, else the counter it is dropped under: its source in none of the
 * sender's v6 subnets (when checked), its destination outside our v6 subnet. */
static int rx6_verdict(Core *c, uint32_t peer, const uint8_t *p)
{
    uint64_t shi = be64(p + 8), slo = be64(p + 16), dhi = be64(p + 24), dlo = be64(p + 32);
    int verdict = 0;
    pthread_rwlock_rdlock(&c->lock);
    const struct routes6 *r = &c->routes6;
    if (c->check_source) {
        verdict = RX_DROP_SPOOFED_SOURCE;
        for (int i = 0; i < r->nlen; i++) {
            int plen = r->order[i];
            uint64_t mh, ml;
            mask6(plen, &mh, &ml);
            const struct slot6 *s = table6_find(&r->len[plen], shi & mh, slo & ml);
            if (s && s->val == peer) {
                verdict = 0;
                break;
            }
        }
    }
    if (!verdict) {
        uint64_t mh, ml;
        mask6(r->own_plen, &mh, &ml);
        if (!r->own_plen || (dhi & mh) != r->own_hi || (dlo & ml) != r->own_lo)
            verdict = RX_DROP_DST_OUTSIDE;
    }
    pthread_rwlock_unlock(&c->lock);
    return verdict;
}

/* ---- TUN writes ------------------------------------------------------------------- */

static const uint8_t zero_vnet[VNET_HDR_LEN];

/* One plain packet to the TUN, counted under ok_counter (RX_PACKETS or ICMP). */
static void write_tun(Core *c, const uint8_t *p, size_t n, int ok_counter)
{
    struct iovec v[2];
    int k = 0;
    if (c->vnet) {
        v[k].iov_base = (void *)zero_vnet;
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

/* Write the received packets waiting in c->pend, runs of one TCP flow as one
 * super-packet when coalescing is on. */
static void flush_pending(Core *c)
{
    struct iovec v[3 + MERGE_MAX];
    uint8_t hdr[HDR_SLOT];
    struct vnet_hdr vh;
    for (int i = 0; i < c->npend;) {
        int k = c->coalesce ? merge_run(c->pend, i, c->npend) : 1;
        if (k == 1) {
            write_tun(c, c->pend[i].p, c->pend[i].len, RX_PACKETS);
            i++;
            continue;
        }
        size_t hl = merge_headers(c->pend, i, k, &vh, hdr), bytes = 0;
        v[0].iov_base = &vh;
        v[0].iov_len = VNET_HDR_LEN;
        v[1].iov_base = hdr;
        v[1].iov_len = hl;
        for (int q = 0; q < k; q++) {
            v[2 + q].iov_base = c->pend[i + q].p + hl;
            v[2 + q].iov_len = c->pend[i + q].len - hl;
            bytes += c->pend[i + q].len;
        }
        if (writev(c->tun, v, 2 + k) < 0) {
            count(c, RX_DROP_TUN_ERROR, (uint64_t)k);
        } else {
            count(c, RX_PACKETS, (uint64_t)k);
            count(c, RX_BYTES, bytes);
            count(c, COALESCED_WRITES, 1);
        }
        i += k;
    }
    c->npend = 0;
}

/* ---- ICMP errors ------------------------------------------------------------------ */

#define ICMP_MAX (20 + 8 + 60 + 8) /* IP, ICMP header, the quoted header and 8 bytes */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* May an ICMP error go to `dst` now? The kernel's per-destination token bucket
 * (inet_peer_xrlim_allow): an error costs icmp_interval ms of tokens, tokens grow with
 * time up to ICMP_BURST errors' worth, a bucket starts full; destinations share
 * ICMP_BUCKETS buckets by a Fibonacci hash (IcmpLimiter in backends/udp/packet.py).
 * Counts a refusal. Packet thread only (or a test hook while it does not run). */
static int icmp_allowed(Core *c, uint32_t dst)
{
    if (c->icmp_interval <= 0)
        return 1;
    struct bucket *b = &c->buckets[(uint32_t)(dst * 2654435769u) >> (32 - ICMP_BUCKET_BITS)];
    int64_t now = now_ms(), cap = (int64_t)ICMP_BURST * c->icmp_interval;
    int64_t tokens = b->used ? b->tokens + (now - b->last) : cap;
    if (tokens > cap)
        tokens = cap;
    b->used = 1;
    b->last = now;
    if (tokens >= c->icmp_interval) {
        b->tokens = tokens - c->icmp_interval;
        return 1;
    }
    b->tokens = tokens;
    count(c, ICMP_RATE_LIMITED, 1);
    return 0;
}

/* An ICMP error of `type`/`code` from `src` (4 bytes, network order) to the source of the
 * offender `off` (n bytes, its header checked: ihl <= total <= n), quoting its header and
 * 8 bytes of payload (RFC 792), into pkt (ICMP_MAX bytes). Returns the length. */
static size_t icmp_error(uint8_t *pkt, const uint8_t *off, size_t n, uint8_t type,
                         uint8_t code, const uint8_t *src)
{
    size_t ihl = (size_t)(off[0] & 0x0F) * 4;
    size_t quote = ihl + 8 <= n ? ihl + 8 : n;
    size_t len = 20 + 8 + quote;
    memset(pkt, 0, 28);
    pkt[0] = 0x45;
    put_be16(pkt + 2, (uint32_t)len);
    pkt[8] = 64;
    pkt[9] = 1;
    memcpy(pkt + 12, src, 4);
    memcpy(pkt + 16, off + 12, 4);
    pkt[20] = type;
    pkt[21] = code;
    memcpy(pkt + 28, off, quote);
    put_csum(pkt + 22, sum_add(0, pkt + 20, 8 + quote));
    ip_csum(pkt, 20);
    return len;
}

/* A whole IPv4 header within n bytes: 1 (and its header length in *ihl). */
static int header_ok(const uint8_t *off, size_t n, size_t *ihl)
{
    if (n < 20 || off[0] >> 4 != 4)
        return 0;
    *ihl = (size_t)(off[0] & 0x0F) * 4;
    size_t total = (size_t)off[2] << 8 | off[3];
    return *ihl >= 20 && total >= *ihl && total <= n;
}

static int first_fragment(const uint8_t *off)
{
    return ((off[6] & 0x1F) << 8 | off[7]) == 0;
}

/* ICMP destination unreachable (net) for `off`, from its destination: our own address (what
 * flanneld uses) would come back through the TUN as a martian and never reach the sender. */
static void net_unreachable(Core *c, const uint8_t *off, size_t n)
{
    size_t ihl;
    if (!header_ok(off, n, &ihl) || off[9] == 1 || !first_fragment(off))
        return;
    uint8_t pkt[ICMP_MAX];
    size_t len = icmp_error(pkt, off, n, 3, 0, off + 16);
    if (icmp_allowed(c, be32(off + 12)))
        write_tun(c, pkt, len, ICMP_UNREACHABLE_SENT);
}

/* 0.0.0.0, or multicast (224/4) and above (so also the limited broadcast). */
static int special_addr(const uint8_t *a)
{
    return a[0] >= 224 || (a[0] | a[1] | a[2] | a[3]) == 0;
}

/* The ICMP time exceeded (TTL exceeded in transit) for `off` (n bytes), whose TTL ran out
 * here, from our subnet's first address (flannel0's), into pkt; 0 when a router must not
 * answer (time_exceeded in backends/udp/packet.py says when) or our subnet is not set. */
static size_t time_exceeded(Core *c, uint8_t *pkt, const uint8_t *off, size_t n)
{
    uint64_t own = atomic_load_explicit(&c->own, memory_order_relaxed);
    size_t ihl;
    if (!own || !header_ok(off, n, &ihl) || !first_fragment(off))
        return 0;
    if (special_addr(off + 12) || special_addr(off + 16))
        return 0;
    if (off[9] == 1) { /* never about an ICMP error, nor a type unknown to us */
        size_t total = (size_t)off[2] << 8 | off[3];
        if (total <= ihl)
            return 0;
        uint8_t t = off[ihl];
        if (t > 18 || t == 3 || t == 4 || t == 5 || t == 11 || t == 12)
            return 0;
    }
    uint8_t src[4];
    put_be32(src, (uint32_t)own);
    return icmp_error(pkt, off, n, 11, 0, src);
}

/* A TTL ran out on the way from the TUN: answer into the TUN. */
static void ttl_answer_tun(Core *c, const uint8_t *off, size_t n)
{
    uint8_t pkt[ICMP_MAX];
    size_t len = time_exceeded(c, pkt, off, n);
    if (len && icmp_allowed(c, be32(off + 12)))
        write_tun(c, pkt, len, ICMP_TIME_EXCEEDED_SENT);
}

/* The socket and address that reach `peer` (a route value): its length, 0 if none (a v6
 * id without its address, or without the v6 socket). The v6 address is copied under the
 * read lock (the array may grow). */
static socklen_t peer_sockaddr(Core *c, uint32_t peer, union peer_sa *to, int *fd)
{
    memset(to, 0, sizeof *to);
    if (!IS_PEER6(peer)) {
        to->v4.sin_family = AF_INET;
        to->v4.sin_port = htons(c->port);
        to->v4.sin_addr.s_addr = htonl(peer);
        *fd = c->udp;
        return sizeof to->v4;
    }
    if (c->udp6 < 0)
        return 0;
    int known;
    pthread_rwlock_rdlock(&c->lock);
    known = peer < c->npeer6;
    if (known)
        memcpy(&to->v6.sin6_addr, c->peer6[peer], 16);
    pthread_rwlock_unlock(&c->lock);
    if (!known)
        return 0;
    to->v6.sin6_family = AF_INET6;
    to->v6.sin6_port = htons(c->port);
    *fd = c->udp6;
    return sizeof to->v6;
}

/* An ICMP time exceeded to a peer, counted when it went. */
static void send_to_peer(Core *c, const uint8_t *pkt, size_t len, uint32_t peer)
{
    union peer_sa to;
    int fd;
    socklen_t tl = peer_sockaddr(c, peer, &to, &fd);
    if (tl && sendto(fd, pkt, len, MSG_DONTWAIT, (struct sockaddr *)&to, tl) == (ssize_t)len)
        count(c, ICMP_TIME_EXCEEDED_SENT, 1);
}

/* A TTL ran out on the way to the TUN: answer to the peer that routes the sender. Our own
 * address as the source would be a martian in our own TUN, but not at the peer. */
static void ttl_answer_peer(Core *c, const uint8_t *off, size_t n)
{
    uint8_t pkt[ICMP_MAX];
    size_t len = time_exceeded(c, pkt, off, n);
    if (!len)
        return;
    uint32_t peer = route_for(c, be32(off + 12));
    if (peer && icmp_allowed(c, be32(off + 12)))
        send_to_peer(c, pkt, len, peer);
}

/* ---- ICMPv6 errors (backends/udp/packet6.py) --------------------------------------- */

#define ICMP6_MAX 1280 /* RFC 4443 2.4(c): an error fits in the minimum IPv6 MTU */

/* A v4 rate-limit key for a v6 destination: its four 32-bit words xor-ed (packet6.fold). */
static uint32_t fold6(const uint8_t *a)
{
    return be32(a) ^ be32(a + 4) ^ be32(a + 8) ^ be32(a + 12);
}

/* ff00::/8 and fe80::/10: not forwarded (the kernel's own ND/MLD chatter on flannel0). */
static int local_scope6(const uint8_t *dst)
{
    return dst[0] == 0xFF || (dst[0] == 0xFE && (dst[1] & 0xC0) == 0x80);
}

/* May a router answer this offender (n bytes read) with an ICMPv6 error? Not when its
 * header is not whole, it comes from :: or multicast, goes to multicast, or is an ICMPv6
 * error (types 0-127, found after the extension headers) or too short to tell; a
 * non-first fragment neither (its upper layer cannot be seen). RFC 4443 2.4(e). */
static int answerable6(const uint8_t *off, size_t n)
{
    if (n < 40 || off[0] >> 4 != 6)
        return 0;
    size_t end = 40 + ((size_t)off[4] << 8 | off[5]);
    if (end > n)
        return 0;
    int zero = 1;
    for (int i = 8; i < 24; i++)
        zero &= off[i] == 0;
    if (zero || off[8] == 0xFF || off[24] == 0xFF)
        return 0;
    uint8_t nxt = off[6];
    size_t pos = 40;
    while (nxt == 0 || nxt == 43 || nxt == 60 || nxt == 44) {
        if (pos + 8 > end)
            return 0;
        size_t size = 8;
        if (nxt == 44) {
            if (((uint32_t)off[pos + 2] << 8 | off[pos + 3]) & 0xFFF8)
                return 0; /* not the first fragment */
        } else {
            size = ((size_t)off[pos + 1] + 1) * 8;
        }
        nxt = off[pos];
        pos += size;
    }
    if (nxt != 58)
        return 1;
    return pos < end && off[pos] >= 128;
}

/* An ICMPv6 error of `type` (code 0) from `src` (16 bytes) to the offender's source,
 * quoting as much of it as fits in ICMP6_MAX, into pkt (ICMP6_MAX bytes); the checksum
 * over the v6 pseudo header. The offender is answerable6. Returns the length. */
static size_t icmp6_error(uint8_t *pkt, const uint8_t *off, size_t n, uint8_t type,
                          const uint8_t *src)
{
    size_t total = 40 + ((size_t)off[4] << 8 | off[5]);
    if (total > n)
        total = n;
    size_t quote = total < ICMP6_MAX - 48 ? total : ICMP6_MAX - 48, mlen = 8 + quote;
    memset(pkt, 0, 48);
    pkt[0] = 0x60;
    put_be16(pkt + 4, (uint32_t)mlen);
    pkt[6] = 58;
    pkt[7] = 64;
    memcpy(pkt + 8, src, 16);
    memcpy(pkt + 24, off + 8, 16);
    pkt[40] = type;
    memcpy(pkt + 48, off, quote);
    /* Pseudo header: the addresses, the 32-bit upper-layer length, next header 58. */
    uint64_t acc = sum_add(0, pkt + 8, 32) + htons((uint16_t)mlen) + htons(58);
    put_csum(pkt + 42, sum_add(acc, pkt + 40, mlen));
    return 40 + mlen;
}

/* No route for a v6 packet from the TUN: destination unreachable, code 0 (no route),
 * from the unreachable destination itself (as net_unreachable, and why), into the TUN. */
static void no_route6(Core *c, const uint8_t *off, size_t n)
{
    if (!answerable6(off, n))
        return;
    uint8_t pkt[ICMP6_MAX];
    size_t len = icmp6_error(pkt, off, n, 1, off + 24);
    if (icmp_allowed(c, fold6(off + 8)))
        write_tun(c, pkt, len, ICMP_UNREACHABLE_SENT);
}

/* The hop limit ran out: time exceeded (code 0) from flannel0's v6 address into pkt; 0
 * when no answer may go or our v6 subnet is not set. */
static size_t time_exceeded6(Core *c, uint8_t *pkt, const uint8_t *off, size_t n)
{
    uint8_t src[16];
    if (!answerable6(off, n) || !own6_addr(c, src))
        return 0;
    return icmp6_error(pkt, off, n, 3, src);
}

static void hops_answer_tun(Core *c, const uint8_t *off, size_t n)
{
    uint8_t pkt[ICMP6_MAX];
    size_t len = time_exceeded6(c, pkt, off, n);
    if (len && icmp_allowed(c, fold6(off + 8)))
        write_tun(c, pkt, len, ICMP_TIME_EXCEEDED_SENT);
}

static void hops_answer_peer(Core *c, const uint8_t *off, size_t n)
{
    uint8_t pkt[ICMP6_MAX];
    size_t len = time_exceeded6(c, pkt, off, n);
    if (!len)
        return;
    uint32_t peer = route6_for(c, off + 8);
    if (peer && icmp_allowed(c, fold6(off + 8)))
        send_to_peer(c, pkt, len, peer);
}

/* The send side's v6 rules for the packet at p (n bytes read): its peer, the hop limit
 * decremented; 0 when it is dropped (counted, answered as packet6.py says). */
static uint32_t route6_tx(Core *c, uint8_t *p, size_t n)
{
    if (40 + ((size_t)p[4] << 8 | p[5]) > n) {
        count(c, TX_DROP_MALFORMED, 1);
        return 0;
    }
    if (local_scope6(p + 24)) {
        count(c, TX_DROP_LOCAL_SCOPE, 1);
        return 0;
    }
    uint32_t peer = route6_for(c, p + 24);
    if (!peer) {
        count(c, TX_DROP_NO_ROUTE, 1);
        no_route6(c, p, n);
        return 0;
    }
    if (p[7] <= 1) {
        count(c, TX_DROP_TTL, 1);
        hops_answer_tun(c, p, n);
        return 0;
    }
    p[7]--; /* no header checksum in IPv6 */
    return peer;
}

/* ---- the send side ---------------------------------------------------------------- */

/* Sending a batch may stop on a full socket buffer: the batch is then held (c->held) and
 * the loop waits for POLLOUT, the receive side going on meanwhile. */
enum { SENT, HELD };

static int send_some(Core *c);

/* Turn the segments gathered in c->segs into messages: consecutive ones for one peer of
 * one size (the last may be shorter) as one UDP GSO message; then send them. */
static int start_send(Core *c)
{
    int nm = 0, k = c->nsegs;
    int gso = atomic_load_explicit(&c->gso, memory_order_relaxed);
    for (int i = 0; i < k;) {
        size_t seg = c->segs[i].len, total = seg;
        int j = i + 1;
        while (gso && j < k && c->segs[j].peer == c->segs[i].peer &&
               c->segs[j - 1].len == seg && c->segs[j].len <= seg &&
               total + c->segs[j].len <= GSO_BYTES && j - i < GSO_SEGS) {
            total += c->segs[j].len;
            j++;
        }
        struct mmsghdr *m = &c->msgs[nm];
        int fd;
        memset(m, 0, sizeof *m);
        /* A peer it cannot reach (namelen 0) keeps its message: send_some drops it. */
        socklen_t tl = peer_sockaddr(c, c->segs[i].peer, &c->to[nm], &fd);
        m->msg_hdr.msg_name = tl ? &c->to[nm] : NULL;
        m->msg_hdr.msg_namelen = tl;
        m->msg_hdr.msg_iov = &c->iov[2 * i];
        m->msg_hdr.msg_iovlen = (size_t)(2 * (j - i));
        if (j - i > 1) {
            m->msg_hdr.msg_control = c->cmsgs + (size_t)nm * CMSG_SLOT;
            m->msg_hdr.msg_controllen = CMSG_SLOT;
            struct cmsghdr *cmsg = CMSG_FIRSTHDR(&m->msg_hdr);
            cmsg->cmsg_level = SOL_UDP;
            cmsg->cmsg_type = UDP_SEGMENT;
            cmsg->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t s16 = (uint16_t)seg;
            memcpy(CMSG_DATA(cmsg), &s16, sizeof s16);
        }
        c->npkts[nm++] = j - i;
        i = j;
    }
    c->nm = nm;
    c->sent = 0;
    return send_some(c);
}

/* The batch is done with (sent or dropped): its segments and buffers are free. */
static void send_done(Core *c)
{
    c->nsegs = c->nm = c->sent = 0;
    c->held = 0;
}

/* Drop what is left of the batch, counted. */
static void drop_rest(Core *c)
{
    for (int i = c->sent; i < c->nm; i++)
        count(c, TX_DROP_SEND_ERROR, (uint64_t)c->npkts[i]);
    send_done(c);
}

/* Send the batch's messages from c->sent on with sendmmsg. SENT when all went (or were
 * dropped), HELD when the socket buffer is full: the rest waits for POLLOUT. */
static int send_some(Core *c)
{
    while (c->sent < c->nm) {
        /* One sendmmsg per run of messages of one family: each family has its socket. */
        socklen_t nl = c->msgs[c->sent].msg_hdr.msg_namelen;
        if (nl == 0) { /* no address for its peer (start_send): dropped alone */
            count(c, TX_DROP_SEND_ERROR, (uint64_t)c->npkts[c->sent]);
            c->sent++;
            continue;
        }
        int k = 1;
        while (c->sent + k < c->nm && c->msgs[c->sent + k].msg_hdr.msg_namelen == nl)
            k++;
        int fd = nl == sizeof(struct sockaddr_in) ? c->udp : c->udp6;
        int r = sendmmsg(fd, c->msgs + c->sent, (unsigned)k, MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                c->held_fd = fd;
                if (!c->held) {
                    c->held = 1;
                    c->held_until = now_ms() + SEND_HOLD_MS;
                    count(c, TX_SOCKET_FULL, 1);
                }
                return HELD;
            }
            if (errno == ENOBUFS) { /* the device queue is full: drop, as a router would */
                drop_rest(c);
                return SENT;
            }
            if (c->npkts[c->sent] > 1) {
                /* The path cannot segment: one datagram per message from now on. */
                atomic_store_explicit(&c->gso, 0, memory_order_relaxed);
                int left = 0;
                for (int i = c->sent; i < c->nm; i++)
                    left += c->npkts[i];
                /* Resend the rest without GSO, from the first unsent segment. */
                int first = c->nsegs - left;
                memmove(c->segs, c->segs + first, sizeof *c->segs * (size_t)left);
                memmove(c->iov, c->iov + 2 * first, sizeof *c->iov * (size_t)(2 * left));
                c->nsegs = left;
                return start_send(c);
            }
            /* This one message cannot go (its peer is unreachable, a firewall refuses
             * it, ...): drop it alone and go on with the others, as the python datapath
             * does. */
            count(c, TX_DROP_SEND_ERROR, (uint64_t)c->npkts[c->sent]);
            c->sent++;
            continue;
        }
        for (int i = c->sent; i < c->sent + r; i++) {
            uint64_t bytes = 0;
            for (size_t q = 0; q < c->msgs[i].msg_hdr.msg_iovlen; q++)
                bytes += c->msgs[i].msg_hdr.msg_iov[q].iov_len;
            count(c, TX_PACKETS, (uint64_t)c->npkts[i]);
            count(c, TX_BYTES, bytes);
            if (c->npkts[i] > 1)
                count(c, GSO_SENDS, 1);
        }
        c->sent += r;
    }
    send_done(c);
    return SENT;
}

/* A held batch, when poll() says the socket is writable or its time is up. */
static int resume_send(Core *c, int writable)
{
    if (writable && send_some(c) == SENT)
        return SENT;
    if (now_ms() >= c->held_until) {
        drop_rest(c);
        return SENT;
    }
    return HELD;
}

/* Cut one routed packet (p, n bytes as read, with its vnet header) into segments for
 * `peer`, sending the batch first when the segment table has no room for it. HELD when
 * that send is held: the packet is then carried (cut when the batch has gone). */
static int add_packet(Core *c, const struct vnet_hdr *vh, uint8_t *p, size_t n, uint32_t peer)
{
    uint32_t lens[MAX_SEGS];
    int k;
    for (;;) {
        k = tso_split(vh, p, n, c->hdrs + (size_t)c->nsegs * HDR_SLOT,
                      c->iov + 2 * c->nsegs, lens, MAX_SEGS - c->nsegs);
        if (k != -2 || c->nsegs == 0)
            break;
        if (start_send(c) == HELD) { /* room for the rest of this super-packet, later */
            c->carry = 1;
            c->carry_off = (size_t)(p - c->txbuf);
            c->carry_n = n;
            c->carry_peer = peer;
            c->carry_vh = *vh;
            return HELD;
        }
    }
    if (k < 0) {
        count(c, TX_DROP_MALFORMED, 1);
        return SENT;
    }
    if (vh->gso_type != VNET_GSO_NONE)
        count(c, TSO_READS, 1);
    for (int q = 0; q < k; q++)
        c->segs[c->nsegs + q] = (struct seg){peer, lens[q]};
    c->nsegs += k;
    return SENT;
}

/* Read the TUN: packets (or super-packets) into the arena, routed, cut into wire
 * packets, sent a batch at a time (BATCH reads, or a full arena). At most `budget` batches
 * (< 0: no limit). Returns 1 when the TUN had nothing more to read (EAGAIN), 0 when the
 * budget ran out or a batch is held (c->held: nothing more is read until it has gone). */
static int from_tun(Core *c, int budget)
{
    struct vnet_hdr vh;
    if (c->held)
        return 0;
    for (;;) {
        int eagain = 0;
        if (c->carry) { /* the packet whose batch was held: cut it now */
            c->carry = 0;
            if (add_packet(c, &c->carry_vh, c->txbuf + c->carry_off, c->carry_n,
                           c->carry_peer) == HELD)
                return 0;
        }
        while (c->reads < BATCH && c->off + READ_MAX <= TX_ARENA) {
            uint8_t *p = c->txbuf + c->off;
            struct iovec rv[2] = {{&vh, VNET_HDR_LEN}, {p, READ_MAX}};
            ssize_t r = c->vnet ? readv(c->tun, rv, 2) : read(c->tun, p, READ_MAX);
            if (r < 0) { /* EAGAIN; an error shows as POLLERR in the loop */
                eagain = 1;
                break;
            }
            c->reads++;
            size_t n;
            if (c->vnet) {
                if (r < VNET_HDR_LEN) {
                    count(c, TX_DROP_MALFORMED, 1);
                    continue;
                }
                n = (size_t)r - VNET_HDR_LEN;
            } else {
                memset(&vh, 0, sizeof vh);
                n = (size_t)r;
            }
            uint32_t peer;
            if (n >= 20 && p[0] >> 4 == 4) {
                peer = route_for(c, be32(p + 16));
                if (!peer) {
                    count(c, TX_DROP_NO_ROUTE, 1);
                    net_unreachable(c, p, n);
                    continue;
                }
                if (!decrement_ttl(p)) {
                    count(c, TX_DROP_TTL, 1);
                    ttl_answer_tun(c, p, n);
                    continue;
                }
            } else if (n >= 40 && p[0] >> 4 == 6) {
                if (!(peer = route6_tx(c, p, n)))
                    continue;
            } else {
                count(c, TX_DROP_MALFORMED, 1);
                continue;
            }
            c->off += (n + 15) & ~(size_t)15;
            if (add_packet(c, &vh, p, n, peer) == HELD)
                return 0;
        }
        c->off = 0;
        c->reads = 0;
        if (c->nsegs && start_send(c) == HELD)
            return 0;
        if (eagain)
            return 1;
        if (budget > 0 && --budget == 0)
            return 0;
    }
}

/* ---- the receive side ------------------------------------------------------------- */

static void queue_pending(Core *c, uint8_t *p, size_t total)
{
    if (c->npend == PEND_MAX)
        flush_pending(c);
    c->pend[c->npend++] = (struct pend){p, (uint32_t)total};
}

/* deliver() for an IPv6 packet (at least a header's worth, not oversized, from a peer
 * when sources are checked): the same checks, the hop limit for the TTL. */
static void deliver6(Core *c, uint8_t *p, size_t n, uint32_t peer)
{
    size_t total = 40 + ((size_t)p[4] << 8 | p[5]);
    if (total > n) {
        count(c, RX_DROP_MALFORMED, 1);
        return;
    }
    int verdict = rx6_verdict(c, peer, p);
    if (verdict) {
        count(c, verdict, 1);
        return;
    }
    if (p[7] <= 1) {
        count(c, RX_DROP_TTL, 1);
        hops_answer_peer(c, p, total);
        return;
    }
    p[7]--;
    queue_pending(c, p, total);
}

/* Check one received inner packet at p (n bytes) from `peer` and patch its TTL; queue it
 * for the TUN (which may write the queue out: no lock is held here). */
static void deliver(Core *c, uint8_t *p, size_t n, uint32_t peer, int truncated)
{
    int known = c->check_source ? source_check(c, peer, n >= 16 ? be32(p + 12) : 0) : 2;
    if (c->check_source && known == 0) {
        count(c, RX_DROP_UNKNOWN_SOURCE, 1);
        return;
    }
    if (truncated || n > (size_t)c->mtu) {
        count(c, RX_DROP_OVERSIZED, 1);
        return;
    }
    if (n < 20 || p[0] >> 4 != 4) {
        if (n >= 40 && p[0] >> 4 == 6)
            deliver6(c, p, n, peer);
        else
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
    uint64_t own = atomic_load_explicit(&c->own, memory_order_relaxed);
    if (!own || (be32(p + 16) & (uint32_t)(own >> 32)) != (uint32_t)own) {
        count(c, RX_DROP_DST_OUTSIDE, 1);
        return;
    }
    if (!decrement_ttl(p)) {
        count(c, RX_DROP_TTL, 1);
        ttl_answer_peer(c, p, total);
        return;
    }
    queue_pending(c, p, total);
}

/* Drain the socket with recvmmsg, at most `budget` batches (< 0: no limit); 1 when it had
 * nothing more. With UDP GRO the kernel may hand over several datagrams of one sender in
 * one buffer, with their size in a cmsg: split it again. */
static uint32_t sender_of(Core *c, const union peer_sa *from)
{
    if (from->v4.sin_family == AF_INET)
        return ntohl(from->v4.sin_addr.s_addr);
    const uint8_t *a = from->v6.sin6_addr.s6_addr;
    pthread_rwlock_rdlock(&c->lock);
    const struct slot6 *s = table6_find(&c->peer6_ids, be64(a), be64(a + 8));
    uint32_t id = s ? s->val : 0; /* 0: no peer, an unknown source */
    pthread_rwlock_unlock(&c->lock);
    return id;
}

static int from_udp(Core *c, int fd, int budget)
{
    struct mmsghdr m[RX_BATCH];
    struct iovec v[RX_BATCH];
    union peer_sa from[RX_BATCH];
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
        int r = recvmmsg(fd, m, RX_BATCH, MSG_DONTWAIT, NULL);
        if (r <= 0) {
            if (r < 0 && errno == EINTR)
                continue;
            return 1;
        }
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
            uint32_t peer = sender_of(c, &from[i]);
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
        flush_pending(c);
        if (r < RX_BATCH)
            return 1;
        if (budget > 0 && --budget == 0)
            return 0;
    }
}

/* One thread for both directions: a ping's reply usually reaches the TUN while the thread
 * is still writing the request into it, and is read without sleeping. Measured on two
 * vCPUs, a thread per direction cost one more wake-up per round trip (RTT 0.27-0.30 ms
 * against 0.19-0.25 ms) and gave no more throughput. Each side gets a few batches per
 * wake-up, so a flood one way cannot starve the other; a held send batch takes the TUN
 * out of the poll set (nothing more is read from it) and asks for POLLOUT instead.
 *
 * One turn of the loop: poll the TUN, the socket (for POLLOUT too while a batch is held)
 * and the stop eventfd for at most `wait` ms (< 0: until something happens, or the held
 * batch's time is up), then handle what poll() reported. 0: go on; 1: stop was asked;
 * 2: the TUN is gone. */
static int loop_once(Core *c, int wait)
{
    int held = c->held;
    int out4 = held && c->held_fd == c->udp, out6 = held && !out4;
    struct pollfd fds[4] = {
        {held ? -1 : c->tun, POLLIN, 0},
        {c->udp, (short)(POLLIN | (out4 ? POLLOUT : 0)), 0},
        {c->efd, POLLIN, 0},
        {c->udp6, (short)(POLLIN | (out6 ? POLLOUT : 0)), 0}, /* -1: ignored by poll */
    };
    if (held) {
        int64_t left = c->held_until - now_ms();
        int until = left > 0 ? (int)left : 0;
        if (wait < 0 || wait > until)
            wait = until;
    }
    if (poll(fds, 4, wait) < 0)
        return errno == EINTR ? 0 : 1;
    if (fds[2].revents)
        return 1;
    /* A TUN whose interface was deleted reports POLLERR (and reads EBADFD). */
    if (fds[0].revents & (POLLERR | POLLHUP | POLLNVAL))
        return 2;
    if (held) {
        int done = resume_send(c, ((fds[1].revents | fds[3].revents) & POLLOUT) != 0) == SENT;
        if (done && c->carry)
            from_tun(c, TUN_BUDGET); /* the carried packet goes before more reads */
    }
    if (fds[0].revents & POLLIN)
        from_tun(c, TUN_BUDGET);
    /* POLLERR on the socket too: recvmmsg reports (and clears) the error. */
    if (fds[1].revents & (POLLIN | POLLERR))
        from_udp(c, c->udp, UDP_BUDGET);
    if (fds[3].revents & (POLLIN | POLLERR))
        from_udp(c, c->udp6, UDP_BUDGET);
    return 0;
}

static void *loop(void *arg)
{
    Core *c = arg;
    int r;
    while ((r = loop_once(c, -1)) == 0)
        ;
    if (r == 2) { /* tell Python, which makes a new TUN, and end */
        atomic_store_explicit(&c->tun_lost, 1, memory_order_relaxed);
        uint64_t one = 1;
        (void)!write(c->done, &one, sizeof one);
    }
    return NULL;
}

/* ---- Python side ---------------------------------------------------------------- */

/* Free what Core_init made, leaving the Core as tp_new made it (zeroed). */
static void core_free(Core *c)
{
    if (c->efd_open)
        close(c->efd);
    c->efd_open = 0;
    if (c->done_open)
        close(c->done);
    c->done_open = 0;
    if (c->lock_ready)
        pthread_rwlock_destroy(&c->lock);
    c->lock_ready = 0;
    PyMem_RawFree(c->txbuf);
    PyMem_RawFree(c->hdrs);
    PyMem_RawFree(c->segs);
    PyMem_RawFree(c->iov);
    PyMem_RawFree(c->msgs);
    PyMem_RawFree(c->to);
    PyMem_RawFree(c->npkts);
    PyMem_RawFree(c->cmsgs);
    PyMem_RawFree(c->pend);
    PyMem_RawFree(c->rxbuf);
    c->txbuf = c->hdrs = c->cmsgs = c->rxbuf = NULL;
    c->segs = NULL;
    c->iov = NULL;
    c->msgs = NULL;
    c->to = NULL;
    c->npkts = NULL;
    c->pend = NULL;
    routes_free(&c->routes);
    routes6_free(&c->routes6);
    PyMem_RawFree(c->peer6);
    c->peer6 = NULL;
    c->npeer6 = 0;
    PyMem_RawFree(c->peer6_ids.slots);
    c->peer6_ids = (struct table6){0};
    c->ready = 0;
}

/* Non-blocking, as the loop drains each fd until EAGAIN; -1 with OSError set. */
static int set_nonblocking(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* Take `fd` as the TUN (no packet thread runs): non-blocking, TSO probed. */
static int attach_tun(Core *c, int fd)
{
    if (set_nonblocking(fd) < 0)
        return -1;
    c->tun = fd;
    /* TSO needs the vnet header; a TUN (or stand-in) that refuses the ioctl gets none.
     * TSO6 too (tso_split6); a kernel that refuses it still gets TSO4. */
    unsigned int off = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN;
    c->tso = c->vnet && c->tso_wanted &&
             (ioctl(fd, TUNSETOFFLOAD, off | TUN_F_TSO6) == 0 ||
              ioctl(fd, TUNSETOFFLOAD, off) == 0);
    return 0;
}

static int Core_init(Core *c, PyObject *args, PyObject *kw)
{
    static char *names[] = {"tun_fd", "sock_fd", "port", "mtu", "check_source", "vnet_hdr",
                            "gso", "gro", "tso", "coalesce", "icmp_ratelimit_ms", "sock6_fd",
                            NULL};
    int tun, udp, port, mtu, check = 1, vnet = 0, gso = 1, gro = 1, tso = 1, coalesce = 1;
    int icmp_interval = 1000, udp6 = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiii|ppppppii", names, &tun, &udp, &port,
                                     &mtu, &check, &vnet, &gso, &gro, &tso, &coalesce,
                                     &icmp_interval, &udp6))
        return -1;
    /* Once: a second call would change what a running packet thread reads. */
    if (c->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Core is already initialised");
        return -1;
    }
    if (mtu < 68 || mtu > 65535 || port < 1 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "bad mtu or port");
        return -1;
    }
    if (icmp_interval < 0 || icmp_interval > 3600000) {
        PyErr_SetString(PyExc_ValueError, "bad icmp_ratelimit_ms");
        return -1;
    }
    c->udp = udp;
    c->udp6 = udp6 < 0 ? -1 : udp6;
    c->held_fd = udp;
    c->icmp_interval = icmp_interval;
    c->mtu = mtu;
    int one = 1, zero = 0;
    c->gro = gro && setsockopt(c->udp, SOL_UDP, UDP_GRO, &one, sizeof one) == 0;
    /* The v6 socket too; the receive slots are sized for GRO whichever socket has it. */
    if (c->udp6 >= 0 && gro)
        c->gro |= setsockopt(c->udp6, SOL_UDP, UDP_GRO, &one, sizeof one) == 0;
    /* Probe UDP GSO once: a kernel without it refuses the option. One flag for both
     * sockets: on only when both take it. */
    atomic_store_explicit(&c->gso,
                          gso && setsockopt(c->udp, SOL_UDP, UDP_SEGMENT, &zero, sizeof zero) == 0 &&
                          (c->udp6 < 0 ||
                           setsockopt(c->udp6, SOL_UDP, UDP_SEGMENT, &zero, sizeof zero) == 0),
                          memory_order_relaxed);
    c->vnet = vnet;
    c->tso_wanted = tso;
    if (attach_tun(c, tun) < 0 || set_nonblocking(c->udp) < 0 ||
        (c->udp6 >= 0 && set_nonblocking(c->udp6) < 0))
        return -1;
    c->coalesce = vnet && coalesce;
    c->port = (uint16_t)port;
    c->check_source = check;
    c->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (c->efd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    c->efd_open = 1;
    c->done = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (c->done < 0) {
        core_free(c);
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    c->done_open = 1;
    int err = pthread_rwlock_init(&c->lock, NULL);
    if (err) {
        core_free(c);
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    c->lock_ready = 1;
    c->txbuf = PyMem_RawMalloc(TX_ARENA);
    c->hdrs = PyMem_RawMalloc((size_t)MAX_SEGS * HDR_SLOT);
    c->segs = PyMem_RawMalloc(sizeof *c->segs * MAX_SEGS);
    c->iov = PyMem_RawMalloc(sizeof *c->iov * 2 * MAX_SEGS);
    c->msgs = PyMem_RawMalloc(sizeof *c->msgs * MAX_SEGS);
    c->to = PyMem_RawMalloc(sizeof *c->to * MAX_SEGS);
    c->npkts = PyMem_RawMalloc(sizeof *c->npkts * MAX_SEGS);
    c->cmsgs = PyMem_RawCalloc(MAX_SEGS, CMSG_SLOT);
    c->pend = PyMem_RawMalloc(sizeof *c->pend * PEND_MAX);
    /* Without GRO a slot a little over the MTU shows oversized datagrams by MSG_TRUNC. */
    c->rxslot = c->gro ? RX_SLOT : (size_t)c->mtu + 64;
    c->rxbuf = PyMem_RawMalloc(c->rxslot * RX_BATCH);
    if (!c->txbuf || !c->hdrs || !c->segs || !c->iov || !c->msgs || !c->to || !c->npkts ||
        !c->cmsgs || !c->pend || !c->rxbuf) {
        core_free(c);
        PyErr_NoMemory();
        return -1;
    }
    c->ready = 1;
    return 0;
}

static void Core_dealloc(Core *c)
{
    if (c->running) {
        uint64_t one = 1;
        (void)!write(c->efd, &one, sizeof one);
        pthread_join(c->thread, NULL); /* it never takes the GIL: no deadlock */
    }
    core_free(c);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

/* RuntimeError unless Core_init succeeded (the lock and buffers exist). */
static int need_ready(Core *c)
{
    if (c->ready)
        return 0;
    PyErr_SetString(PyExc_RuntimeError, "Core is not initialised");
    return -1;
}

/* The prefix length of a contiguous netmask, or -1 (ValueError set). */
static int prefix_len(uint32_t mask)
{
    int plen = 0;
    while (plen < 32 && (mask & (0x80000000u >> plen)))
        plen++;
    if (mask != prefix_mask(plen)) {
        PyErr_SetString(PyExc_ValueError, "not a netmask");
        return -1;
    }
    return plen;
}

/* The route changes take the write lock with the GIL released: the packet thread may be
 * holding the read lock for a lookup, and other Python threads should not wait for it.
 * (The table code calls only PyMem_Raw*, which need no GIL.) */
static PyObject *Core_set_route(Core *c, PyObject *args)
{
    unsigned int net, mask, peer;
    if (!PyArg_ParseTuple(args, "III", &net, &mask, &peer) || need_ready(c) < 0)
        return NULL;
    int plen = prefix_len(mask), err;
    if (plen < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&c->lock);
    err = routes_set(&c->routes, net, plen, peer);
    pthread_rwlock_unlock(&c->lock);
    Py_END_ALLOW_THREADS
    if (err)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *Core_del_route(Core *c, PyObject *args)
{
    unsigned int net, mask;
    if (!PyArg_ParseTuple(args, "II", &net, &mask) || need_ready(c) < 0)
        return NULL;
    int plen = prefix_len(mask);
    if (plen < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&c->lock);
    routes_del(&c->routes, net, plen);
    pthread_rwlock_unlock(&c->lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* The v6 twins take the address as two 64-bit halves and the prefix length. */
static int parse6(PyObject *args, const char *fmt, unsigned long long *hi,
                  unsigned long long *lo, int *plen, unsigned int *peer)
{
    int ok = peer ? PyArg_ParseTuple(args, fmt, hi, lo, plen, peer)
                  : PyArg_ParseTuple(args, fmt, hi, lo, plen);
    if (!ok)
        return -1;
    if (*plen < 0 || *plen > 128) {
        PyErr_SetString(PyExc_ValueError, "prefix length: 0..128");
        return -1;
    }
    return 0;
}

static PyObject *Core_set_route6(Core *c, PyObject *args)
{
    unsigned long long hi, lo;
    unsigned int peer;
    int plen, err;
    if (parse6(args, "KKiI", &hi, &lo, &plen, &peer) < 0 || need_ready(c) < 0)
        return NULL;
    if (!peer) {
        PyErr_SetString(PyExc_ValueError, "peer 0.0.0.0");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&c->lock);
    err = routes6_set(&c->routes, &c->routes6, hi, lo, plen, peer);
    pthread_rwlock_unlock(&c->lock);
    Py_END_ALLOW_THREADS
    if (err)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *Core_del_route6(Core *c, PyObject *args)
{
    unsigned long long hi, lo;
    int plen;
    if (parse6(args, "KKi", &hi, &lo, &plen, NULL) < 0 || need_ready(c) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&c->lock);
    routes6_del(&c->routes, &c->routes6, hi, lo, plen);
    pthread_rwlock_unlock(&c->lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* set_peer6(id, address): the v6 underlay address of peer id (1 .. 2^24 - 1), which
 * set_route/set_route6 then take as a peer. Ids are the wrapper's (c_datapath.py); an id
 * is never given another address. */
static PyObject *Core_set_peer6(Core *c, PyObject *args)
{
    unsigned int id;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "Iy*", &id, &b))
        return NULL;
    int bad = b.len != 16 || id == 0 || id >= PEER6_MAX;
    uint8_t a[16];
    if (!bad)
        memcpy(a, b.buf, 16);
    PyBuffer_Release(&b);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "set_peer6(id 1..2^24-1, 16 bytes)");
        return NULL;
    }
    if (need_ready(c) < 0)
        return NULL;
    if (c->udp6 < 0) {
        PyErr_SetString(PyExc_ValueError, "no IPv6 socket");
        return NULL;
    }
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&c->lock);
    if (id >= c->npeer6) {
        uint32_t room = c->npeer6 ? c->npeer6 : 16;
        while (room <= id)
            room *= 2;
        void *grown = PyMem_RawRealloc(c->peer6, (size_t)room * 16);
        if (grown) {
            memset((uint8_t *)grown + (size_t)c->npeer6 * 16, 0, (size_t)(room - c->npeer6) * 16);
            c->peer6 = grown;
            c->npeer6 = room;
        } else {
            err = 1;
        }
    }
    if (!err && table6_reserve(&c->peer6_ids) < 0)
        err = 1;
    if (!err) {
        memcpy(c->peer6[id], a, 16);
        table6_put(&c->peer6_ids, be64(a), be64(a + 8), id);
    }
    pthread_rwlock_unlock(&c->lock);
    Py_END_ALLOW_THREADS
    if (err)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* Our v6 subnet: under the write lock, as the packet thread reads it under the read one. */
static PyObject *Core_set_subnet6(Core *c, PyObject *args)
{
    unsigned long long hi, lo;
    int plen;
    if (parse6(args, "KKi", &hi, &lo, &plen, NULL) < 0 || need_ready(c) < 0)
        return NULL;
    if (plen == 0) {
        PyErr_SetString(PyExc_ValueError, "our subnet cannot be ::/0");
        return NULL;
    }
    uint64_t mh, ml;
    mask6(plen, &mh, &ml);
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&c->lock);
    c->routes6.own_hi = hi & mh;
    c->routes6.own_lo = lo & ml;
    c->routes6.own_plen = plen;
    pthread_rwlock_unlock(&c->lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* Our subnet, as (network, mask): received packets are delivered only for it. */
static PyObject *Core_set_subnet(Core *c, PyObject *args)
{
    unsigned int net, mask;
    if (!PyArg_ParseTuple(args, "II", &net, &mask) || need_ready(c) < 0)
        return NULL;
    int plen = prefix_len(mask);
    if (plen < 0)
        return NULL;
    if (plen == 0) {
        PyErr_SetString(PyExc_ValueError, "our subnet cannot be 0.0.0.0/0");
        return NULL;
    }
    atomic_store_explicit(&c->own, (uint64_t)mask << 32 | (net & mask), memory_order_relaxed);
    Py_RETURN_NONE;
}

/* A new TUN fd (flannel0 made again), only while no packet thread runs: the thread reads
 * c->tun without a lock. */
static PyObject *Core_set_tun(Core *c, PyObject *args)
{
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd) || need_ready(c) < 0)
        return NULL;
    if (c->running) {
        PyErr_SetString(PyExc_RuntimeError, "the packet thread is running");
        return NULL;
    }
    if (attach_tun(c, fd) < 0)
        return NULL;
    atomic_store_explicit(&c->tun_lost, 0, memory_order_relaxed);
    Py_RETURN_NONE;
}

/* True once the packet thread ended because the TUN reported an error or hang-up. */
static PyObject *Core_tun_lost(Core *c, PyObject *unused)
{
    (void)unused;
    return PyBool_FromLong(atomic_load_explicit(&c->tun_lost, memory_order_relaxed));
}

/* The eventfd the packet thread writes when it ends on its own (the TUN is gone). */
static PyObject *Core_done_fd(Core *c, PyObject *unused)
{
    (void)unused;
    if (need_ready(c) < 0)
        return NULL;
    return PyLong_FromLong(c->done);
}

static PyObject *Core_start(Core *c, PyObject *unused)
{
    (void)unused;
    if (need_ready(c) < 0)
        return NULL;
    if (c->running)
        Py_RETURN_NONE;
    /* A batch held when the thread last stopped is not sent now, nor a carried packet:
     * their TUN may be another. */
    if (c->held || c->nsegs)
        drop_rest(c);
    c->carry = 0;
    c->off = 0;
    c->reads = 0;
    uint64_t drain;
    (void)!read(c->done, &drain, sizeof drain);
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

/* Which offloads are in use right now (GSO may have been turned off by an error). */
static PyObject *Core_offloads(Core *c, PyObject *unused)
{
    (void)unused;
    int gso = atomic_load_explicit(&c->gso, memory_order_relaxed);
    return Py_BuildValue("{s:O,s:O,s:O,s:O}", "udp_gso", gso ? Py_True : Py_False,
                         "udp_gro", c->gro ? Py_True : Py_False, "tun_tso",
                         c->tso ? Py_True : Py_False, "tun_coalesce",
                         c->coalesce ? Py_True : Py_False);
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

/* Test hooks: what the packet thread does when poll() says the TUN (drain_tun) or the
 * socket (drain_udp) is readable, run in the calling thread until that fd has nothing
 * more (no budget; a held send batch is waited for here, up to its SEND_HOLD_MS), so that
 * the datapath suite can drive the C datapath step by step as it drives the python one.
 * They hold the GIL (no other Python thread can run one at the same time) and refuse to
 * run while the packet thread does, as its buffers are then its own. */
static PyObject *drain(Core *c, void (*step)(Core *))
{
    if (need_ready(c) < 0)
        return NULL;
    if (c->running) {
        PyErr_SetString(PyExc_RuntimeError, "the packet thread is running");
        return NULL;
    }
    step(c);
    Py_RETURN_NONE;
}

/* The TUN side until EAGAIN; a held batch is waited for here, as poll() would. */
static void drain_tun_all(Core *c)
{
    while (!from_tun(c, -1)) {
        int64_t left = c->held_until - now_ms();
        struct pollfd pf = {c->held_fd, POLLOUT, 0};
        int r = poll(&pf, 1, left > 0 ? (int)left : 0);
        resume_send(c, r > 0 && (pf.revents & POLLOUT));
    }
}

static void drain_udp_all(Core *c)
{
    from_udp(c, c->udp, -1);
}

static PyObject *Core_drain_tun(Core *c, PyObject *unused)
{
    (void)unused;
    return drain(c, drain_tun_all);
}

static PyObject *Core_drain_udp(Core *c, PyObject *unused)
{
    (void)unused;
    return drain(c, drain_udp_all);
}

static void drain_udp6_all(Core *c)
{
    if (c->udp6 >= 0)
        from_udp(c, c->udp6, -1);
}

static PyObject *Core_drain_udp6(Core *c, PyObject *unused)
{
    (void)unused;
    return drain(c, drain_udp6_all);
}

/* Test hook: one turn of the packet loop in this thread, waiting at most wait_ms (0: not
 * at all), as the thread would; returns what the turn said (0 go on, 1 stop, 2 TUN gone). */
static PyObject *Core_step(Core *c, PyObject *args)
{
    int wait;
    if (!PyArg_ParseTuple(args, "i", &wait) || need_ready(c) < 0)
        return NULL;
    if (c->running) {
        PyErr_SetString(PyExc_RuntimeError, "the packet thread is running");
        return NULL;
    }
    if (wait < 0 || wait > 10000) {
        PyErr_SetString(PyExc_ValueError, "wait_ms: 0..10000");
        return NULL;
    }
    /* With the GIL held, like the drain hooks: no other hook (nor start) runs meanwhile. */
    return PyLong_FromLong(loop_once(c, wait));
}

/* Test hook: is a send batch held (the socket buffer was full)? */
static PyObject *Core_held(Core *c, PyObject *unused)
{
    (void)unused;
    return PyBool_FromLong(c->held);
}

static PyMethodDef Core_methods[] = {
    {"step", (PyCFunction)Core_step, METH_VARARGS,
     "step(wait_ms): one turn of the packet loop, in this thread (test hook)"},
    {"held", (PyCFunction)Core_held, METH_NOARGS,
     "whether a send batch waits for room in the socket buffer (test hook)"},
    {"drain_tun", (PyCFunction)Core_drain_tun, METH_NOARGS,
     "read the TUN until EAGAIN and send, in this thread (test hook)"},
    {"drain_udp", (PyCFunction)Core_drain_udp, METH_NOARGS,
     "read the socket until EAGAIN and write the TUN, in this thread (test hook)"},
    {"set_route", (PyCFunction)Core_set_route, METH_VARARGS, "set_route(net, mask, peer)"},
    {"del_route", (PyCFunction)Core_del_route, METH_VARARGS, "del_route(net, mask)"},
    {"start", (PyCFunction)Core_start, METH_NOARGS, "start the packet thread"},
    {"stop", (PyCFunction)Core_stop, METH_NOARGS, "stop and join the packet thread"},
    {"counters", (PyCFunction)Core_counters, METH_NOARGS, "counters as a tuple"},
    {"offloads", (PyCFunction)Core_offloads, METH_NOARGS, "offloads in use, as a dict"},
    {"set_subnet", (PyCFunction)Core_set_subnet, METH_VARARGS, "set_subnet(net, mask)"},
    {"drain_udp6", (PyCFunction)Core_drain_udp6, METH_NOARGS,
     "read the v6 socket until EAGAIN and write the TUN, in this thread (test hook)"},
    {"set_peer6", (PyCFunction)Core_set_peer6, METH_VARARGS,
     "set_peer6(id, address16): the v6 underlay address of peer id"},
    {"set_route6", (PyCFunction)Core_set_route6, METH_VARARGS,
     "set_route6(hi, lo, prefixlen, peer): a v6 subnet behind a v4 peer"},
    {"del_route6", (PyCFunction)Core_del_route6, METH_VARARGS, "del_route6(hi, lo, prefixlen)"},
    {"set_subnet6", (PyCFunction)Core_set_subnet6, METH_VARARGS,
     "set_subnet6(hi, lo, prefixlen): our v6 subnet"},
    {"set_tun", (PyCFunction)Core_set_tun, METH_VARARGS,
     "set_tun(fd): a new TUN fd, while the thread does not run"},
    {"tun_lost", (PyCFunction)Core_tun_lost, METH_NOARGS,
     "whether the thread ended on a TUN error or hang-up"},
    {"done_fd", (PyCFunction)Core_done_fd, METH_NOARGS,
     "the eventfd written when the thread ends on its own"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "backends.udp._fastpath.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The C packet loop: one thread between a TUN fd and a UDP socket.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
};

/* ---- test hooks: the pure functions above, on bytes ------------------------------ */

/* segment(vnet_hdr: bytes, packet: bytes) -> list[bytes]: the wire packets the send
 * side makes of one TUN read (no routing, no TTL change). ValueError if malformed. */
static PyObject *py_segment(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer hb, pb;
    if (!PyArg_ParseTuple(args, "y*y*", &hb, &pb))
        return NULL;
    PyObject *out = NULL;
    uint8_t *p = NULL, *hdrs = NULL;
    struct iovec *iov = NULL;
    uint32_t *lens = NULL;
    struct vnet_hdr vh;
    if (hb.len != VNET_HDR_LEN || pb.len > READ_MAX) {
        PyErr_SetString(PyExc_ValueError, "vnet header must be 10 bytes, packet <= 64 KiB");
        goto done;
    }
    memcpy(&vh, hb.buf, VNET_HDR_LEN);
    p = PyMem_RawMalloc((size_t)pb.len + 1);
    hdrs = PyMem_RawMalloc((size_t)MAX_SEGS * HDR_SLOT);
    iov = PyMem_RawMalloc(sizeof *iov * 2 * MAX_SEGS);
    lens = PyMem_RawMalloc(sizeof *lens * MAX_SEGS);
    if (!p || !hdrs || !iov || !lens) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(p, pb.buf, (size_t)pb.len);
    int k = tso_split(&vh, p, (size_t)pb.len, hdrs, iov, lens, MAX_SEGS);
    if (k < 0) {
        PyErr_SetString(PyExc_ValueError, k == -1 ? "malformed" : "too many segments");
        goto done;
    }
    out = PyList_New(k);
    for (int i = 0; out && i < k; i++) {
        PyObject *b = PyBytes_FromStringAndSize(NULL, lens[i]);
        if (!b) {
            Py_CLEAR(out);
            break;
        }
        char *d = PyBytes_AS_STRING(b);
        memcpy(d, iov[2 * i].iov_base, iov[2 * i].iov_len);
        if (iov[2 * i + 1].iov_len)
            memcpy(d + iov[2 * i].iov_len, iov[2 * i + 1].iov_base, iov[2 * i + 1].iov_len);
        PyList_SET_ITEM(out, i, b);
    }
done:
    PyMem_RawFree(p);
    PyMem_RawFree(hdrs);
    PyMem_RawFree(iov);
    PyMem_RawFree(lens);
    PyBuffer_Release(&hb);
    PyBuffer_Release(&pb);
    return out;
}

/* coalesce(packets: list[bytes]) -> list[tuple[bytes, bytes]]: the TUN writes the
 * receive side makes of these packets, each as (vnet header, packet). */
static PyObject *py_coalesce(PyObject *self, PyObject *arg)
{
    (void)self;
    PyObject *seq = PySequence_Fast(arg, "coalesce takes a list of bytes");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = NULL;
    struct pend *pk = PyMem_RawCalloc((size_t)n + 1, sizeof *pk);
    if (!pk) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyBytes_Check(o) || PyBytes_GET_SIZE(o) < 20 || PyBytes_GET_SIZE(o) > 65535) {
            PyErr_SetString(PyExc_ValueError, "each packet: bytes of 20..65535");
            goto done;
        }
        pk[i] = (struct pend){(uint8_t *)PyBytes_AS_STRING(o), (uint32_t)PyBytes_GET_SIZE(o)};
    }
    out = PyList_New(0);
    for (int i = 0; out && i < (int)n;) {
        int k = merge_run(pk, i, (int)n);
        PyObject *item;
        if (k == 1) {
            item = Py_BuildValue("(y#y#)", zero_vnet, (Py_ssize_t)VNET_HDR_LEN, pk[i].p,
                                 (Py_ssize_t)pk[i].len);
        } else {
            struct vnet_hdr vh;
            uint8_t hdr[HDR_SLOT];
            size_t hl = merge_headers(pk, i, k, &vh, hdr), total = hl;
            for (int q = i; q < i + k; q++)
                total += pk[q].len - hl;
            PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
            if (!b) {
                Py_CLEAR(out);
                break;
            }
            char *d = PyBytes_AS_STRING(b);
            memcpy(d, hdr, hl);
            size_t at = hl;
            for (int q = i; q < i + k; q++) {
                memcpy(d + at, pk[q].p + hl, pk[q].len - hl);
                at += pk[q].len - hl;
            }
            item = Py_BuildValue("(y#N)", (const char *)&vh, (Py_ssize_t)VNET_HDR_LEN, b);
        }
        if (!item || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(item);
        i += k;
    }
done:
    PyMem_RawFree(pk);
    Py_DECREF(seq);
    return out;
}

static PyMethodDef module_methods[] = {
    {"segment", py_segment, METH_VARARGS, "segment(vnet_hdr, packet) -> list of packets"},
    {"coalesce", py_coalesce, METH_O, "coalesce(packets) -> list of (vnet_hdr, packet)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath", "The udp backend's C datapath core.", -1,
    module_methods, NULL, NULL, NULL, NULL,
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
    /* The batch sizes and caps that backends/udp/datapath.py names for both datapaths
     * (a test checks that they agree). */
    if (PyModule_AddIntConstant(m, "BATCH", BATCH) < 0 ||
        PyModule_AddIntConstant(m, "RX_BATCH", RX_BATCH) < 0 ||
        PyModule_AddIntConstant(m, "GSO_SEGS", GSO_SEGS) < 0 ||
        PyModule_AddIntConstant(m, "GSO_BYTES", GSO_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "MERGE_MAX", MERGE_MAX) < 0 ||
        PyModule_AddIntConstant(m, "MERGE_BYTES", MERGE_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
