/* lpm_min.c: the least a prefix firewall must do, for scripts/bench_fw.py.
 *
 * Parse Ethernet and IPv4, look the source address up once in an LPM trie, drop on a match.
 * The trie is its own (a PIN_DIR of its own), filled by the benchmark with every prefix the
 * firewall holds, /32s included (xdpfw keeps those in a hash). No VLANs, no IPv6, no counters,
 * no per-interface policy: what xdpfw costs beyond this is the price of its features.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

#include "xdpfw_abi.h"

#define ETH_P_IP_BE 0x0008 /* htons(ETH_P_IP) */

/* The firewall's source-prefix trie, opened from its pin (created here only if absent). */
BPF_TABLE_PINNED("lpm_trie", struct lpm_v4_key, struct prefix_verdict, rules_v4, MAX_RULES,
		 PIN_DIR "/rules_v4", BPF_F_NO_PREALLOC);

int lpm_min(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);

	if ((void *)(iph + 1) > data_end || eth->h_proto != ETH_P_IP_BE)
		return XDP_PASS;

	struct lpm_v4_key key = {.prefixlen = 32};
	__builtin_memcpy(key.addr, &iph->saddr, 4);
	return rules_v4.lookup(&key) ? XDP_DROP : XDP_PASS;
}
