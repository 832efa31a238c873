/* sockproxy.c - in-kernel TCP splicing for services in `proxy` mode.
 *
 * User space accepts a client, connects to a backend, then hands both sockets to the kernel:
 *   1. both go into sp_socks (redirect targets; no programs attached, so nothing is
 *      intercepted yet and bytes that arrive meanwhile wait in the receive queue);
 *   2. sp_peers gets cookie -> peer entries for both;
 *   3. both go into sp_splice, which carries the parser and verdict programs (stream
 *      parser + stream verdict; loader.py says why not the verdict program alone).
 * Step 1 before 3 means the first skb a verdict sees always finds its peer in sp_socks.
 * The kernel removes a socket from both sockhashes when it closes; user space deletes the
 * sp_peers entries when it closes the pair.
 *
 * Redirects are to the peer's egress (flags 0): the kernel queues the skb on the peer's psock
 * and its backlog worker transmits it. BPF_F_INGRESS would instead queue the bytes for the
 * peer socket's own reader, i.e. back to user space.
 */
#include "sockproxy_abi.h"

/* Marker key in sp_traffic for skbs whose socket has no sp_peers entry. */
#define SP_SERVICE_UNKNOWN 0xffffffff

#include "sockproxy_maps.h"

/* Stream-parser attach only. One message per skb: the proxy has no framing, it moves
 * whatever arrived. */
int sp_parser(struct __sk_buff *skb)
{
	return skb->len;
}

/* Why a verdict was not a plain redirect (record_verdict's `reason`). */
#define REASON_REDIRECT 0
#define REASON_NO_PEER 1
#define REASON_EMPTY 2

static __always_inline int record_verdict(__u32 service_id, __u32 direction, __u32 len,
					  int verdict, int reason)
{
	struct sp_traffic zero = {};
	struct sp_traffic *t = sp_traffic.lookup_or_try_init(&service_id, &zero);

	if (!t)
		return verdict;
	if (reason == REASON_NO_PEER)
		t->no_peer++;
	else if (reason == REASON_EMPTY)
		t->empty_skbs++;
	else if (verdict != SK_PASS)
		t->redirect_failed++;
	else if (direction == SP_DIR_TO_BACKEND) {
		t->bytes_to_backend += len;
		t->skbs_to_backend++;
	} else {
		t->bytes_to_client += len;
		t->skbs_to_client++;
	}
	return verdict;
}

int sp_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct sp_peer *peer = sp_peers.lookup(&cookie);
	__u64 peer_cookie;

	/* Not expected (entries are written before a socket joins sp_splice): hand the bytes
	 * to the socket's own reader rather than lose them, and count it. */
	if (!peer)
		return record_verdict(SP_SERVICE_UNKNOWN, 0, skb->len, SK_PASS,
				      REASON_NO_PEER);

	/* Defensive: verdict-only attach (not used, loader.py) hands over a FIN without payload
	 * as a zero-length skb, and a parser could too. Redirected,
	 * the peer's backlog worker gets 0 from skb_send_sock(), takes it for a hard error, sets
	 * EPIPE on the peer socket and stops transmitting: half-close would break. The FIN is
	 * already in the socket state (EPOLLRDHUP), from which user space propagates it. */
	if (skb->len == 0)
		return record_verdict(peer->service_id, peer->direction, 0, SK_DROP,
				      REASON_EMPTY);

	peer_cookie = peer->peer_cookie;
	/* Flags 0: egress, i.e. the bytes are transmitted on the peer socket. */
	return record_verdict(peer->service_id, peer->direction, skb->len,
			      sp_socks.sk_redirect_hash(skb, &peer_cookie, 0), REASON_REDIRECT);
}
