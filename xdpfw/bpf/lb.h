/* lb.h: the L4 load balancer, for packets the firewall passes.
 *
 * lb_forward() returns the verdict of a passing packet, and when it is not XDP_PASS sets the
 * reason it is counted under (XDPFW_REASON_LB_*): XDP_PASS when it belongs to no service (or
 * XDP_REDIRECT to a CPU when cpu steering is on), else the service's forwarding:
 *   conntrack hit (same backend generation, not aged out) -> that backend
 *   else Maglev: lb_tables[slot * LB_TABLE_SIZE + jhash(5-tuple) % LB_TABLE_SIZE]
 *   tx:       dst MAC = backend, src MAC = ours (the frame's old dst), XDP_TX
 *   redirect: dst MAC = backend, src MAC = egress NIC, XDP_REDIRECT via tx_ports
 * Only the Ethernet header is rewritten: the backends hold the VIP on their loopback (DSR).
 * Non-first fragments and ICMP errors about a VIP's flows are not balanced (no ports): they pass.
 */
#ifndef XDPFW_LB_H
#define XDPFW_LB_H

#include "hash.h"

#ifndef LB_CT_TIMEOUT_NS
#define LB_CT_TIMEOUT_NS (300ULL * 1000000000ULL) /* idle flows re-balance after this */
#endif
#define LB_CT_REFRESH_NS 1000000000ULL /* write last_seen at most once a second per flow */

static __always_inline __u32 lb_flow_hash(struct lb_flow *f)
{
	__u32 ports = ((__u32)f->sport << 16) | f->dport;
	if (f->family == 4)
		return xdpfw_jhash_3words(*(__u32 *)f->saddr, *(__u32 *)f->daddr, ports, f->proto);
	/* saddr, daddr and the ports: 9 words. */
	return xdpfw_jhash2((__u32 *)f, 9, f->proto);
}

/* Spread over the CPUs of `s` by flow hash; the stack then processes the packet there. */
static __always_inline int lb_steer(struct lb_steer *s, __u32 hash, __u32 *reason)
{
	__u32 n = s->count;
	if (n == 0 || n > XDPFW_LB_MAX_STEER_CPUS)
		return XDP_PASS;
	__u32 idx = hash % n;
	/* clang knows idx < n <= 8 and would drop the mask; the verifier does not know it. */
	asm volatile("" : "+r"(idx));
	__u32 cpu = s->cpus[idx & (XDPFW_LB_MAX_STEER_CPUS - 1)];
	int verdict = cpu_map.redirect_map(cpu, XDP_PASS);
	if (verdict == XDP_REDIRECT)
		*reason = XDPFW_REASON_LB_CPU;
	return verdict;
}

/* The backend slot of a flow: conntrack first, else the Maglev table (and remember it). */
static __always_inline struct lb_backend *lb_pick(struct lb_service *svc, struct lb_flow *f,
						  __u32 hash, __u32 *slot)
{
	__u64 now = bpf_ktime_get_ns();
	struct lb_ct *ct = lb_conntrack.lookup(f);
	if (ct && now - ct->last_seen < LB_CT_TIMEOUT_NS) {
		__u32 s = ct->backend;
		struct lb_backend *be = lb_backends.lookup(&s);
		if (be && (be->flags & XDPFW_LB_BE_LIVE) && be->gen == ct->gen) {
			if (now - ct->last_seen > LB_CT_REFRESH_NS)
				ct->last_seen = now;
			*slot = s;
			return be;
		}
	}
	__u32 idx = svc->slot * LB_TABLE_SIZE + hash % LB_TABLE_SIZE;
	__u32 *entry = lb_tables.lookup(&idx);
	if (!entry || *entry == XDPFW_LB_NO_BACKEND)
		return NULL;
	__u32 s = *entry;
	struct lb_backend *be = lb_backends.lookup(&s);
	if (!be || !(be->flags & XDPFW_LB_BE_LIVE))
		return NULL;
	struct lb_ct fresh = {.backend = s, .gen = be->gen, .last_seen = now};
	lb_conntrack.update(f, &fresh);
	*slot = s;
	return be;
}

static __always_inline int lb_to_service(struct xdp_md *ctx, struct lb_service *svc,
					 struct lb_flow *f, __u32 *reason)
{
	__u64 bytes = ctx->data_end - ctx->data;
	__u32 hash = lb_flow_hash(f);
	__u32 cidx = svc->slot * XDPFW_LB_SVC_COUNTERS;

	if (svc->steer.count) {
		count(lb_service_counters.lookup(&cidx), bytes);
		return lb_steer(&svc->steer, hash, reason);
	}
	__u32 slot = 0;
	struct lb_backend *be = lb_pick(svc, f, hash, &slot);
	if (!be) {
		cidx += XDPFW_LB_SVC_NO_BACKEND;
		count(lb_service_counters.lookup(&cidx), bytes);
		*reason = XDPFW_REASON_LB_NO_BACKEND;
		return XDP_DROP;
	}
	struct ethhdr *eth = (void *)(long)ctx->data;
	if ((void *)(eth + 1) > (void *)(long)ctx->data_end)
		return XDP_PASS; /* the parser has read it already; this is for the verifier */
	count(lb_service_counters.lookup(&cidx), bytes);
	count(lb_backend_counters.lookup(&slot), bytes);
	if (svc->fwd == XDPFW_LB_FWD_TX) {
		__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
		__builtin_memcpy(eth->h_dest, be->dmac, ETH_ALEN);
		*reason = XDPFW_REASON_LB_TX;
		return XDP_TX;
	}
	__builtin_memcpy(eth->h_source, be->smac, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, be->dmac, ETH_ALEN);
	/* No devmap entry (the control plane lost the port): drop rather than misdeliver. */
	int verdict = tx_ports.redirect_map(be->tx_port, XDP_DROP);
	*reason = verdict == XDP_REDIRECT ? XDPFW_REASON_LB_REDIRECT : XDPFW_REASON_LB_NO_EGRESS;
	return verdict;
}

/* The verdict of a packet the firewall passes; *reason is set unless it is XDP_PASS. */
static __always_inline int lb_forward(struct xdp_md *ctx, struct packet *p, __u32 *reason)
{
	__u32 zero = 0;
	struct lb_config *cfg = lb_config.lookup(&zero);
	if (!cfg)
		return XDP_PASS;
	if (cfg->services && p->has_ports) {
		struct lb_vip vip = {.port = p->dport, .proto = p->l4_proto};
		struct lb_flow f = {.sport = p->sport, .dport = p->dport, .proto = p->l4_proto};
		if (p->eth_proto == ETH_P_IP_BE) {
			vip.family = f.family = 4;
			__builtin_memcpy(vip.addr, p->daddr, 4);
			__builtin_memcpy(f.saddr, p->saddr, 4);
			__builtin_memcpy(f.daddr, p->daddr, 4);
		} else {
			vip.family = f.family = 6;
			__builtin_memcpy(vip.addr, p->daddr, 16);
			__builtin_memcpy(f.saddr, p->saddr, 16);
			__builtin_memcpy(f.daddr, p->daddr, 16);
		}
		struct lb_service *svc = lb_services.lookup(&vip);
		if (svc)
			return lb_to_service(ctx, svc, &f, reason);
	}
	if (cfg->steer.count) {
		/* Any passing traffic: addresses alone keep a flow (and its fragments) on one CPU. */
		__u32 h = xdpfw_jhash2((__u32 *)p->saddr, 4, xdpfw_jhash2((__u32 *)p->daddr, 4, p->l4_proto));
		return lb_steer(&cfg->steer, h, reason);
	}
	return XDP_PASS;
}

#endif /* XDPFW_LB_H */
