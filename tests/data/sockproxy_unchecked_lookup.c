/* A deliberately broken sockproxy for tests/test_sockproxy_abi.py: it compiles, but the verdict
 * dereferences a map lookup without checking it for NULL, which the verifier must reject. */
#include "sockproxy_abi.h"

BPF_SOCKHASH(sp_socks, __u64, SP_MAX_SOCKETS);
BPF_SOCKHASH(sp_splice, __u64, SP_MAX_SOCKETS);
BPF_HASH(sp_peers, __u64, struct sp_peer, SP_MAX_SOCKETS);
BPF_PERCPU_HASH(sp_traffic, __u32, struct sp_traffic, SP_MAX_SERVICES);
BPF_HASH(sp_conns, __u32, struct sp_conns, SP_MAX_SERVICES);

int sp_parser(struct __sk_buff *skb)
{
	return skb->len;
}

int sp_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct sp_peer *peer = sp_peers.lookup(&cookie);

	return peer->service_id ? SK_PASS : SK_DROP; /* no `if (!peer)` */
}
