/* sockproxy_abi.h - the structs and constants shared by sockproxy.c and xdpfw/proxy/abi.py.
 *
 * This is the only definition both sides use; tests/test_sockproxy_abi.py checks the Python
 * ctypes mirror against the types BCC derives from this file (sizes and field offsets).
 * All fields are host byte order: nothing here is ever on the wire.
 */
#ifndef XDPFW_SOCKPROXY_ABI_H
#define XDPFW_SOCKPROXY_ABI_H

/* Which way bytes read from a socket travel. */
#define SP_DIR_TO_BACKEND 0 /* read from the client socket, sent on the backend socket */
#define SP_DIR_TO_CLIENT 1  /* read from the backend socket, sent on the client socket */

/* Capacities; overridable with -D from the loader. */
#ifndef SP_MAX_SOCKETS
#define SP_MAX_SOCKETS 65536 /* two per proxied connection */
#endif
#ifndef SP_MAX_SERVICES
#define SP_MAX_SERVICES 1024
#endif

/* Value of sp_peers, keyed by the socket cookie (u64) of the socket the bytes are read from. */
struct sp_peer {
	__u64 peer_cookie; /* sockhash key of the socket the bytes are sent on */
	__u32 service_id;
	__u32 direction; /* SP_DIR_* */
};

/* Value of sp_traffic (per-CPU, keyed by service id): written only by the verdict program. */
struct sp_traffic {
	__u64 bytes_to_backend;
	__u64 bytes_to_client;
	__u64 skbs_to_backend;
	__u64 skbs_to_client;
	__u64 no_peer;         /* skb on a spliced socket with no sp_peers entry: passed up */
	__u64 redirect_failed; /* peer socket no longer in sp_socks: bytes dropped */
	__u64 empty_skbs;      /* zero-length skb (a bare FIN, verdict-only attach): dropped */
};

/* Value of sp_conns (keyed by service id): written only by the user-space engine. */
struct sp_conns {
	__u64 accepted;
	__u64 active;
	__u64 closed;
	__u64 backend_failures;  /* connect refused, unreachable or timed out */
	__u64 relayed_in_userspace; /* connections the kernel would not splice */
	__u64 queue_resets; /* spliced connections reset for holding over max_queued bytes */
	__u64 limit_waits; /* times accepting stopped at proxy_max_connections */
	__u64 idle_resets; /* connections reset after proxy_idle_timeout_s without a byte */
	__u64 client_refusals; /* reset at accept: client at proxy_max_connections_per_client */
};

#endif /* XDPFW_SOCKPROXY_ABI_H */
