/* parsing.h: bounds-checked readers for the XDP firewall, in the four steps of README
 * "How a packet is read, and which verdict it gets":
 *   1. link layer (Ethernet, up to VLAN_MAX_DEPTH tags)      parse_ethhdr()
 *   2. ethertype                                             parse_ethhdr()
 *   3. the fixed IP header: from here the source is known    read_ipv4(), read_ipv6()
 *   4. the header chain, ending in a CHAIN_* outcome         ipv4_chain(), ipv6_chain()
 *
 * Every read is checked twice: against data_end, which is what the verifier can follow, and
 * against the IP packet's own length (`lim`, bytes from the IP header), so Ethernet padding
 * after the IP packet is never read as a header. An attacker controls that padding.
 */
#ifndef XDPFW_PARSING_H
#define XDPFW_PARSING_H

#ifndef VLAN_MAX_DEPTH
#define VLAN_MAX_DEPTH 2 /* 802.1Q and 802.1ad (QinQ) */
#endif
#ifndef IPV6_EXT_MAX
#define IPV6_EXT_MAX 16 /* extension headers walked; a 17th makes the chain incomplete */
#endif

#define ETH_P_8021Q_BE  0x0081 /* htons(0x8100), constants to compare with be16 fields */
#define ETH_P_8021AD_BE 0xa888 /* htons(0x88a8) */
#define ETH_P_IP_BE     0x0008
#define ETH_P_IPV6_BE   0xdd86
#define ETH_P_ARP_BE    0x0608

#define IPV4_MF          0x2000 /* host order, after bpf_ntohs(frag_off) */
#define IPV4_OFFSET_MASK 0x1fff
#define IPV6_FRAG_M      0x0001 /* host order, after bpf_ntohs(frag_off) */

/* Outcome of step 4 (README: complete, non-first fragment, bad fragment, incomplete). */
#define CHAIN_COMPLETE     0 /* protocol known, and ports for TCP/UDP */
#define CHAIN_FRAG_TAIL    1 /* a non-first fragment: protocol known, no ports */
#define CHAIN_INCOMPLETE   2 /* the chain cannot be read to the end */
#define CHAIN_FRAG_OVERLAP 3 /* IPv4 fragment at offset 8 bytes (RFC 1858) */
#define CHAIN_FRAG_TINY    4 /* IPv4 first fragment too short for its TCP/UDP header (RFC 1858) */
#define CHAIN_FRAG_CHAIN   5 /* IPv6 first fragment without its whole header chain (RFC 7112) */

/* struct packet.flags */
#define PKT_FRAGMENT  0x1 /* an IPv4 fragment, or an IPv6 packet with a Fragment header */
#define PKT_ICMP_TYPE 0x2 /* icmp_type holds the first byte after the chain */

struct cursor {
	void *pos;
	void *end; /* data_end: the verifier's bound */
};

/* What the firewall needs to know of a packet. */
struct packet {
	__u16 eth_proto; /* be: the innermost ethertype */
	__u8 l4_proto;   /* IPPROTO_*, 0 for non-IP */
	__u8 has_ports;  /* dport and sport are valid: a complete TCP/UDP packet */
	__u16 dport;     /* be */
	__u8 icmp_type;  /* valid with PKT_ICMP_TYPE */
	__u8 flags;      /* PKT_* */
	__u8 saddr[16];  /* be: 4 bytes for IPv4, 16 for IPv6 */
	__u8 daddr[16];  /* be: as saddr (the load balancer matches it against VIPs) */
	__u16 sport;     /* be: valid with has_ports (the load balancer's flow key) */
	__u8 pad[2];
};

struct vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

/* Steps 1 and 2. Returns 0 with p->eth_proto set, or -1: the frame is unreadable. */
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
	/* A third tag hides the source: unreadable, never silently read as something else. */
	if (proto == ETH_P_8021Q_BE || proto == ETH_P_8021AD_BE)
		return -1;
	p->eth_proto = proto;
	return 0;
}

/* Step 3, IPv4: 20 bytes and version 4, else NULL (unreadable). Sets the addresses. */
static __always_inline struct iphdr *read_ipv4(struct cursor *c, struct packet *p)
{
	struct iphdr *iph = c->pos;
	if ((void *)(iph + 1) > c->end || iph->version != 4)
		return NULL;
	__builtin_memcpy(p->saddr, &iph->saddr, 4);
	__builtin_memcpy(p->daddr, &iph->daddr, 4);
	return iph;
}

/* Step 3, IPv6: 40 bytes and version 6, else NULL (unreadable). Sets the addresses. */
static __always_inline struct ipv6hdr *read_ipv6(struct cursor *c, struct packet *p)
{
	struct ipv6hdr *ip6 = c->pos;
	if ((void *)(ip6 + 1) > c->end || ip6->version != 6)
		return NULL;
	__builtin_memcpy(p->saddr, &ip6->saddr, 16);
	__builtin_memcpy(p->daddr, &ip6->daddr, 16);
	return ip6;
}

/* The transport header at `off` bytes from the IP header `ip`, inside an IP packet of `lim`
 * bytes. TCP needs 20 bytes, doff >= 5 and doff * 4 bytes; UDP 8 bytes; nothing else needs
 * anything (ICMP's type is read when present, for the ND exemption). */
static __always_inline int read_transport(struct cursor *c, void *ip, __u32 off, __u32 lim,
					  struct packet *p)
{
	void *pos = ip + off;
	switch (p->l4_proto) {
	case IPPROTO_TCP: {
		struct tcphdr *th = pos;
		if ((void *)(th + 1) > c->end || off + sizeof(*th) > lim)
			return CHAIN_INCOMPLETE;
		if (th->doff < 5 || off + th->doff * 4 > lim)
			return CHAIN_INCOMPLETE;
		p->dport = th->dest;
		p->sport = th->source;
		p->has_ports = 1;
		return CHAIN_COMPLETE;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = pos;
		if ((void *)(uh + 1) > c->end || off + sizeof(*uh) > lim)
			return CHAIN_INCOMPLETE;
		p->dport = uh->dest;
		p->sport = uh->source;
		p->has_ports = 1;
		return CHAIN_COMPLETE;
	}
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6: {
		__u8 *type = pos;
		if ((void *)(type + 1) <= c->end && off + 1 <= lim) {
			p->icmp_type = *type;
			p->flags |= PKT_ICMP_TYPE;
		}
		return CHAIN_COMPLETE;
	}
	default:
		return CHAIN_COMPLETE;
	}
}

/* Step 4, IPv4: length checks, fragments (RFC 1858), then the transport header. */
static __always_inline int ipv4_chain(struct cursor *c, struct iphdr *iph, struct packet *p)
{
	__u32 hlen = iph->ihl * 4;
	__u32 lim = bpf_ntohs(iph->tot_len);
	p->l4_proto = iph->protocol;
	if (iph->ihl < 5 || lim < hlen || (void *)iph + lim > c->end)
		return CHAIN_INCOMPLETE;

	__u16 frag = bpf_ntohs(iph->frag_off);
	__u16 offset = frag & IPV4_OFFSET_MASK;
	if (offset == 1)
		return CHAIN_FRAG_OVERLAP;
	if (offset) {
		p->flags |= PKT_FRAGMENT;
		return CHAIN_FRAG_TAIL;
	}
	if (frag & IPV4_MF) {
		p->flags |= PKT_FRAGMENT;
		__u32 payload = lim - hlen;
		if ((iph->protocol == IPPROTO_TCP && payload < sizeof(struct tcphdr)) ||
		    (iph->protocol == IPPROTO_UDP && payload < sizeof(struct udphdr)))
			return CHAIN_FRAG_TINY;
	}
	return read_transport(c, iph, hlen, lim, p);
}

/* The extension headers walked (README): 0, 43, 44, 51 and 60, all below 64, so membership is
 * one bit test. Bit tests and arithmetic instead of a branch per kind keep the verifier's
 * states the same on every path through the walk; with a branch per kind they multiplied
 * with each header and a 16-header walk did not verify. */
#define IPV6_OFF_MAX 0xf000 /* never reached: 16 headers of at most 2048 bytes end below it */
#define IPV6_EXT_MASK ((1ULL << IPPROTO_HOPOPTS) | (1ULL << IPPROTO_ROUTING) | \
		       (1ULL << IPPROTO_FRAGMENT) | (1ULL << IPPROTO_AH) | (1ULL << IPPROTO_DSTOPTS))

static __always_inline int ipv6_is_ext(__u32 nh)
{
	return nh < 64 && ((IPV6_EXT_MASK >> nh) & 1);
}

/* Step 4, IPv6: the extension-header walk (at most IPV6_EXT_MAX), fragments (RFC 7112),
 * then the transport header. */
static __always_inline int ipv6_chain(struct cursor *c, struct ipv6hdr *ip6, struct packet *p)
{
	__u32 lim = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	if ((void *)ip6 + lim > c->end)
		return CHAIN_INCOMPLETE;
	void *base = ip6;
	__u32 off = sizeof(*ip6);
	__u32 nh = ip6->nexthdr;
	int first_fragment = 0; /* incomplete then means frag_chain */
	int outcome;

	/* A bounded loop, not unrolled: it is cold (most packets carry no extension header). */
#pragma clang loop unroll(disable)
	for (int i = 0; i < IPV6_EXT_MAX; i++) {
		if (!ipv6_is_ext(nh))
			break;
		/* off <= 40 + 16 * 2048 here. The verifier marks packet ranges only below 64 KiB, so
		 * it needs that bound said in a form it follows (and clang must not fold away). */
		asm volatile("" : "+r"(off));
		if (off > IPV6_OFF_MAX)
			goto incomplete;
		__u8 *h = base + off;
		/* Every extension header starts with next header and a length byte. */
		if ((void *)(h + 2) > c->end || off + 2 > lim)
			goto incomplete;
		__u32 is_ah = (IPV6_EXT_MASK & (1ULL << nh)) >> IPPROTO_AH & 1;
		__u32 is_frag = (IPV6_EXT_MASK & (1ULL << nh)) >> IPPROTO_FRAGMENT & 1;
		/* AH: (hdrlen + 2) * 4; Fragment: 8 (its second byte is reserved); the others:
		 * (hdrlen + 1) * 8. */
		__u32 len = ((__u32)h[1] * (1 - is_frag) + 1 + is_ah) << (3 - is_ah);
		if (is_frag) {
			struct frag_hdr *fh = (void *)h;
			if ((void *)(fh + 1) > c->end || off + sizeof(*fh) > lim)
				goto incomplete;
			p->flags |= PKT_FRAGMENT;
			__u16 frag = bpf_ntohs(fh->frag_off);
			if (frag >> 3) { /* a non-first fragment: what follows is not a header */
				if (first_fragment) /* inside a first fragment: its chain ends here */
					goto incomplete;
				p->l4_proto = fh->nexthdr;
				return CHAIN_FRAG_TAIL;
			}
			first_fragment |= frag & IPV6_FRAG_M;
		}
		/* The whole extension header lies inside the packet. */
		if (off + len > lim)
			goto incomplete;
		nh = h[0];
		off += len;
	}
	if (ipv6_is_ext(nh))
		goto incomplete; /* more than IPV6_EXT_MAX extension headers */
	p->l4_proto = nh;
	asm volatile("" : "+r"(off));
	if (off > IPV6_OFF_MAX)
		goto incomplete;
	outcome = read_transport(c, base, off, lim, p);
	if (outcome == CHAIN_INCOMPLETE)
		goto incomplete;
	return outcome;

incomplete:
	return first_fragment ? CHAIN_FRAG_CHAIN : CHAIN_INCOMPLETE;
}

#endif /* XDPFW_PARSING_H */
