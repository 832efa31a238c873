/* A deliberately broken sockproxy for tests/test_sockproxy_abi.py: it compiles, but the verdict
 * dereferences a map lookup without checking it for NULL, which the verifier must reject. */
#include "sockproxy_maps.h"

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
