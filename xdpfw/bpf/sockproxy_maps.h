/* sockproxy_maps.h - every map of the sockproxy programs, in one place (sockproxy.c, and the
 * deliberately broken copy in tests/data/, which the loader must find the same maps in). */
#ifndef SOCKPROXY_MAPS_H
#define SOCKPROXY_MAPS_H

#include "sockproxy_abi.h"

/* Every spliced socket, keyed by socket cookie: where verdicts redirect to. */
BPF_SOCKHASH(sp_socks, __u64, SP_MAX_SOCKETS);
/* Sockets whose inbound bytes are spliced, keyed by socket cookie: parser+verdict attached. */
BPF_SOCKHASH(sp_splice, __u64, SP_MAX_SOCKETS);
/* Socket cookie -> the socket its bytes go to, with service and direction for counting. */
BPF_HASH(sp_peers, __u64, struct sp_peer, SP_MAX_SOCKETS);
/* Per-service byte and skb counters, written by sp_verdict only. */
BPF_PERCPU_HASH(sp_traffic, __u32, struct sp_traffic, SP_MAX_SERVICES);
/* Per-service connection counters, written by user space only (declared with the
 * others so that every map has one definition). */
BPF_HASH(sp_conns, __u32, struct sp_conns, SP_MAX_SERVICES);

#endif /* SOCKPROXY_MAPS_H */
