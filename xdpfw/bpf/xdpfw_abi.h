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

/* Interface policies (struct iface_policy.policy and .unparsed_policy). */
#define XDPFW_POLICY_PASS   0
#define XDPFW_POLICY_DROP   1

/* struct iface_policy.flags */
#define XDPFW_IFF_GUARD_L2  0x1 /* a drop policy drops ARP and IPv6 ND too (off by default) */

/* Why a packet got its verdict: index of reason_counters, exported as metrics. */
#define XDPFW_REASON_RULE_PASS      0
#define XDPFW_REASON_RULE_DROP      1
#define XDPFW_REASON_POLICY_PASS    2
#define XDPFW_REASON_POLICY_DROP    3
#define XDPFW_REASON_UNPARSED_PASS  4 /* the parser could not read the packet */
#define XDPFW_REASON_UNPARSED_DROP  5
#define XDPFW_REASON_L2_EXEMPT      6 /* ARP/ND passed despite a drop policy */
#define XDPFW_REASON_FRAG_OVERLAP   7 /* IPv4 fragment at offset 8 bytes (RFC 1858) */
#define XDPFW_REASON_FRAG_TINY      8 /* IPv4 first fragment too short for TCP/UDP (RFC 1858) */
#define XDPFW_REASON_FRAG_CHAIN     9 /* IPv6 first fragment without its header chain (RFC 7112) */
/* A packet the firewall lets through and the load balancer takes (lb.h): */
#define XDPFW_REASON_LB_TX          10 /* to a backend, out of the same NIC (XDP_TX) */
#define XDPFW_REASON_LB_REDIRECT    11 /* to a backend, out of another NIC (devmap) */
#define XDPFW_REASON_LB_CPU         12 /* to the stack on a CPU of the steering set (cpumap) */
#define XDPFW_REASON_LB_NO_BACKEND  13 /* dropped: the service has no usable backend */
#define XDPFW_REASON_LB_NO_EGRESS   14 /* dropped: the backend's egress port is gone */
#define XDPFW_REASON_MAX            15

/* iface_counters index: slot * XDPFW_IFACE_COUNTERS + XDPFW_IFACE_{PASSED,DROPPED,FORWARDED}. */
#define XDPFW_IFACE_PASSED    0 /* handed to the stack (XDP_PASS, or to a steering CPU) */
#define XDPFW_IFACE_DROPPED   1
#define XDPFW_IFACE_FORWARDED 2 /* sent to a backend (XDP_TX, devmap redirect) */
#define XDPFW_IFACE_COUNTERS  3

/* The interface slot of a program instance: the loader patches this constant, in the one
 * instruction that loads it, with the slot of the interface the instance is attached to
 * (xdpfw/dataplane/instances.py). Slot 0 is the test instance, never attached. */
#define XDPFW_SLOT_MARKER 0x5107c0de

/* explain_result.magic: written by xdpfw_explain (GET /api/v1/explain), an entry point
 * that decides as xdpfw_main does for the same slot and reports instead of counting. */
#define XDPFW_EXPLAIN_MAGIC 0x78706c6e /* "xpln" */

#define XDPFW_NO_RULE     0xffffffff /* rule_slot when no rule decided */
#define XDPFW_NO_PORT_SET 0          /* prefix_verdict.port_set when no proto/port rule applies */

/* Key of rules_v6: source prefix. */
struct lpm_v6_key {
	__u32 prefixlen; /* host order, 0..128 */
	__u8 addr[16];   /* be */
};

/* Key of hosts_v6: a /128 is the longest possible match, so it lives in an exact-match hash
 * that is looked up before the trie. */
struct host_v6_key {
	__u8 addr[16]; /* be */
};

/* Value of rules_v6 and hosts_v6, compiled by xdpfw/rules/compile.py: the verdict for packets
 * from this prefix that no proto/port rule of port_set matches. (IPv4 keeps the same three
 * fields packed into 64 bits: XDPFW_PV_*.) */
struct prefix_verdict {
	__u32 rule_slot; /* counter slot of the deciding rule, or XDPFW_NO_RULE */
	__u32 port_set;  /* key space in port_rules, or XDPFW_NO_PORT_SET: then no second lookup */
	__u8 action;     /* XDPFW_ACT_* */
	__u8 pad[3];
};

/* struct port_key.kind */
#define XDPFW_PORT_MATCH  0 /* a proto (dport 0) or proto+port entry */
#define XDPFW_PORT_STRICT 1 /* proto 0, dport 0: the strictest verdict of the port set, for
			     * packets whose transport header cannot be read (README) */

/* Key of port_rules. dport 0 is the "any port of this protocol" entry. Every port set has
 * one XDPFW_PORT_STRICT entry; packets always look up kind XDPFW_PORT_MATCH. */
struct port_key {
	__u32 port_set; /* host order */
	__u8 proto;     /* IPPROTO_* */
	__u8 kind;      /* XDPFW_PORT_* */
	__u16 dport;    /* be */
};

struct port_verdict {
	__u32 rule_slot;
	__u8 action;
	__u8 pad[3];
};

/* ---- IPv4 source rules: DIR-24-8 (control plane xdpfw/dataplane/v4table.py) ----
 *
 * A lookup costs the same whatever the rules: v4_tbl24[address >> 8], then for some /24s one
 * v4_tbl8 entry, then one v4_verdicts entry. Every value a packet reads is one aligned word,
 * written whole by the control plane, so a packet meets either the old or the new verdict of
 * its address, never a mix. */

/* A verdict packed in 64 bits (v4_verdicts values): what struct prefix_verdict holds. */
#define XDPFW_PV_SLOT_MASK   0xffffffULL /* bits 0-23: rule slot; all ones: no rule */
#define XDPFW_PV_SET_SHIFT   24          /* bits 24-47: port set */
#define XDPFW_PV_SET_MASK    0xffffffULL
#define XDPFW_PV_ACT_SHIFT   48          /* bits 48-49: XDPFW_ACT_* */

/* v4_tbl24 entries (u64, host order), one per /24:
 *   bits 0-22  the verdict id of the longest prefix of length <= 24 covering the /24 (0: none)
 *   bits 23-45 ONE: the verdict id of that one longer prefix; GROUP: the v4_tbl8 group
 *   bits 46-53 ONE: the longer prefix's last octet (its network)
 *   bits 54-56 ONE: its length - 25 (/25 .. /32)
 *   bits 62-63 the kind: PLAIN (no prefix longer than /24 inside), ONE (exactly one),
 *              GROUP (more: 256 entries in v4_tbl8) */
#define XDPFW_V4_ID_BITS    23
#define XDPFW_V4_ID_MASK    0x7fffffULL
#define XDPFW_V4_AUX_SHIFT  23
#define XDPFW_V4_NET_SHIFT  46
#define XDPFW_V4_KIND_SHIFT 62
#define XDPFW_V4_LEN_SHIFT  54
#define XDPFW_V4_PLAIN      0
#define XDPFW_V4_ONE        1
#define XDPFW_V4_GROUP      2

/* Value of v4_tbl8: a group, the verdict id of the longest prefix longer than /24 covering
 * each address of its /24 (0: none). One 1 KiB element per group. */
struct v4_group {
	__u32 vid[256];
};
#define XDPFW_V4_TBL24      16777216 /* 2^24 /24s */

/* Value of iface_policy, an array indexed by interface slot; all zero = pass everything. */
struct iface_policy {
	__u8 policy;          /* XDPFW_POLICY_*: packets no rule decides */
	__u8 unparsed_policy; /* XDPFW_POLICY_*: packets the parser cannot read */
	__u8 flags;           /* XDPFW_IFF_* */
	__u8 pad;
};

/* Value of every per-CPU counter map. */
struct counter {
	__u64 packets;
	__u64 bytes;
};

/* ---- L4 load balancer (xdpfw/bpf/lb.h; control plane xdpfw/lb/service.py) ---- */

/* struct lb_service.fwd: how a service's packets leave the appliance. */
#define XDPFW_LB_FWD_TX       0 /* direct server return, same L2: new dst MAC, XDP_TX */
#define XDPFW_LB_FWD_REDIRECT 1 /* backend behind another NIC: new MACs, XDP_REDIRECT (tx_ports) */

#define XDPFW_LB_NO_BACKEND     0xffffffff /* lb_tables entry when no backend is usable */
#define XDPFW_LB_MAX_STEER_CPUS 8          /* a power of two: the index is masked with it - 1 */

/* struct lb_backend.flags */
#define XDPFW_LB_BE_LIVE 0x1 /* the slot holds a backend (conntrack may keep flows on it) */

/* lb_service_counters index: service slot * XDPFW_LB_SVC_COUNTERS + XDPFW_LB_SVC_*. */
#define XDPFW_LB_SVC_FORWARDED  0 /* sent to a backend (or steered to a CPU) */
#define XDPFW_LB_SVC_NO_BACKEND 1 /* dropped: the service has no usable backend */
#define XDPFW_LB_SVC_COUNTERS   2

/* Key of lb_services: a virtual service. */
struct lb_vip {
	__u8 addr[16]; /* be: IPv4 in the first 4 bytes, the rest zero */
	__u16 port;    /* be */
	__u8 proto;    /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;   /* 4 or 6 */
};

/* CPUs (keys of cpu_map) that packets are spread over, by flow hash, for stack processing. */
struct lb_steer {
	__u32 count; /* 0: no steering */
	__u32 cpus[XDPFW_LB_MAX_STEER_CPUS];
};

/* Value of lb_services. */
struct lb_service {
	__u32 slot;  /* host order: row of lb_tables, index base of lb_service_counters */
	__u8 fwd;    /* XDPFW_LB_FWD_* */
	__u8 pad[3];
	struct lb_steer steer; /* count > 0: hand to the stack on these CPUs instead of a backend */
};

/* Value of lb_config[0]. */
struct lb_config {
	__u32 services;        /* entries in lb_services; 0 skips the service lookup */
	struct lb_steer steer; /* passing traffic of no service: spread over these CPUs */
};

/* Value of lb_backends, indexed by backend slot. */
struct lb_backend {
	__u8 dmac[6];   /* the backend's MAC (its next hop's when routed) */
	__u8 smac[6];   /* MAC of the egress interface (redirect mode) */
	__u32 tx_port;  /* host order: key of tx_ports (redirect mode) */
	__u32 gen;      /* host order: changes when the slot gets another backend */
	__u8 flags;     /* XDPFW_LB_BE_* */
	__u8 pad[3];
};

/* Key of lb_conntrack: a flow, as the client sent it. */
struct lb_flow {
	__u8 saddr[16]; /* be */
	__u8 daddr[16]; /* be: the VIP */
	__u16 sport;    /* be */
	__u16 dport;    /* be */
	__u8 proto;
	__u8 family;    /* 4 or 6 */
	__u8 pad[2];
};

/* Value of lb_conntrack. */
struct lb_ct {
	__u32 backend;   /* host order: backend slot */
	__u32 gen;       /* lb_backend.gen when chosen: another generation means the flow is stale */
	__u64 last_seen; /* bpf_jiffies64() (bpf_ktime_get_ns cost 34 ns here), refreshed at most
			  * once a second */
};

/* lb_vip_index: buckets of VIPs by xdpfw_lb_vip_bucket(); the value is 0 (no service), the
 * service slot + 1 (its lb_service_slots entry, whose VIP the packet's must equal), or
 * XDPFW_LB_VIP_COLLIDE (several services: look in lb_services). Two array reads instead of a
 * hash lookup (32 ns here), for service traffic and for every other passing packet. */
#define XDPFW_LB_VIP_INDEX_BITS 12
#define XDPFW_LB_VIP_INDEX      (1 << XDPFW_LB_VIP_INDEX_BITS)
#define XDPFW_LB_VIP_COLLIDE    0xffffffff

/* Value of lb_service_slots, indexed by service slot: the service and its VIP. */
struct lb_service_slot {
	struct lb_vip vip;
	struct lb_service svc;
};

/* Value of lb_flow_cache (per CPU, indexed by flow hash): a copy of a conntrack entry, so an
 * established flow costs an array read, not an LRU hash lookup (30 ns here). lb_conntrack
 * stays the truth: a miss here reads it, and last_seen is written back to it once a second. */
#define XDPFW_LB_FLOW_CACHE 4096 /* a power of two */
struct lb_flow_slot {
	struct lb_flow flow;
	struct lb_ct ct;
};

/* ---- Program-wide settings: fw_config, one entry (key 0), read once per packet ---- */

/* struct fw_cfg.skip: IPv6 source maps the program need not search, because they are empty.
 * The control plane clears a bit before it writes to that map and sets it only when the map
 * is empty with no write in flight (xdpfw/dataplane/fw_config.py: FwConfig), so no rule is
 * ever skipped; all zero (a fresh map) searches everything. */
#define XDPFW_SKIP_HOSTS_V6 0x4
#define XDPFW_SKIP_RULES_V6 0x8

/* hostless_v6, an array of __u64: one bit per bucket of IPv6 /64s (the bucket of a /64 is
 * xdpfw_v6_bucket() of its upper 64 bits), set when no host (/128) rule falls in that bucket,
 * so a source there need not be looked up in hosts_v6. Zero means "look it up": a bit is
 * cleared before a host of its bucket is written, and set only by a rebuild from hosts_v6
 * itself. */
#define XDPFW_HOSTLESS_V6_BITS  24
#define XDPFW_HOSTLESS_V6_WORDS 262144 /* 2^24 buckets, 64 to a word: 2 MiB */
#define XDPFW_V6_BUCKET_MUL     0x9e3779b97f4a7c15ULL /* Fibonacci hashing */

struct fw_cfg {
	__u32 sample_rate; /* host order: 1 drop in sample_rate becomes an event (drop_events); 0: none */
	__u32 skip;        /* host order: XDPFW_SKIP_* */
	__u32 capture;     /* host order: non-zero while a capture runs (capture_config says what);
			    * 0 costs a packet one test of this word */
	__u32 pad;
};

/* ---- Whose pins these are: pin_identity, one entry (xdpfw/dataplane/pins.py) ---- */

#define XDPFW_STATE_DIR_LEN 248

/* Value of pin_identity[0]. The store holds the same id: a daemon whose store has another id
 * refuses the pins (or, told to adopt them, makes them equal to its store). */
struct pin_identity {
	__u64 store_id;                       /* host order: 0 = no store has claimed them */
	__u8 state_dir[XDPFW_STATE_DIR_LEN];  /* the claiming store's directory, NUL-padded */
	__u32 generation;  /* host order: which half of the IPv4 verdict ids, tbl8 groups and
			    * port sets the layout uses; each start builds in the other half */
	__u32 pad;
};

/* ---- Sampled drop events (ring buffer drop_events; reader xdpfw/events.py) ---- */

/* One sampled drop, as pushed through drop_events. */
struct drop_event {
	__u8 saddr[16];  /* be: IPv4 in the first 4 bytes */
	__u8 daddr[16];  /* be: as saddr */
	__u32 rule_slot; /* host order: counter slot of the deciding rule, or XDPFW_NO_RULE */
	__u32 iface;     /* host order: interface slot of the program instance */
	__u32 pkt_len;   /* host order: bytes seen by XDP */
	__u16 sport;     /* be: 0 when the packet has no ports */
	__u16 dport;     /* be */
	__u16 eth_proto; /* be: innermost ethertype */
	__u8 l4_proto;   /* IPPROTO_* */
	__u8 reason;     /* XDPFW_REASON_* */
};

/* ---- Packet capture (ring buffer capture_ring; reader xdpfw/capture.py) ----
 *
 * While fw_cfg.capture is set, every verdict that capture_config selects copies up to snaplen
 * bytes of its frame into capture_ring, at most one packet per interval_ns per CPU (after a
 * burst), so a flood costs the box a bounded copy rate, and a full ring loses records, never
 * packets. Everything is filtered in the program: only matching packets are copied. */
#define XDPFW_CAPTURE_MAX_SNAPLEN 2048       /* bytes of a frame a record can hold */
#define XDPFW_CAPTURE_ANY         0xffffffff /* capture_cfg.iface / .rule_slot: no filter */

/* capture_counters index (per-CPU struct counter: packets and their full lengths). */
#define XDPFW_CAPTURE_CAPTURED 0 /* copied into capture_ring */
#define XDPFW_CAPTURE_LIMITED  1 /* matched, refused by the rate limit */
#define XDPFW_CAPTURE_LOST     2 /* matched, the ring was full */
#define XDPFW_CAPTURE_COUNTERS 3

/* Value of capture_config[0], written before fw_cfg.capture is set. */
struct capture_cfg {
	__u32 iface;       /* host order: interface slot, or XDPFW_CAPTURE_ANY */
	__u32 rule_slot;   /* host order: counter slot of the deciding rule, or XDPFW_CAPTURE_ANY */
	__u32 reasons;     /* host order: bit 1 << XDPFW_REASON_* per reason captured */
	__u32 verdicts;    /* host order: bit 1 << XDP_* per action captured (XDP_DROP = 1...) */
	__u32 snaplen;     /* host order: bytes copied per frame, 1..XDPFW_CAPTURE_MAX_SNAPLEN */
	__u32 pad;
	__u64 interval_ns; /* host order: 1e9 / packets per second, per CPU */
	__u64 burst_ns;    /* host order: (burst - 1) * interval_ns: how far ahead a CPU may run */
};

/* Per CPU (capture_bucket): the rate limit's state, a GCRA "theoretical arrival time". */
struct capture_bucket {
	__u64 tat; /* bpf_ktime_get_ns() by which the CPU has used up its allowance */
};

/* One captured frame, as pushed through capture_ring: the header, then cap_len bytes. */
struct capture_record {
	__u64 ts_ns;     /* host order: bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u32 pkt_len;   /* host order: the frame's length as XDP saw it */
	__u32 cap_len;   /* host order: bytes of it that follow (<= snaplen) */
	__u32 iface;     /* host order: interface slot of the program instance */
	__u32 rule_slot; /* host order: counter slot of the deciding rule, or XDPFW_NO_RULE */
	__u8 reason;     /* XDPFW_REASON_* */
	__u8 verdict;    /* XDP_* action the packet got */
	__u8 pad[6];
	__u8 data[XDPFW_CAPTURE_MAX_SNAPLEN];
};

/* ---- Explain (an explain instance's answer, over the frame's first 16 bytes) ---- */
struct explain_result {
	__u32 magic;     /* host order: XDPFW_EXPLAIN_MAGIC */
	__u32 reason;    /* host order: XDPFW_REASON_* */
	__u32 rule_slot; /* host order: counter slot of the deciding rule, or XDPFW_NO_RULE */
	__u32 verdict;   /* host order: the XDP_* action an attached instance would return */
};

#endif /* XDPFW_ABI_H */
