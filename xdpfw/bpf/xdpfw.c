/* xdpfw.c: the XDP firewall entry point.
 *
 * read the frame up to the source address -> look the source prefix up -> read the rest of
 * the header chain -> bad fragments drop, unreadable chains get the source's strictest
 * verdict, readable ones are refined by proto/port -> else the interface policy -> passing
 * packets go to the load balancer (lb.h) -> what still passes goes to the interface's chained
 * program, if any. Every verdict leaves through record(), so every packet is counted once per
 * reason, rule and interface.
 *
 * One build, many instances: each attached instance is this program with XDPFW_SLOT_MARKER
 * patched to its interface slot (xdpfw/dataplane/instances.py), because the ifindex repeats
 * across network namespaces and XDP cannot see the namespace.
 *
 * Two entry points share the decision (decide()): xdpfw_main, which interfaces run, and
 * xdpfw_explain, which only BPF_PROG_TEST_RUN runs, to say what xdpfw_main would decide.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

/* IPv6 fragment header (net/ipv6.h is kernel-internal). */
struct frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

#define XDPFW_STR_(x) #x
#define XDPFW_STR(x) XDPFW_STR_(x)

#include "xdpfw_abi.h"
#include "maps.h"
#include "parsing.h"
/* Adds one packet of `bytes` to a per-CPU counter (lb.h counts with it too). */
static __always_inline void count(void *map_lookup_result, __u64 bytes)
{
	struct counter *c = map_lookup_result;
	if (c) {
		c->packets += 1;
		c->bytes += bytes;
	}
}

#include "lb.h"

#define ICMPV6_ND_FIRST 133 /* router solicitation .. redirect: neighbour discovery */
#define ICMPV6_ND_LAST  137


/* The interface slot of this instance: one ld_imm64 of the marker, patched at load. The asm
 * keeps clang from folding the constant into the instructions that use it. */
static __always_inline __u32 iface_slot(void)
{
	__u64 slot;
	asm volatile("%0 = " XDPFW_STR(XDPFW_SLOT_MARKER) " ll" : "=r"(slot));
	return slot;
}

/* Push 1 drop in sample_rate to user space. Off (rate 0), it costs a drop one test; a full
 * ring buffer loses the event, never the drop or its count. */
static __always_inline void sample_drop(struct xdp_md *ctx, struct fw_cfg *fc, struct packet *p,
					__u32 iface, __u32 reason, __u32 rule_slot)
{
	if (!fc || !fc->sample_rate)
		return;
	/* Every sample_rate-th drop per CPU: a per-CPU countdown costs a drop ~1 ns, where a
	 * random draw and a division cost several. */
	__u32 zero = 0;
	__u32 *left = sample_countdown.lookup(&zero);
	if (!left)
		return;
	__u32 n = *left;
	if (n == 0 || n > fc->sample_rate)
		n = fc->sample_rate;
	*left = --n;
	if (n)
		return;
	struct drop_event *e = drop_events.ringbuf_reserve(sizeof(*e));
	if (!e)
		return;
	__builtin_memcpy(e->saddr, p->saddr, 16);
	__builtin_memcpy(e->daddr, p->daddr, 16);
	e->rule_slot = rule_slot;
	e->iface = iface;
	e->pkt_len = ctx->data_end - ctx->data;
	e->sport = p->has_ports ? p->sport : 0;
	e->dport = p->has_ports ? p->dport : 0;
	e->eth_proto = p->eth_proto;
	e->l4_proto = p->l4_proto;
	e->reason = reason;
	/* No wake-up: the reader drains the ring on a timer (xdpfw/events.py). Waking it costs
	 * the sampled packet microseconds, ~50 ns per drop at 1 in 100. */
	drop_events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

/* Copy the frame into capture_ring if the running capture selects this verdict and the
 * CPU's rate allows it. Reached only while fw_cfg.capture is set (see record()). */
static __always_inline int capture(struct xdp_md *ctx, __u32 iface, __u32 reason, __u32 rule_slot,
			      int verdict)
{
	__u32 zero = 0;
	struct capture_cfg *cc = capture_config.lookup(&zero);
	if (!cc)
		return 0;
	if ((cc->iface != XDPFW_CAPTURE_ANY && cc->iface != iface) ||
	    (cc->rule_slot != XDPFW_CAPTURE_ANY && cc->rule_slot != rule_slot) ||
	    !((cc->reasons >> (reason & 31)) & 1) || !((cc->verdicts >> (verdict & 31)) & 1))
		return 0;
	__u64 pkt_len = ctx->data_end - ctx->data;
	/* GCRA: a CPU may run burst_ns ahead of its allowance of one frame per interval_ns. */
	struct capture_bucket *b = capture_bucket.lookup(&zero);
	if (!b)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	__u64 tat = b->tat > now ? b->tat : now;
	if (tat - now > cc->burst_ns + cc->interval_ns) /* left by a stricter limit than this */
		tat = now;
	__u32 outcome = XDPFW_CAPTURE_LIMITED;
	if (tat - now <= cc->burst_ns) {
		b->tat = tat + cc->interval_ns;
		outcome = XDPFW_CAPTURE_LOST;
		struct capture_record *r = capture_scratch.lookup(&zero);
		__u64 len = pkt_len < cc->snaplen ? pkt_len : cc->snaplen;
		/* Hide from clang that len fits 32 bits: it would check a zero-extended copy,
		 * and the verifier would see the unchecked register go to the helper. */
		asm volatile("" : "+r"(len));
		if (r && len > 0 && len <= XDPFW_CAPTURE_MAX_SNAPLEN &&
		    bpf_xdp_load_bytes(ctx, 0, r->data, len) == 0) {
			r->ts_ns = now;
			r->pkt_len = pkt_len;
			r->cap_len = len;
			r->iface = iface;
			r->rule_slot = rule_slot;
			r->reason = reason;
			r->verdict = verdict;
			/* Default flags: the reader is woken only when it has caught up, and the
			 * rate limit bounds how often that can be. */
			if (capture_ring.ringbuf_output(r, __builtin_offsetof(struct capture_record, data) + len,
							0) == 0)
				outcome = XDPFW_CAPTURE_CAPTURED;
		}
	}
	count(capture_counters.lookup(&outcome), pkt_len);
	return 0;
}

/* xdpfw_explain's exit: the decision over the frame's first bytes, nothing counted. Test runs
 * only: the frame is the caller's copy. */
static __always_inline int explain_out(struct xdp_md *ctx, __u32 reason, __u32 rule_slot,
				       int verdict)
{
	struct explain_result *r = (void *)(long)ctx->data;
	if ((void *)(r + 1) <= (void *)(long)ctx->data_end) {
		r->magic = XDPFW_EXPLAIN_MAGIC;
		r->reason = reason;
		r->rule_slot = rule_slot;
		r->verdict = verdict;
	}
	return verdict;
}

static __always_inline int record(struct xdp_md *ctx, struct fw_cfg *fc, __u32 iface,
				  struct packet *p, __u32 reason, __u32 rule_slot, int verdict,
				  const int explain)
{
	__u64 bytes = ctx->data_end - ctx->data;

	if (explain)
		return explain_out(ctx, reason, rule_slot, verdict);

	if (verdict == XDP_DROP)
		sample_drop(ctx, fc, p, iface, reason, rule_slot);
	/* Off, a capture costs every packet one test of a word fc already points at. */
	if (fc && fc->capture)
		capture(ctx, iface, reason, rule_slot, verdict);

	count(reason_counters.lookup(&reason), bytes);
	if (rule_slot != XDPFW_NO_RULE)
		count(rule_counters.lookup(&rule_slot), bytes);
	__u32 idx = iface * XDPFW_IFACE_COUNTERS +
		    (verdict == XDP_DROP ? XDPFW_IFACE_DROPPED :
		     reason >= XDPFW_REASON_LB_TX && reason <= XDPFW_REASON_LB_REDIRECT ?
		     XDPFW_IFACE_FORWARDED : XDPFW_IFACE_PASSED);
	count(iface_counters.lookup(&idx), bytes);
	return verdict;
}

/* Packets a drop policy must not cut off: the box's own ARP and IPv6 neighbour discovery
 * (README: an unfragmented, complete ICMPv6 packet whose type is 133-137). */
static __always_inline int is_l2_control(struct packet *p)
{
	if (p->eth_proto == ETH_P_ARP_BE)
		return 1;
	return p->eth_proto == ETH_P_IPV6_BE && p->l4_proto == IPPROTO_ICMPV6 &&
	       (p->flags & (PKT_FRAGMENT | PKT_ICMP_TYPE)) == PKT_ICMP_TYPE &&
	       p->icmp_type >= ICMPV6_ND_FIRST && p->icmp_type <= ICMPV6_ND_LAST;
}

/* A packed verdict (XDPFW_PV_*, 0: no rule) and its fields. */
static __always_inline __u64 pack_verdict(struct prefix_verdict *v)
{
	return (__u64)(v->rule_slot & XDPFW_PV_SLOT_MASK) |
	       ((__u64)(v->port_set & XDPFW_PV_SET_MASK) << XDPFW_PV_SET_SHIFT) |
	       ((__u64)v->action << XDPFW_PV_ACT_SHIFT);
}

static __always_inline __u32 pv_slot(__u64 pv)
{
	__u32 slot = pv & XDPFW_PV_SLOT_MASK;
	return slot == XDPFW_PV_SLOT_MASK ? XDPFW_NO_RULE : slot;
}

static __always_inline __u32 pv_port_set(__u64 pv)
{
	return (pv >> XDPFW_PV_SET_SHIFT) & XDPFW_PV_SET_MASK;
}

static __always_inline __u8 pv_action(__u64 pv)
{
	return (pv >> XDPFW_PV_ACT_SHIFT) & 3;
}

/* IPv4: DIR-24-8 (xdpfw_abi.h), the same three reads at most whatever the rules are. */
static __always_inline __u64 lookup_v4(__u8 *saddr)
{
	__u32 a = ((__u32)saddr[0] << 24) | ((__u32)saddr[1] << 16) | ((__u32)saddr[2] << 8) |
		  saddr[3];
	__u32 idx = a >> 8;
	__u64 *e = v4_tbl24.lookup(&idx);
	if (!e)
		return 0;
	__u64 entry = *e;
	__u32 vid = entry & XDPFW_V4_ID_MASK;
	__u32 kind = entry >> XDPFW_V4_KIND_SHIFT;
	if (kind == XDPFW_V4_ONE) {
		/* The one prefix longer than /24: its last octet, masked to its length. */
		__u32 extra = ((entry >> XDPFW_V4_LEN_SHIFT) & 7) + 1;
		__u32 mask = (0xff << (8 - extra)) & 0xff;
		if (((entry >> XDPFW_V4_NET_SHIFT) & 0xff) == (a & mask))
			vid = (entry >> XDPFW_V4_AUX_SHIFT) & XDPFW_V4_ID_MASK;
	} else if (kind == XDPFW_V4_GROUP) {
		__u32 g = (entry >> XDPFW_V4_AUX_SHIFT) & XDPFW_V4_ID_MASK;
		struct v4_group *grp = v4_tbl8.lookup(&g);
		if (grp) {
			__u32 longer = grp->vid[a & 0xff];
			if (longer)
				vid = longer;
		}
	}
	if (!vid)
		return 0;
	__u64 *pv = v4_verdicts.lookup(&vid);
	return pv ? *pv : 0;
}

/* The hostless_v6 bucket of an IPv6 source: its /64, Fibonacci-hashed to 24 bits. */
static __always_inline __u32 v6_bucket(__u8 *saddr)
{
	__u64 hi = 0;
#pragma unroll
	for (int i = 0; i < 8; i++)
		hi = (hi << 8) | saddr[i];
	return (hi * XDPFW_V6_BUCKET_MUL) >> (64 - XDPFW_HOSTLESS_V6_BITS);
}

/* IPv6: the host hash (unless the /64's bucket holds no host), then the trie. `skip`:
 * fw_cfg.skip, the maps known to be empty. */
static __always_inline __u64 lookup_v6(__u8 *saddr, __u32 skip)
{
	if (!(skip & XDPFW_SKIP_HOSTS_V6)) {
		__u32 b = v6_bucket(saddr);
		__u32 word = b >> 6;
		__u64 *bits = hostless_v6.lookup(&word);
		if (!bits || !((*bits >> (b & 63)) & 1)) {
			struct host_v6_key h;
			__builtin_memcpy(h.addr, saddr, 16);
			struct prefix_verdict *v = hosts_v6.lookup(&h);
			if (v)
				return pack_verdict(v);
		}
	}
	if (skip & XDPFW_SKIP_RULES_V6)
		return 0;
	struct lpm_v6_key k = {.prefixlen = 128};
	__builtin_memcpy(k.addr, saddr, 16);
	struct prefix_verdict *v = rules_v6.lookup(&k);
	return v ? pack_verdict(v) : 0;
}

/* The rule action for a readable packet whose source's prefix entry is `pv` (0: no rule
 * covers the source), XDPFW_ACT_NONE if no rule decides; *slot names the rule. */
static __always_inline __u8 match_rules(__u64 pv, struct packet *p, __u32 *slot)
{
	if (!pv)
		return XDPFW_ACT_NONE;

	/* Prefixes without proto/port rules cost one lookup: port_set is 0 for them. */
	__u32 set = pv_port_set(pv);
	if (set != XDPFW_NO_PORT_SET) {
		struct port_key k = {.port_set = set, .proto = p->l4_proto};
		struct port_verdict *v = NULL;
		if (p->has_ports) {
			k.dport = p->dport;
			v = port_rules.lookup(&k);
			k.dport = 0;
		}
		if (!v)
			v = port_rules.lookup(&k);
		if (v) {
			*slot = v->rule_slot;
			return v->action;
		}
	}
	*slot = pv_slot(pv);
	return pv_action(pv);
}

/* The strictest action a readable packet from this source could get (README), for packets
 * whose headers cannot be read to the end. XDPFW_ACT_NONE: the interface policy. */
static __always_inline __u8 strictest(__u64 pv, __u32 *slot)
{
	if (!pv)
		return XDPFW_ACT_NONE;
	__u32 set = pv_port_set(pv);
	if (set == XDPFW_NO_PORT_SET) {
		*slot = pv_slot(pv);
		return pv_action(pv);
	}
	struct port_key k = {.port_set = set, .kind = XDPFW_PORT_STRICT};
	struct port_verdict *v = port_rules.lookup(&k);
	if (!v) /* every port set has one; fail closed if it is not there */
		return XDPFW_ACT_DROP;
	*slot = v->rule_slot;
	return v->action;
}

/* The firewall's decision for one frame. `explain` is a compile-time constant: xdpfw_main
 * (0) is what interfaces run, xdpfw_explain (1) what GET /api/v1/explain runs (under
 * BPF_PROG_TEST_RUN): the same decision, from the same maps, reported over the frame's first
 * bytes (struct explain_result) instead of counted, sampled, captured or forwarded. */
static __always_inline int decide(struct xdp_md *ctx, const int explain)
{
	struct cursor c = {.pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end};
	struct packet p = {};
	/* Keep p a struct in memory: split into scalars, its fields were spilled to stack slots
	 * of their own along every path, and that cost a miss ~8 ns (docs/perf.md, Findings). */
	asm volatile("" : : "r"(&p) : "memory");
	__u32 iface = iface_slot();
	struct iface_policy *cfg = iface_policy.lookup(&iface);
	__u32 zero = 0;
	struct fw_cfg *fc = fw_config.lookup(&zero);
	__u32 slot = XDPFW_NO_RULE;
	int drop_policy = cfg && cfg->policy == XDPFW_POLICY_DROP;
	int unparsed_drop = cfg && cfg->unparsed_policy == XDPFW_POLICY_DROP;
	__u64 pv;
	__u32 reason;
	int outcome, verdict;
	__u8 act;

	/* Steps 1-3: link layer, ethertype, the fixed IP header. */
	if (parse_ethhdr(&c, &p) < 0)
		goto unreadable;
	if (p.eth_proto == ETH_P_IP_BE) {
		struct iphdr *iph = read_ipv4(&c, &p);
		if (!iph)
			goto unreadable;
		outcome = ipv4_chain(&c, iph, &p);
	} else if (p.eth_proto == ETH_P_IPV6_BE) {
		struct ipv6hdr *ip6 = read_ipv6(&c, &p);
		if (!ip6)
			goto unreadable;
		outcome = ipv6_chain(&c, ip6, &p);
	} else {
		goto policy; /* non-IP: no rule can match */
	}

	/* The source is known: its rules decide, whatever the rest of the chain holds. */
	pv = p.eth_proto == ETH_P_IP_BE ? lookup_v4(p.saddr) : lookup_v6(p.saddr, fc ? fc->skip : 0);
	switch (outcome) {
	case CHAIN_COMPLETE:
	case CHAIN_FRAG_TAIL:
		break;
	case CHAIN_INCOMPLETE:
		if (unparsed_drop)
			goto drop_unparsed;
		act = strictest(pv, &slot);
		if (act == XDPFW_ACT_DROP || (act == XDPFW_ACT_NONE && drop_policy))
			goto drop_unparsed;
		reason = XDPFW_REASON_UNPARSED_PASS;
		goto pass;
	case CHAIN_FRAG_OVERLAP:
		reason = XDPFW_REASON_FRAG_OVERLAP;
		goto drop;
	case CHAIN_FRAG_TINY:
		reason = XDPFW_REASON_FRAG_TINY;
		goto drop;
	default:
		reason = XDPFW_REASON_FRAG_CHAIN;
		goto drop;
	}

	act = match_rules(pv, &p, &slot);
	if (act == XDPFW_ACT_DROP) {
		reason = XDPFW_REASON_RULE_DROP;
		goto drop;
	}
	if (act == XDPFW_ACT_PASS) {
		reason = XDPFW_REASON_RULE_PASS;
		goto forward;
	}

policy:
	/* No rule decided: the interface policy does. */
	if (!drop_policy) {
		reason = XDPFW_REASON_POLICY_PASS;
		goto forward;
	}
	if (is_l2_control(&p) && !(cfg->flags & XDPFW_IFF_GUARD_L2)) {
		reason = XDPFW_REASON_L2_EXEMPT;
		goto pass;
	}
	reason = XDPFW_REASON_POLICY_DROP;
	goto drop;

unreadable:
	/* No source address: nothing but the unparsed policy can decide. */
	if (!unparsed_drop) {
		reason = XDPFW_REASON_UNPARSED_PASS;
		goto pass;
	}
drop_unparsed:
	reason = XDPFW_REASON_UNPARSED_DROP;
drop:
	return record(ctx, fc, iface, &p, reason, slot, XDP_DROP, explain);
forward:
	/* Passing packets whose headers were read: the load balancer may take them, and then
	 * the verdict and the reason are its own. An explain stops at the firewall's verdict
	 * (the load balancer would remember the flow). */
	if (explain)
		return explain_out(ctx, reason, slot, XDP_PASS);
	verdict = lb_forward(ctx, &p, &reason);
	if (verdict != XDP_PASS)
		return record(ctx, fc, iface, &p, reason, slot, verdict, 0);
pass:
	if (explain)
		return explain_out(ctx, reason, slot, XDP_PASS);
	record(ctx, fc, iface, &p, reason, slot, XDP_PASS, 0);
	/* Another XDP program chained behind xdpfw on this interface decides next; with none
	 * (or if the call fails) the packet goes to the stack. */
	chain_progs.call(ctx, iface);
	return XDP_PASS;
}

int xdpfw_main(struct xdp_md *ctx)
{
	return decide(ctx, 0);
}

int xdpfw_explain(struct xdp_md *ctx)
{
	return decide(ctx, 1);
}
