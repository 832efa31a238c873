/* xdpfw_abi.h: every struct and constant that both the XDP program and the control plane use.
 *
 * This is the only definition. xdpfw/dataplane/abi.py mirrors it once, and
 * tests/test_abi.py checks that mirror against what BCC compiled from this file.
 * Byte order is stated per field: "be" fields are network order, the rest host order.
 * Padding is explicit so that the layout is the same for clang-bpf and for ctypes.
 */
#ifndef XDPFW_ABI_H
#define XDPFW_ABI_H

/* Rule actions (struct prefix_verdict.action, struct port_verdict.action). */
#define XDPFW_ACT_NONE      0 /* no rule decides: the interface policy does */
#define XDPFW_ACT_PASS      1 /* allow: hand to the stack, skip the policy */
#define XDPFW_ACT_DROP      2
#define XDPFW_ACT_TX        3 /* reserved for the load balancer (XDP_TX) */
#define XDPFW_ACT_REDIRECT  4 /* reserved for the load balancer (devmap/cpumap) */

/* Interface policies (struct iface_cfg.policy and .unparsed_policy). */
#define XDPFW_POLICY_PASS   0
#define XDPFW_POLICY_DROP   1

/* struct iface_cfg.flags */
#define XDPFW_IFF_GUARD_L2  0x1 /* a drop policy drops ARP and IPv6 ND too (off by default) */

/* Why a packet got its verdict: index of reason_counters, exported as metrics. */
#define XDPFW_REASON_RULE_PASS      0
#define XDPFW_REASON_RULE_DROP      1
#define XDPFW_REASON_POLICY_PASS    2
#define XDPFW_REASON_POLICY_DROP    3
#define XDPFW_REASON_UNPARSED_PASS  4 /* the parser could not read the packet */
#define XDPFW_REASON_UNPARSED_DROP  5
#define XDPFW_REASON_L2_EXEMPT      6 /* ARP/ND passed despite a drop policy */
#define XDPFW_REASON_MAX            7

/* iface_counters index: slot * XDPFW_IFACE_COUNTERS + XDPFW_IFACE_{PASSED,DROPPED}. */
#define XDPFW_IFACE_PASSED   0
#define XDPFW_IFACE_DROPPED  1
#define XDPFW_IFACE_COUNTERS 2

#define XDPFW_NO_RULE     0xffffffff /* rule_slot when no rule decided */
#define XDPFW_NO_PORT_SET 0          /* prefix_verdict.port_set when no proto/port rule applies */

/* Key of rules_v4: source prefix. */
struct lpm_v4_key {
	__u32 prefixlen; /* host order, 0..32 */
	__u8 addr[4];    /* be */
};

/* Key of rules_v6: source prefix. */
struct lpm_v6_key {
	__u32 prefixlen; /* host order, 0..128 */
	__u8 addr[16];   /* be */
};

/* Value of rules_v4/rules_v6, compiled by xdpfw/rules/compile.py: the verdict for packets
 * from this prefix that no proto/port rule of port_set matches. */
struct prefix_verdict {
	__u32 rule_slot; /* counter slot of the deciding rule, or XDPFW_NO_RULE */
	__u32 port_set;  /* key space in port_rules, or XDPFW_NO_PORT_SET: then no second lookup */
	__u8 action;     /* XDPFW_ACT_* */
	__u8 pad[3];
};

/* Key of port_rules. dport 0 is the "any port of this protocol" entry. */
struct port_key {
	__u32 port_set; /* host order */
	__u8 proto;     /* IPPROTO_* */
	__u8 pad;
	__u16 dport;    /* be */
};

struct port_verdict {
	__u32 rule_slot;
	__u8 action;
	__u8 pad[3];
};

/* Value of iface_config, keyed by ingress ifindex. */
struct iface_cfg {
	__u32 slot;          /* index of iface_counters */
	__u8 policy;         /* XDPFW_POLICY_*: packets no rule decides */
	__u8 unparsed_policy;/* XDPFW_POLICY_*: packets the parser cannot read */
	__u8 flags;          /* XDPFW_IFF_* */
	__u8 pad;
};

/* Value of every per-CPU counter map. */
struct counter {
	__u64 packets;
	__u64 bytes;
};

#endif /* XDPFW_ABI_H */
