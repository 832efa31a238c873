/* lpm_min.c: the least an IPv4 prefix firewall must do, for scripts/bench_fw.py.
 *
 * Parse Ethernet and IPv4, look the source address up once in an LPM trie, drop on a match.
 * The trie is this program's own, filled by the benchmark with the same prefixes the daemon
 * holds (/32s included). No VLANs, no IPv6, no counters, no policy: what one trie lookup of
 * that set costs, beside a bare XDP_DROP. Self-contained (kernel headers only), loaded with
 * BCC by scripts/benchlib.py; LPM_MAX (-D) is the trie's capacity.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

#ifndef LPM_MAX
#define LPM_MAX 2200000
#endif

struct lpm_v4_key {
	__u32 prefixlen; /* host order, as the kernel's struct bpf_lpm_trie_key */
	__u8 addr[4];    /* network order */
};

BPF_LPM_TRIE(trie, struct lpm_v4_key, __u8, LPM_MAX);

int lpm_min(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);

	if ((void *)(iph + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	struct lpm_v4_key key = {.prefixlen = 32};
	__builtin_memcpy(key.addr, &iph->saddr, 4);
	return trie.lookup(&key) ? XDP_DROP : XDP_PASS;
}
