/* lpm6_min.c: the least an IPv6 prefix firewall must do, for scripts/bench_fw.py.
 *
 * Parse Ethernet and the fixed IPv6 header, look the source address up once in an LPM trie,
 * drop on a match. The trie is this program's own, filled by the benchmark with the same
 * prefixes the daemon holds (/128s included). No extension headers, no VLANs, no counters.
 * Self-contained (kernel headers only), loaded with BCC by scripts/benchlib.py.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ipv6.h>

#ifndef LPM_MAX
#define LPM_MAX 262144
#endif

struct lpm_v6_key {
	__u32 prefixlen; /* host order */
	__u8 addr[16];   /* network order */
};

BPF_LPM_TRIE(trie, struct lpm_v6_key, __u8, LPM_MAX);

int lpm6_min(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);

	if ((void *)(ip6 + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IPV6))
		return XDP_PASS;
	struct lpm_v6_key key = {.prefixlen = 128};
	__builtin_memcpy(key.addr, &ip6->saddr, 16);
	return trie.lookup(&key) ? XDP_DROP : XDP_PASS;
}
