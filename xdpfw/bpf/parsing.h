/* parsing.h: bounds-checked header parsers for the XDP firewall.
 *
 * One parse_<hdr>() per header; each checks `if (h + 1 > data_end)` before reading and
 * advances the cursor. They return the next protocol, or -1 when the packet cannot be read
 * (truncated, ihl < 5, doff < 5, too many extension headers): such packets are "unparsed"
 * and follow the interface's unparsed_policy.
 */
#ifndef XDPFW_PARSING_H
#define XDPFW_PARSING_H

#ifndef VLAN_MAX_DEPTH
#define VLAN_MAX_DEPTH 2 /* 802.1Q and 802.1ad (QinQ) */
#endif
#ifndef IPV6_EXT_MAX_CHAIN
#define IPV6_EXT_MAX_CHAIN 6 /* more extension headers than this: unparsed */
#endif

#define ETH_P_8021Q_BE  0x0081 /* htons(0x8100), constants to compare with be16 fields */
#define ETH_P_8021AD_BE 0xa888 /* htons(0x88a8) */
#define ETH_P_IP_BE     0x0008
#define ETH_P_IPV6_BE   0xdd86
#define ETH_P_ARP_BE    0x0608

#define IPV6_FRAG_OFFSET_MASK_BE 0xf8ff /* htons(0xfff8) */
#define IPV4_FRAG_OFFSET_MASK_BE 0xff1f /* htons(0x1fff) */

struct cursor {
	void *pos;
	void *end;
};

/* What the firewall needs to know of a packet. */
struct packet {
	__u16 eth_proto; /* be: the innermost ethertype */
	__u8 l4_proto;   /* IPPROTO_*, 0 for non-IP */
	__u8 has_ports;  /* dport is valid: TCP/UDP with its header present */
	__u16 dport;     /* be */
	__u8 icmp_type;
	__u8 frag_tail;  /* a non-first fragment: no L4 header at all */
	__u8 saddr[16];  /* be: 4 bytes for IPv4, 16 for IPv6 */
	__u8 daddr[16];  /* be: as saddr (the load balancer matches it against VIPs) */
	__u16 sport;     /* be: valid with has_ports (the load balancer's flow key) */
	__u8 pad[2];
};

struct vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

static __always_inline int parse_ethhdr(struct cursor *c, struct packet *p)
{
	struct ethhdr *eth = c->pos;
	if ((void *)(eth + 1) > c->end)
		return -1;
	c->pos = eth + 1;
	__u16 proto = eth->h_proto;

#pragma unroll
	for (int i = 0; i < VLAN_MAX_DEPTH; i++) {
		if (proto != ETH_P_8021Q_BE && proto != ETH_P_8021AD_BE)
			break;
		struct vlan_hdr *vh = c->pos;
		if ((void *)(vh + 1) > c->end)
			return -1;
		c->pos = vh + 1;
		proto = vh->encap_proto;
	}
	/* A third tag is not something this firewall reads: unparsed, not silently passed. */
	if (proto == ETH_P_8021Q_BE || proto == ETH_P_8021AD_BE)
		return -1;
	p->eth_proto = proto;
	return proto;
}

static __always_inline int parse_iphdr(struct cursor *c, struct packet *p)
{
	struct iphdr *iph = c->pos;
	if ((void *)(iph + 1) > c->end)
		return -1;
	if (iph->version != 4 || iph->ihl < 5)
		return -1;
	__u32 hlen = iph->ihl * 4;
	if (c->pos + hlen > c->end)
		return -1;
	__builtin_memcpy(p->saddr, &iph->saddr, 4);
	__builtin_memcpy(p->daddr, &iph->daddr, 4);
	c->pos += hlen;
	p->l4_proto = iph->protocol;
	/* Non-first fragments carry no L4 header: match by protocol only. */
	p->frag_tail = (iph->frag_off & IPV4_FRAG_OFFSET_MASK_BE) != 0;
	return iph->protocol;
}

static __always_inline int parse_ipv6hdr(struct cursor *c, struct packet *p)
{
	struct ipv6hdr *ip6 = c->pos;
	if ((void *)(ip6 + 1) > c->end)
		return -1;
	if (ip6->version != 6)
		return -1;
	__builtin_memcpy(p->saddr, &ip6->saddr, 16);
	__builtin_memcpy(p->daddr, &ip6->daddr, 16);
	c->pos = ip6 + 1;
	__u8 nexthdr = ip6->nexthdr;

#pragma unroll
	for (int i = 0; i < IPV6_EXT_MAX_CHAIN; i++) {
		struct ipv6_opt_hdr *opt = c->pos;
		switch (nexthdr) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			if ((void *)(opt + 1) > c->end)
				return -1;
			nexthdr = opt->nexthdr;
			c->pos += (opt->hdrlen + 1) * 8;
			break;
		case IPPROTO_AH:
			if ((void *)(opt + 1) > c->end)
				return -1;
			nexthdr = opt->nexthdr;
			c->pos += (opt->hdrlen + 2) * 4;
			break;
		case IPPROTO_FRAGMENT: {
			struct frag_hdr *fh = c->pos;
			if ((void *)(fh + 1) > c->end)
				return -1;
			nexthdr = fh->nexthdr;
			if (fh->frag_off & IPV6_FRAG_OFFSET_MASK_BE)
				p->frag_tail = 1;
			c->pos = fh + 1;
			break;
		}
		default:
			p->l4_proto = nexthdr;
			return nexthdr;
		}
	}
	/* Still an extension header after the bounded walk. */
	return -1;
}

/* Reads the ports (TCP/UDP) or ICMP type. Returns 0, or -1 if truncated. */
static __always_inline int parse_l4(struct cursor *c, struct packet *p)
{
	if (p->frag_tail)
		return 0;
	switch (p->l4_proto) {
	case IPPROTO_TCP: {
		struct tcphdr *th = c->pos;
		if ((void *)(th + 1) > c->end || th->doff < 5)
			return -1;
		p->dport = th->dest;
		p->sport = th->source;
		p->has_ports = 1;
		return 0;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = c->pos;
		if ((void *)(uh + 1) > c->end)
			return -1;
		p->dport = uh->dest;
		p->sport = uh->source;
		p->has_ports = 1;
		return 0;
	}
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6: {
		__u8 *type = c->pos;
		if ((void *)(type + 4) > c->end) /* type, code, checksum */
			return -1;
		p->icmp_type = *type;
		return 0;
	}
	default:
		return 0;
	}
}

#endif /* XDPFW_PARSING_H */
