/* lb.h: the L4 load balancer, for packets the firewall passes.
 *
 * lb_forward() returns the verdict of a passing packet, and when it is not XDP_PASS sets the
 * reason it is counted under (XDPFW_REASON_LB_*): XDP_PASS when it belongs to no service (or
 * XDP_REDIRECT to a CPU when cpu steering is on), else the service's forwarding:
 *   the service: lb_vip_index bucket -> lb_service_slots (lb_services when VIPs share one)
 *   conntrack hit (same backend generation, not aged out) -> that backend: the per-CPU
 *     lb_flow_cache first, lb_conntrack on a miss there
 *   else Maglev: lb_tables[slot * LB_TABLE_SIZE + jhash(5-tuple) % LB_TABLE_SIZE]
 *   tx:       dst MAC = backend, src MAC = ours (the frame's old dst), XDP_TX
 *   redirect: dst MAC = backend, src MAC = egress NIC, XDP_REDIRECT via tx_ports
 * Only the Ethernet header is rewritten: the backends hold the VIP on their loopback (DSR).
 * Non-first fragments and ICMP errors about a VIP's flows are not balanced (no ports): they pass.
 */
#ifndef XDPFW_LB_H
#define XDPFW_LB_H

#include "hash.h"

/* Times in jiffies (bpf_jiffies64: a memory read; bpf_ktime_get_ns cost 34 ns on this
 * machine): ProgramConfig passes the kernel's HZ. */
#ifndef LB_HZ
#define LB_HZ 1000
#endif
#ifndef LB_CT_TIMEOUT_S
#define LB_CT_TIMEOUT_S 300 /* idle flows re-balance after this */
#endif
#define LB_CT_TIMEOUT_J ((__u64)LB_CT_TIMEOUT_S * LB_HZ)
#define LB_CT_REFRESH_J ((__u64)LB_HZ) /* write last_seen at most once a second per flow */

/* lb_vip_index's bucket of a VIP: its five words folded, Fibonacci-hashed (abi.py mirrors it). */
static __always_inline __u32 xdpfw_lb_vip_bucket(struct lb_vip *v)
{
	__u32 *w = (__u32 *)v;
	__u32 x = w[0] ^ w[1] ^ w[2] ^ w[3] ^ w[4];
	return (x * 0x9E3779B1u) >> (32 - XDPFW_LB_VIP_INDEX_BITS);
}

static __always_inline int lb_vip_equal(struct lb_vip *a, struct lb_vip *b)
{
	__u32 *x = (__u32 *)a, *y = (__u32 *)b;
	return !((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) | (x[4] ^ y[4]));
}

static __always_inline int lb_flow_equal(struct lb_flow *a, struct lb_flow *b)
{
	__u32 *x = (__u32 *)a, *y = (__u32 *)b;
	__u32 d = 0;
#pragma unroll
	for (int i = 0; i < sizeof(struct lb_flow) / 4; i++)
		d |= x[i] ^ y[i];
	return !d;
}

/* The service of a VIP, or NULL. */
static __always_inline struct lb_service *lb_find_service(struct lb_vip *vip)
{
	__u32 bucket = xdpfw_lb_vip_bucket(vip);
	__u32 *at = lb_vip_index.lookup(&bucket);
	if (!at || *at == 0)
		return NULL;
	if (*at == XDPFW_LB_VIP_COLLIDE)
		return lb_services.lookup(vip);
	__u32 slot = *at - 1;
	struct lb_service_slot *s = lb_service_slots.lookup(&slot);
	/* The VIP check also covers a slot being rewritten for another service. */
	return s && lb_vip_equal(&s->vip, vip) ? &s->svc : NULL;
}

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

/* The backend of a conntrack entry, if it may keep its flow: live, same generation. */
static __always_inline struct lb_backend *lb_ct_backend(struct lb_ct *ct, __u64 now)
{
	if (now - ct->last_seen >= LB_CT_TIMEOUT_J)
		return NULL;
	__u32 s = ct->backend;
	struct lb_backend *be = lb_backends.lookup(&s);
	return be && (be->flags & XDPFW_LB_BE_LIVE) && be->gen == ct->gen ? be : NULL;
}

/* The backend slot of a flow: conntrack first (its per-CPU cache, then the LRU), else the
 * Maglev table (and remember it in both). */
static __always_inline struct lb_backend *lb_pick(struct lb_service *svc, struct lb_flow *f,
						  __u32 hash, __u32 *slot)
{
	__u64 now = bpf_jiffies64();
	__u32 ci = hash & (XDPFW_LB_FLOW_CACHE - 1);
	struct lb_flow_slot *c = lb_flow_cache.lookup(&ci);
	if (!c)
		return NULL;
	struct lb_backend *be;
	if (lb_flow_equal(&c->flow, f)) {
		be = lb_ct_backend(&c->ct, now);
		if (be) {
			if (now - c->ct.last_seen > LB_CT_REFRESH_J) {
				c->ct.last_seen = now;
				struct lb_ct *ct = lb_conntrack.lookup(f); /* keep the truth alive too */
				if (ct)
					ct->last_seen = now;
			}
			*slot = c->ct.backend;
			return be;
		}
	}
	struct lb_ct *ct = lb_conntrack.lookup(f);
	if (ct) {
		be = lb_ct_backend(ct, now);
		if (be) {
			if (now - ct->last_seen > LB_CT_REFRESH_J)
				ct->last_seen = now;
			c->flow = *f;
			c->ct = *ct;
			*slot = ct->backend;
			return be;
		}
	}
	__u32 idx = svc->slot * LB_TABLE_SIZE + hash % LB_TABLE_SIZE;
	__u32 *entry = lb_tables.lookup(&idx);
	if (!entry || *entry == XDPFW_LB_NO_BACKEND)
		return NULL;
	__u32 s = *entry;
	be = lb_backends.lookup(&s);
	if (!be || !(be->flags & XDPFW_LB_BE_LIVE))
		return NULL;
	struct lb_ct fresh = {.backend = s, .gen = be->gen, .last_seen = now};
	lb_conntrack.update(f, &fresh);
	c->flow = *f;
	c->ct = fresh;
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
		struct lb_service *svc = lb_find_service(&vip);
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
